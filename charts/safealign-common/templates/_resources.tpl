{{/* The objects beside the Job: the recipe ConfigMap, the PVCs, the headless Service of a multi-node Job. */}}

{{- define "safealign.recipe" -}}
{{- if not .ctx.Values.recipeConfigMap }}
{{- if not .ctx.Values.recipe }}
{{- fail "recipe is empty: pass the recipe file with --set-file recipe=recipes/<name>.yaml (or name an existing ConfigMap in recipeConfigMap)" }}
{{- end }}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "safealign.recipeConfigMap" . }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "safealign.labels" . | nindent 4 }}
data:
  recipe.yaml: |
    {{- .ctx.Values.recipe | nindent 4 }}
{{- end }}
{{- end -}}

{{/* A PVC the chart creates when no existingClaim is given; kept on uninstall (it holds the run).
Usage: (dict "stage" <stage dict> "spec" <storage.* values> "name" <claim name>) */}}
{{- define "safealign.pvc" -}}
{{- $s := .spec -}}
{{- if not $s.existingClaim }}
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: {{ .name }}
  namespace: {{ .stage.ctx.Release.Namespace }}
  labels:
    {{- include "safealign.labels" .stage | nindent 4 }}
  annotations:
    helm.sh/resource-policy: keep
spec:
  accessModes:
    {{- toYaml $s.accessModes | nindent 4 }}
  {{- with $s.storageClassName }}
  storageClassName: {{ . }}
  {{- end }}
  resources:
    requests:
      storage: {{ $s.size }}
{{- end }}
{{- end -}}

{{- define "safealign.pvcs" -}}
{{- include "safealign.pvc" (dict "stage" . "spec" .ctx.Values.storage.runs "name" (include "safealign.runsClaim" .)) }}
---
{{- include "safealign.pvc" (dict "stage" . "spec" .ctx.Values.storage.modelCache "name" (include "safealign.modelCacheClaim" .)) }}
{{- end -}}

{{/* Pods of a multi-node Job find each other as <job>-<index>.<service> through this. */}}
{{- define "safealign.service" -}}
{{- if gt (int .ctx.Values.job.nodes) 1 }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "safealign.fullname" . }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "safealign.labels" . | nindent 4 }}
spec:
  clusterIP: None
  publishNotReadyAddresses: true
  selector:
    {{- include "safealign.selectorLabels" . | nindent 4 }}
  ports:
    - name: rendezvous
      port: {{ .ctx.Values.job.rendezvousPort }}
      targetPort: rendezvous
{{- end }}
{{- end -}}

{{/*
`helm test`: a pod that checks, with the image and volumes the Job uses, that the recipe is valid and
its files exist (`safealign validate`) — the cheapest way to find a broken release before GPUs wait.
*/}}
{{- define "safealign.test" -}}
{{- if .ctx.Values.test.enabled }}
{{- $v := .ctx.Values -}}
apiVersion: v1
kind: Pod
metadata:
  name: {{ include "safealign.fullname" . }}-test
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "safealign.labels" . | nindent 4 }}
  annotations:
    helm.sh/hook: test
    helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  securityContext:
    {{- toYaml $v.securityContext.pod | nindent 4 }}
  containers:
    - name: validate
      image: {{ include "safealign.image" . }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      command: ["safealign", "validate", "/recipe/recipe.yaml"]
      env:
        {{- include "safealign.writableHome" . | nindent 8 }}
        - name: SAFEALIGN_CACHE
          value: /models/safealign
      resources:
        {{- toYaml $v.resources.init | nindent 8 }}
      securityContext:
        {{- toYaml $v.securityContext.container | nindent 8 }}
      volumeMounts:
        - name: recipe
          mountPath: /recipe
          readOnly: true
        - name: model-cache
          mountPath: /models
          readOnly: true
        - name: tmp
          mountPath: /tmp
  volumes:
    - name: recipe
      configMap:
        name: {{ include "safealign.recipeConfigMap" . }}
    - name: model-cache
      persistentVolumeClaim:
        claimName: {{ include "safealign.modelCacheClaim" . }}
    - name: tmp
      emptyDir: {}
{{- end }}
{{- end -}}

{{- define "safealign.notes" -}}
{{- $job := include "safealign.fullname" . -}}
SafeAlign {{ .stage }} stage: Job {{ $job }} in namespace {{ .ctx.Release.Namespace }}
({{ .ctx.Values.job.nodes }} node(s) x {{ .ctx.Values.resources.gpusPerNode }} GPU(s), image {{ include "safealign.image" . }}).
Run directory: /runs/{{ include "safealign.runName" . }} on PVC {{ include "safealign.runsClaim" . }}.

Watch it:
  kubectl -n {{ .ctx.Release.Namespace }} get job {{ $job }} -w
  kubectl -n {{ .ctx.Release.Namespace }} logs -f job/{{ $job }}
Check the recipe and its files with the release's own image and volumes:
  helm test {{ .ctx.Release.Name }} -n {{ .ctx.Release.Namespace }}

The next stage reads this run directory: install it with the same runName and
--set storage.runs.existingClaim={{ include "safealign.runsClaim" . }}
(or let `safealign submit RECIPE` run every stage in order).
{{- end -}}
