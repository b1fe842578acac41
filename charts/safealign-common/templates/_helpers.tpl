{{/* Names, labels and small values every stage chart shares. */}}

{{- define "safealign.name" -}}
{{- printf "safealign-%s" .stage -}}
{{- end -}}

{{/* The Job's name: release name, trimmed to leave room for "-<index>" pod host names. */}}
{{- define "safealign.fullname" -}}
{{- .ctx.Release.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{/* The run (directory under the runs volume); all stages of one recipe must share it. */}}
{{- define "safealign.runName" -}}
{{- default .ctx.Release.Name .ctx.Values.runName -}}
{{- end -}}

{{- define "safealign.labels" -}}
app.kubernetes.io/name: {{ include "safealign.name" . }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .stage }}
app.kubernetes.io/part-of: safealign
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version }}
safealign.dev/run: {{ include "safealign.runName" . }}
{{- end -}}

{{- define "safealign.selectorLabels" -}}
app.kubernetes.io/name: {{ include "safealign.name" . }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- end -}}

{{- define "safealign.image" -}}
{{- $img := .ctx.Values.image -}}
{{- printf "%s:%s" $img.repository (default .ctx.Chart.AppVersion $img.tag) -}}
{{- end -}}

{{- define "safealign.recipeConfigMap" -}}
{{- default (printf "%s-recipe" (include "safealign.fullname" .)) .ctx.Values.recipeConfigMap -}}
{{- end -}}

{{- define "safealign.runsClaim" -}}
{{- $s := .ctx.Values.storage.runs -}}
{{- default (printf "%s-runs" (include "safealign.fullname" .)) $s.existingClaim -}}
{{- end -}}

{{- define "safealign.modelCacheClaim" -}}
{{- $s := .ctx.Values.storage.modelCache -}}
{{- default (printf "%s-model-cache" (include "safealign.fullname" .)) $s.existingClaim -}}
{{- end -}}

{{/*
Where libraries may write, with the root filesystem read-only: HOME is the pod's /tmp (emptyDir:
matplotlib's config, Triton's kernels), and caches that are worth keeping between stages (PyTorch's JIT
extensions such as DeepSpeed's fused Adam, vLLM's compiled graphs) go to the model-cache volume.
*/}}
{{- define "safealign.writableHome" -}}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /models/cache
{{- end -}}
