{{/*
The one home of the RayJob: its spec is rendered by "alexnet-train.rayJobSpec" for the one-off
RayJob (templates/rayjob.yaml), for the schedule's template (the ConfigMap's rayjob.yaml key, which the
CronJob's pod submits) and for KubeRay's RayCronJob (raycronjob.yaml). Head and workers share
one pod template, "alexnet-train.rayPodTemplate".
*/}}

{{/*
config.yaml for `alexnet-job train --config`: the training options that are set, plus the
options the chart derives from the values that size the pods and storage, so that nobody types
them twice: workers.replicas -> workers, workers.gpus -> gpus_per_worker,
workers.cpu -> cpus_per_worker, s3.bucket/s3.prefix -> output.
*/}}
{{- define "alexnet-train.config" -}}
{{- $config := dict }}
{{- range $key, $value := .Values.training }}
{{- if not (kindIs "invalid" $value) }}
{{- $_ := set $config $key $value }}
{{- end }}
{{- end }}
{{- /* `step_timeout: off` in a values file is YAML 1.1's false; the CLI's word for it is "off". */}}
{{- if and (hasKey $config "step_timeout") (kindIs "bool" $config.step_timeout) }}
{{- $_ := set $config "step_timeout" "off" }}
{{- end }}
{{- $_ := set $config "workers" (int64 .Values.workers.replicas) }}
{{- $_ = set $config "gpus_per_worker" (int64 .Values.workers.gpus) }}
{{- $_ = set $config "cpus_per_worker" (int64 .Values.workers.cpu) }}
{{- $_ = set $config "output" (include "alexnet-train.output" .) }}
{{- toYaml $config }}
{{- end }}

