{{/*
The stage Job: everything a stage chart renders is here once; a stage chart passes its stage name.
Usage: {{ include "safealign.job" (dict "stage" "align" "ctx" .) }}
*/}}
{{- define "safealign.job" -}}
{{- $v := .ctx.Values -}}
{{- $nodes := int $v.job.nodes -}}
{{- $job := include "safealign.fullname" . -}}
{{- $trials := and (eq .stage "sweep") (eq $v.sweep.part "trial") -}}
{{- $precheck := and (ne .stage "sweep") (include "safealign.torchrun" .) -}}
{{- if and (eq .stage "sweep") (gt $nodes 1) }}{{ fail "job.nodes > 1 is not supported for a sweep: its parts run on one node (give each trial one node's GPUs with sweep.gpus_per_trial in the recipe)" }}{{ end -}}
{{- if and $trials (lt (int $v.sweep.trials) 1) }}{{ fail "sweep.trials: set it to the number of grid points (safealign submit does)" }}{{ end -}}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ $job }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "safealign.labels" . | nindent 4 }}
    {{- with $v.scheduling.kueueQueue }}
    kueue.x-k8s.io/queue-name: {{ . }}
    {{- end }}
spec:
  {{- if gt $nodes 1 }}
  completionMode: Indexed
  completions: {{ $nodes }}
  parallelism: {{ $nodes }}
  backoffLimit: {{ $v.job.backoffLimit }}
  {{- else if $trials }}
  # One pod per grid point; a failing trial retries and fails alone, the others go on.
  completionMode: Indexed
  completions: {{ $v.sweep.trials }}
  parallelism: {{ $v.sweep.parallelism }}
  backoffLimitPerIndex: {{ $v.job.backoffLimit }}
  {{- else }}
  backoffLimit: {{ $v.job.backoffLimit }}
  {{- end }}
  {{- with $v.job.activeDeadlineSeconds }}
  activeDeadlineSeconds: {{ . }}
  {{- end }}
  {{- if ne $v.job.ttlSecondsAfterFinished nil }}
  ttlSecondsAfterFinished: {{ $v.job.ttlSecondsAfterFinished }}
  {{- end }}
  {{- if $v.job.podFailurePolicy }}
  podFailurePolicy:
    rules:
      # A recipe or data error exits 2 (one line in the log): retrying cannot fix it.
      - action: {{ ternary "FailIndex" "FailJob" $trials }}
        onExitCodes:
          containerName: {{ .stage }}
          operator: In
          values: [2]
      {{- if $precheck }}
      - action: FailJob
        onExitCodes:
          containerName: validate
          operator: In
          values: [2]
      {{- end }}
      # Evicted or preempted (node drain, Kueue preemption, spot reclaim): retry without counting it,
      # the stage resumes from its last checkpoint on the runs volume.
      - action: Ignore
        onPodConditions:
          - type: DisruptionTarget
            status: "True"
  {{- end }}
  template:
    metadata:
      labels:
        {{- include "safealign.labels" . | nindent 8 }}
      annotations:
        checksum/recipe: {{ $v.recipe | sha256sum }}
    spec:
      restartPolicy: Never
      # A stage never calls the Kubernetes API: no token in the pod for a compromised process to use.
      automountServiceAccountToken: false
      {{- if gt $nodes 1 }}
      subdomain: {{ $job }}
      {{- end }}
      {{- with $v.scheduling.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      {{- with $v.image.pullSecrets }}
      imagePullSecrets:
        {{- range . }}
        - name: {{ . }}
        {{- end }}
      {{- end }}
      securityContext:
        {{- toYaml $v.securityContext.pod | nindent 8 }}
      {{- with $v.scheduling.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.scheduling.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.scheduling.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if or $precheck (gt $nodes 1) }}
      initContainers:
      {{- end }}
      {{- if gt $nodes 1 }}
        # Pod 0's name must resolve before torchrun starts, or pod 0 does not host the rendezvous.
        - name: rendezvous
          image: {{ include "safealign.image" . }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          command: {{ include "safealign.waitForRendezvous" . }}
          resources:
            {{- toYaml $v.resources.init | nindent 12 }}
          securityContext:
            {{- toYaml $v.securityContext.container | nindent 12 }}
      {{- end }}
      {{- if $precheck }}
        # The recipe, checked against this Job's world size before torchrun starts (see _command.tpl).
        - name: validate
          image: {{ include "safealign.image" . }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          command: {{ include "safealign.validateCommand" . }}
          workingDir: /tmp
          resources:
            {{- toYaml $v.resources.init | nindent 12 }}
          env:
            {{- include "safealign.writableHome" . | nindent 12 }}
          securityContext:
            {{- toYaml $v.securityContext.container | nindent 12 }}
          volumeMounts:
            - name: recipe
              mountPath: /recipe
              readOnly: true
            - name: tmp
              mountPath: /tmp
      {{- end }}
      containers:
        - name: {{ .stage }}
          image: {{ include "safealign.image" . }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          command: {{ include "safealign.command" . }}
          workingDir: /runs
          env:
            {{- if gt (int $v.resources.gpusPerNode) 0 }}
            # No visible GPU in a pod that asked for some is an error (exit 2), not days of CPU training.
            - name: SAFEALIGN_REQUIRE_GPU
              value: "1"
            {{- end }}
            {{- include "safealign.writableHome" . | nindent 12 }}
            - name: SAFEALIGN_CACHE
              value: /models/safealign
            - name: HF_HOME
              value: /models/huggingface
            - name: HF_HUB_OFFLINE
              value: {{ ternary "0" "1" $v.job.hubOnline | quote }}
            {{- if or (gt $nodes 1) $trials }}
            - name: {{ ternary "TRIAL_INDEX" "NODE_RANK" $trials }}
              valueFrom:
                fieldRef:
                  fieldPath: metadata.annotations['batch.kubernetes.io/job-completion-index']
            {{- end }}
            {{- /* Secrets are optional references: a missing Secret starts the pod, and the stage that needs
                   the variable says so in one line, instead of the pod waiting for it for days. */}}
            {{- with $v.secrets.hubToken }}
            - name: HF_TOKEN
              valueFrom:
                secretKeyRef:
                  name: {{ .name }}
                  key: {{ .key }}
                  optional: true
            {{- end }}
            {{- /* The judge key only where judges run: eval, and a sweep's trials (each evaluates). */}}
            {{- if or (eq .stage "eval") (eq .stage "sweep") }}
            {{- with $v.secrets.judgeApiKey }}
            - name: {{ .env }}
              valueFrom:
                secretKeyRef:
                  name: {{ .name }}
                  key: {{ .key }}
                  optional: true
            {{- end }}
            {{- end }}
            {{- with $v.job.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- if gt $nodes 1 }}
          ports:
            - name: rendezvous
              containerPort: {{ $v.job.rendezvousPort }}
          {{- end }}
          {{- /* quantities as strings: the API takes both, typed clients (kubernetes>=35) only strings */}}
          resources:
            requests:
              {{- range $name, $quantity := $v.resources.requests }}
              {{ $name }}: {{ $quantity | toString | quote }}
              {{- end }}
              {{- if gt (int $v.resources.gpusPerNode) 0 }}
              nvidia.com/gpu: {{ $v.resources.gpusPerNode | toString | quote }}
              {{- end }}
            limits:
              {{- range $name, $quantity := $v.resources.limits }}
              {{ $name }}: {{ $quantity | toString | quote }}
              {{- end }}
              {{- if gt (int $v.resources.gpusPerNode) 0 }}
              nvidia.com/gpu: {{ $v.resources.gpusPerNode | toString | quote }}
              {{- end }}
          securityContext:
            {{- toYaml $v.securityContext.container | nindent 12 }}
          volumeMounts:
            - name: recipe
              mountPath: /recipe
              readOnly: true
            - name: runs
              mountPath: /runs
            - name: model-cache
              mountPath: /models
            - name: dshm
              mountPath: /dev/shm
            - name: tmp
              mountPath: /tmp
      volumes:
        - name: recipe
          configMap:
            name: {{ include "safealign.recipeConfigMap" . }}
        - name: runs
          persistentVolumeClaim:
            claimName: {{ include "safealign.runsClaim" . }}
        - name: model-cache
          persistentVolumeClaim:
            claimName: {{ include "safealign.modelCacheClaim" . }}
        # NCCL and DataLoader workers need far more shared memory than the container default of 64 MiB.
        - name: dshm
          emptyDir:
            medium: Memory
            {{- with $v.storage.shmSizeLimit }}
            sizeLimit: {{ . }}
            {{- end }}
        - name: tmp
          emptyDir: {}
{{- end -}}
