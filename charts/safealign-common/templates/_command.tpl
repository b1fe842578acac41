{{/*
The container's command. One process on <= 1 GPU; torchrun across the node's GPUs otherwise; across
nodes, torchrun with a c10d rendezvous on pod 0 of the Indexed Job (reached through the headless
Service as <job>-0.<service>), the node rank being the pod's completion index.
*/}}
{{- define "safealign.command" -}}
{{- $v := .ctx.Values -}}
{{- $job := include "safealign.fullname" . -}}
{{- $run := list "run" "/recipe/recipe.yaml" "--stage" .stage "--run-dir" (printf "/runs/%s" (include "safealign.runName" .)) -}}
{{- $run = concat $run $v.job.extraArgs -}}
{{- if gt (int $v.job.nodes) 1 -}}
{{- $rdzv := printf "%s-0.%s:%d" $job $job (int $v.job.rendezvousPort) -}}
{{- toJson (concat (list "torchrun" (printf "--nnodes=%d" (int $v.job.nodes)) (printf "--nproc-per-node=%d" (int $v.resources.gpusPerNode)) "--node-rank=$(NODE_RANK)" "--rdzv-backend=c10d" (printf "--rdzv-endpoint=%s" $rdzv) (printf "--rdzv-id=%s" $job) "-m" "safealign.cli") $run) -}}
{{- else if gt (int $v.resources.gpusPerNode) 1 -}}
{{- toJson (concat (list "torchrun" "--standalone" (printf "--nproc-per-node=%d" (int $v.resources.gpusPerNode)) "-m" "safealign.cli") $run) -}}
{{- else -}}
{{- toJson (concat (list "safealign") $run) -}}
{{- end -}}
{{- end -}}