{{/*
The Ray pod template of the head and of the workers. Takes (dict "root" $ "group" <head or
workers values> "component" "containerName" "gpus" "affinity").
*/}}
{{- define "alexnet-train.rayPodTemplate" -}}
{{- $root := .root }}
{{- $group := .group -}}
metadata:
  labels:
    {{- include "alexnet-train.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  serviceAccountName: {{ include "alexnet-train.serviceAccountName" $root }}
  # Ray never calls the Kubernetes API. (Cloud IAM does not need this token either: IRSA
  # projects its own, GKE workload identity uses the metadata server.)
  automountServiceAccountToken: false
  {{- with $root.Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $root.Values.image.pullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  securityContext:
    {{- include "alexnet-train.podSecurityContext" $root | nindent 4 }}
  {{- with $group.terminationGracePeriodSeconds }}
  terminationGracePeriodSeconds: {{ . }}
  {{- end }}
  {{- with $group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    # KubeRay treats the first container as Ray's and gives it its `ray start` command.
    - name: {{ .containerName }}
      {{- include "alexnet-train.image" $root | nindent 6 }}
      # The image's WORKDIR is read-only here; anything written to a relative path lands in /tmp.
      workingDir: /tmp
      env:
        # Ray starts training workers at nice 15, below its own daemons; on these pods training
        # is the point (job/train.py sets the same for a local cluster).
        - name: RAY_worker_niceness
          value: "0"
        {{- if $group.terminationGracePeriodSeconds }}
        # Where a training worker marks that its preemption checkpoint is saved (the preStop hook waits for it).
        - name: ALEXNET_JOB_PREEMPTION_MARKER
          value: /tmp/alexnet-job-preemption-checkpoint
        {{- end }}
        {{- if or (eq .component "ray-head") $group.terminationGracePeriodSeconds }}
        # On SIGTERM `ray start` drains its node and waits up to this long (Ray's default: 30 s)
        # for the raylet to go idle, which a training node never does. The head has nothing to
        # drain (the cluster ends with it) and the preStop hook has drained a worker already:
        # without this, a cancelled job trains on for 30 s (measured: the head pod took 31 s to
        # go) and an evicted worker outlives its checkpoint by as much.
        - name: RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S
          value: "0"
        {{- end }}
        {{- include "alexnet-train.storageEnv" $root | nindent 8 }}
        {{- with $root.Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with include "alexnet-train.storageEnvFrom" $root }}
      envFrom:
        {{- . | nindent 8 }}
      {{- end }}
      resources:
        {{- include "alexnet-train.resources" (dict "cpu" $group.cpu "memory" $group.memory "gpus" .gpus "gpuResource" $root.Values.workers.gpuResource) | nindent 8 }}
      securityContext:
        {{- include "alexnet-train.containerSecurityContext" $root | nindent 8 }}
      {{- with $group.terminationGracePeriodSeconds }}
      # Kubernetes runs this before it sends SIGTERM (an eviction, a spot reclaim, a drain):
      # Ray marks the node as being preempted, every training worker sees it at its next
      # check (preemption_check_steps) and the run checkpoints while all workers are alive.
      # The hook keeps the pod up until the worker here marks that checkpoint saved (then 5 s
      # more, for Ray Train's controller to collect its report: it polls every 2 s), until no
      # training worker runs here (an idle or finished cluster goes at once), or until the
      # grace period less 10 s has passed (a clock, not a count: `ray drain-node` itself takes
      # seconds). The run resumes from that checkpoint elsewhere.
      lifecycle:
        preStop:
          exec:
            command:
              - /bin/sh
              - -c
              - >-
                end=$(($(date +%s) + {{ sub . 10 }}));
                rm -f "$ALEXNET_JOB_PREEMPTION_MARKER";
                ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION
                --reason-message "Kubernetes is terminating pod $HOSTNAME"
                --deadline-remaining-seconds {{ sub . 5 }};
                while [ "$(date +%s)" -lt "$end" ]; do
                if [ -e "$ALEXNET_JOB_PREEMPTION_MARKER" ]; then sleep 5; break; fi;
                grep -qs '[R]ayTrainWorker' /proc/[0-9]*/cmdline || break;
                sleep 1; done
      {{- end }}
      volumeMounts:
        # The driver (`alexnet-job train`, started on the head) reads it; mounted on every
        # Ray pod so head and workers stay one template.
        - name: config
          mountPath: /etc/alexnet-job
          readOnly: true
        - name: dshm
          mountPath: /dev/shm
        - name: tmp
          mountPath: /tmp
  volumes:
    - name: config
      configMap:
        name: {{ include "alexnet-train.fullname" $root }}
        items:
          - key: config.yaml
            path: config.yaml
    # Ray's object store and NCCL live in /dev/shm; a container runtime's default is 64 MiB.
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $group.shmSize }}
    {{- include "alexnet-train.tmpVolume" $group.tmpSize | nindent 4 }}
{{- end }}

{{/* Default worker affinity: one worker pod of a RayCluster per node (matchLabelKeys scopes it to this run's cluster). */}}
{{- define "alexnet-train.workerAffinity" -}}
{{- if .Values.workers.affinity }}
{{- toYaml .Values.workers.affinity }}
{{- else if .Values.workers.onePodPerNode }}
podAntiAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    - topologyKey: kubernetes.io/hostname
      labelSelector:
        matchLabels:
          {{- include "alexnet-train.selectorLabels" . | nindent 10 }}
          app.kubernetes.io/component: ray-worker
      matchLabelKeys:
        - ray.io/cluster
{{- end }}
{{- end }}

{{/*
The RayJob's spec. Takes (dict "root" $ "scheduled" bool).

Scheduled RayJobs (CronJob or RayCronJob) carry no --run-name: one template makes every run,
and a fixed name would make the second night return the first night's finished run. The
CronJob's `alexnet-job submit --generate-name` names the run after the RayJob it creates, so
that RayJob's retries resume; under RayCronJob the CLI names the run
(`<model>-<UTC time>`) when it starts.
*/}}
{{- define "alexnet-train.rayJobSpec" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $args := include "alexnet-train.trainArgs" . | fromYamlArray -}}
entrypoint: {{ prepend $args "alexnet-job" | join " " | quote }}
shutdownAfterJobFinishes: {{ $v.job.shutdownAfterJobFinishes }}
ttlSecondsAfterFinished: {{ $v.job.ttlSecondsAfterFinished }}
{{- with $v.job.activeDeadlineSeconds }}
activeDeadlineSeconds: {{ . }}
{{- end }}
backoffLimit: {{ $v.job.backoffLimit }}
# A separate submitter pod runs `ray job submit` against the head's dashboard (KubeRay fills in
# its command). It needs neither the API, nor S3, nor the config. It is placed as the head is: a
# pool whose nodes are all tainted or selected must take it too.
submissionMode: K8sJobMode
submitterConfig:
  backoffLimit: {{ $v.job.submitter.backoffLimit }}
submitterPodTemplate:
  metadata:
    labels:
      {{- include "alexnet-train.selectorLabels" $root | nindent 6 }}
      app.kubernetes.io/component: submitter
  spec:
    restartPolicy: Never
    serviceAccountName: {{ include "alexnet-train.serviceAccountName" $root }}
    automountServiceAccountToken: false
    {{- with $v.priorityClassName }}
    priorityClassName: {{ . }}
    {{- end }}
    {{- with $v.image.pullSecrets }}
    imagePullSecrets:
      {{- range . }}
      - name: {{ . }}
      {{- end }}
    {{- end }}
    securityContext:
      {{- include "alexnet-train.podSecurityContext" $root | nindent 6 }}
    {{- with include "alexnet-train.headPlacement" $root }}
    {{- . | nindent 4 }}
    {{- end }}
    containers:
      - name: ray-job-submitter
        {{- include "alexnet-train.image" $root | nindent 8 }}
        env:
          - name: HOME
            value: /tmp
        resources:
          {{- include "alexnet-train.resources" (dict "cpu" $v.job.submitter.cpu "memory" $v.job.submitter.memory) | nindent 10 }}
        securityContext:
          {{- include "alexnet-train.containerSecurityContext" $root | nindent 10 }}
        volumeMounts:
          - name: tmp
            mountPath: /tmp
    volumes:
      {{- include "alexnet-train.tmpVolume" "1Gi" | nindent 6 }}
rayClusterSpec:
  rayVersion: {{ $v.rayVersion | quote }}
  {{- if eq $v.rayAuth.mode "token" }}
  # KubeRay makes the token and sets RAY_AUTH_MODE/RAY_AUTH_TOKEN in every Ray container and the
  # submitter; the driver, Ray Train, `ray job submit` and the preStop hook's drain all use them.
  authOptions:
    mode: token
  {{- end }}
  headGroupSpec:
    {{- with $v.head.rayStartParams }}
    rayStartParams:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    template:
      {{- include "alexnet-train.rayPodTemplate" (dict "root" $root "group" $v.head "component" "ray-head" "containerName" "ray-head" "gpus" 0 "affinity" $v.head.affinity) | nindent 6 }}
  workerGroupSpecs:
    # A static gang: MultiWorkerMirroredStrategy needs every worker from the start, so the
    # group neither grows nor shrinks.
    - groupName: workers
      replicas: {{ $v.workers.replicas }}
      minReplicas: {{ $v.workers.replicas }}
      maxReplicas: {{ $v.workers.replicas }}
      {{- with $v.workers.rayStartParams }}
      rayStartParams:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      template:
        {{- include "alexnet-train.rayPodTemplate" (dict "root" $root "group" $v.workers "component" "ray-worker" "containerName" "ray-worker" "gpus" $v.workers.gpus "affinity" (include "alexnet-train.workerAffinity" $root | fromYaml)) | nindent 8 }}
{{- end }}

{{/* RayJob labels beyond the standard ones: component, Kueue's queue, the user's. */}}
{{- define "alexnet-train.rayJobLabels" -}}
app.kubernetes.io/component: training
{{- with .Values.job.queueName }}
kueue.x-k8s.io/queue-name: {{ . }}
{{- end }}
{{- with .Values.job.labels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The schedule's RayJob manifest, stored in the ConfigMap for `alexnet-job submit --manifest`.
Not a Helm object (it carries no helm.sh/chart or managed-by label); the schedule label lets
`alexnet-job prune --selector` find the RayJobs made from it.
*/}}
{{- define "alexnet-train.scheduledRayJob" -}}
apiVersion: ray.io/v1
kind: RayJob
metadata:
  name: {{ include "alexnet-train.fullname" . }}
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "alexnet-train.selectorLabels" . | nindent 4 }}
    {{- include "alexnet-train.scheduleLabel" . | nindent 4 }}
    {{- include "alexnet-train.rayJobLabels" . | nindent 4 }}
spec:
  {{- include "alexnet-train.rayJobSpec" (dict "root" . "scheduled" true) | nindent 2 }}
{{- end }}

{{/*
Settings that JSON Schema cannot check because they span several values. Each fails the
render with one line that says what to change.
*/}}
{{- define "alexnet-train.validate" -}}
{{- $name := include "alexnet-train.fullname" . }}
{{- /* KubeRay: a RayJob name is a DNS-1035 label of at most 47 characters; a scheduled one gets a 6-character suffix. */}}
{{- $max := ternary 41 47 (not (empty .Values.schedule)) }}
{{- if gt (len $name) $max }}
{{- fail (printf "the RayJob name %q (the full name) is %d characters; KubeRay allows %d here: set fullnameOverride or use a shorter release name" $name (len $name) $max) }}
{{- end }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) }}
{{- fail (printf "the RayJob name %q (the full name) must start with a letter and hold only a-z, 0-9 and '-': set fullnameOverride" $name) }}
{{- end }}
{{- /* The CLI checks this too (job/config.py), but only once the whole GPU gang is up; fail at install instead. */}}
{{- with .Values.training.batch_size }}
{{- $replicas := mul (int64 $.Values.workers.replicas) (max 1 (int64 $.Values.workers.gpus)) }}
{{- if mod (int64 .) $replicas }}
{{- fail (printf "training.batch_size %d does not divide across %d replicas (workers.replicas %d x %d GPUs); use a multiple of %d" (int64 .) $replicas (int64 $.Values.workers.replicas) (max 1 (int64 $.Values.workers.gpus)) $replicas) }}
{{- end }}
{{- end }}
{{- with .Values.training.data_cache }}
{{- if and $.Values.securityContext.readOnlyRootFilesystem (not (hasPrefix "/tmp/" (clean .))) }}
{{- fail (printf "training.data_cache %q is outside /tmp, the only folder the worker pods can write (securityContext.readOnlyRootFilesystem); use a folder under /tmp such as /tmp/data-cache (it counts against workers.tmpSize)" .) }}
{{- end }}
{{- end }}
{{- if and .Values.job.queueName (not .Values.job.shutdownAfterJobFinishes) }}
{{- fail "job.queueName (Kueue) needs job.shutdownAfterJobFinishes: true, or the RayCluster would hold its quota forever" }}
{{- end }}
{{- if and .Values.schedule .Values.cron.useRayCronJob .Values.job.queueName }}
{{- fail "job.queueName cannot be used with cron.useRayCronJob: a RayCronJob cannot label the RayJobs it makes; use the CronJob (cron.useRayCronJob: false)" }}
{{- end }}
{{- end }}
