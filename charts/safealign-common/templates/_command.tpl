{{/*
The container's command: `safealign run --stage <stage>` (the sweep chart: `safealign sweep --part <part>`,
one grid point per pod of an Indexed Job for part "trial"). A sweep part is always one process: it is a
driver (Ray Tune, or one trial), and each trial starts its own torchrun over sweep.gpus_per_trial GPUs
(several drivers would run the same grid into the same trial directories). The eval stage is always one process: vLLM
spreads each model over the pod's GPUs by tensor parallelism (under torchrun it would fall back to HF
generation sharded over the ranks). Training stages: one process on <= 1 GPU; torchrun across the node's GPUs otherwise; across
nodes, torchrun with a c10d rendezvous on pod 0 of the Indexed Job (reached through the headless
Service as <job>-0.<service>; c10d numbers the nodes itself, in joining order). Pod 0 hosts the
rendezvous store only if that name already resolves to its own address when torchrun starts, so every pod
first waits for the name (the `rendezvous` init container, safealign.waitForRendezvous).
*/}}
{{- define "safealign.command" -}}
{{- $v := .ctx.Values -}}
{{- $job := include "safealign.fullname" . -}}
{{- $runDir := printf "/runs/%s" (include "safealign.runName" .) -}}
{{- $run := list "run" "/recipe/recipe.yaml" "--stage" .stage "--run-dir" $runDir -}}
{{- if eq .stage "sweep" -}}
{{- $run = list "sweep" "/recipe/recipe.yaml" "--run-dir" $runDir "--part" $v.sweep.part -}}
{{- if eq $v.sweep.part "trial" -}}
{{- $run = concat $run (list "--trial-index" "$(TRIAL_INDEX)") -}}
{{- end -}}
{{- end -}}
{{- $run = concat $run $v.job.extraArgs -}}
{{- if and (eq .stage "eval") (gt (int $v.job.nodes) 1) }}{{ fail "job.nodes > 1: the eval stage runs on one node (vLLM spreads the models over its GPUs)" }}{{ end -}}
{{- if or (eq .stage "eval") (eq .stage "sweep") -}}
{{- toJson (concat (list "safealign") $run) -}}
{{- else if gt (int $v.job.nodes) 1 -}}
{{- $rdzv := printf "%s-0.%s:%d" $job $job (int $v.job.rendezvousPort) -}}
{{- $torchrun := list "torchrun" (printf "--nnodes=%d" (int $v.job.nodes)) (printf "--nproc-per-node=%d" (int $v.resources.gpusPerNode)) (printf "--max-restarts=%d" (int $v.job.maxRestarts)) "--rdzv-backend=c10d" (printf "--rdzv-endpoint=%s" $rdzv) (printf "--rdzv-id=%s" $job) (printf "--rdzv-conf=join_timeout=%d" (int $v.job.rendezvousTimeout)) -}}
{{- toJson (concat $torchrun (list "-m" "safealign.cli") $run) -}}
{{- else if gt (int $v.resources.gpusPerNode) 1 -}}
{{- toJson (concat (list "torchrun" "--standalone" (printf "--nproc-per-node=%d" (int $v.resources.gpusPerNode)) "-m" "safealign.cli") $run) -}}
{{- else -}}
{{- toJson (concat (list "safealign") $run) -}}
{{- end -}}
{{- end -}}


{{/*
Whether the stage runs under torchrun (several processes), and the init container's command that checks
the recipe first, in the pod, with the world size the Job gives it: torchrun turns a worker's exit 2 into
its own exit 1, so a recipe error inside torchrun would be retried as a crash instead of failing the Job.
`--set` items of job.extraArgs are passed on, so the check sees the recipe the stage will run.
*/}}
{{- define "safealign.torchrun" -}}
{{- $v := .ctx.Values -}}
{{- if and (ne .stage "eval") (ne .stage "sweep") (or (gt (int $v.job.nodes) 1) (gt (int $v.resources.gpusPerNode) 1)) }}true{{ end -}}
{{- end -}}

{{- define "safealign.validateCommand" -}}
{{- $v := .ctx.Values -}}
{{- $world := mul (int $v.job.nodes) (max 1 (int $v.resources.gpusPerNode)) -}}
{{- $args := list "safealign" "validate" "/recipe/recipe.yaml" "--world-size" (toString $world) "--stage" .stage -}}
{{- $extra := $v.job.extraArgs -}}
{{- range $i, $a := $extra -}}
{{- if hasPrefix "--set=" $a -}}
{{- $args = append $args $a -}}
{{- else if and (eq $a "--set") (lt (add1 $i) (len $extra)) -}}
{{- $args = concat $args (list $a (index $extra (add1 $i))) -}}
{{- end -}}
{{- end -}}
{{- toJson $args -}}
{{- end -}}


{{/*
The multi-node pods' init container command: wait (up to job.rendezvousTimeout) until pod 0's name
resolves. Without it, pod 0 may start torchrun before the headless Service's DNS record exists, conclude
that it is not the rendezvous host, and wait as a client for a store nobody runs.
*/}}
{{- define "safealign.waitForRendezvous" -}}
{{- $v := .ctx.Values -}}
{{- $job := include "safealign.fullname" . -}}
{{- $script := `import socket, sys, time
host, limit = sys.argv[1], float(sys.argv[2])
start = time.time()
while True:
    try:
        print(host, "resolves to", socket.getaddrinfo(host, None)[0][4][0])
        break
    except OSError:
        if time.time() - start > limit:
            sys.exit(f"{host} did not resolve within {limit:.0f} s: is the headless Service there?")
        time.sleep(2)` -}}
{{- toJson (list "python" "-c" $script (printf "%s-0.%s" $job $job) (toString (int $v.job.rendezvousTimeout))) -}}
{{- end -}}
