{{/*
Names, labels and the few shared pieces. The RayJob spec and the Ray pod template live in
_rayjob.tpl; everything that builds a pod takes its security context and S3 settings from here.
*/}}

{{- define "alexnet-train.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The full name names every object, the RayJob included (so its length is checked below). */}}
{{- define "alexnet-train.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "alexnet-train.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "alexnet-train.selectorLabels" -}}
app.kubernetes.io/name: {{ include "alexnet-train.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of the objects Helm manages (not of the RayJobs the schedule creates: Helm does not own those). */}}
{{- define "alexnet-train.labels" -}}
helm.sh/chart: {{ include "alexnet-train.chart" . }}
{{ include "alexnet-train.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Label that marks the RayJobs of this release's schedule; `alexnet-job prune --selector` uses it. */}}
{{- define "alexnet-train.scheduleLabel" -}}
alexnet-job/schedule: {{ include "alexnet-train.fullname" . }}
{{- end }}

{{- define "alexnet-train.serviceAccountName" -}}
{{- default (include "alexnet-train.fullname" .) .Values.serviceAccount.name }}
{{- end }}

{{- define "alexnet-train.retrainName" -}}
{{- printf "%s-retrain" (include "alexnet-train.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{/* The one image, shared by head, workers, submitter, the schedule's pod and the test pod. */}}
{{- define "alexnet-train.image" -}}
image: {{ printf "%s:%s" .Values.image.repository .Values.image.tag | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
{{- end }}

{{/* Where runs are written: the CLI's `output` (runs land in <output>/runs/<run name>/). */}}
{{- define "alexnet-train.output" -}}
{{- if .Values.s3.prefix }}
{{- printf "s3://%s/%s" .Values.s3.bucket .Values.s3.prefix }}
{{- else }}
{{- printf "s3://%s" .Values.s3.bucket }}
{{- end }}
{{- end }}

{{- define "alexnet-train.runName" -}}
{{- default (include "alexnet-train.fullname" .) .Values.runName }}
{{- end }}

{{/*
`alexnet-job train` arguments, as a YAML list: the RayJob's entrypoint and the test pod's
command are both made from it. Takes (dict "root" $ "scheduled" bool). A one-off RayJob gets
the release's fixed run name, so a retry resumes; a scheduled RayJob gets none, since one
template makes every night's RayJob (see the `submit` note in _rayjob.tpl).
*/}}
{{- define "alexnet-train.trainArgs" -}}
{{- $args := list "train" "--config" "/etc/alexnet-job/config.yaml" "--address" "auto" }}
{{- if not .scheduled }}
{{- $args = concat $args (list "--run-name" (include "alexnet-train.runName" .root)) }}
{{- end }}
{{- toYaml $args }}
{{- end }}

{{/* Pod-level security: non-root with a fixed UID, RuntimeDefault seccomp (Pod Security "restricted"). */}}
{{- define "alexnet-train.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "alexnet-train.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: {{ .Values.securityContext.readOnlyRootFilesystem }}
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* requests = limits (Guaranteed QoS: a gang member is not evicted first). Takes (dict "cpu" "memory" ["gpus" "gpuResource"]). */}}
{{- define "alexnet-train.resources" -}}
{{- $res := dict "cpu" (toString .cpu) "memory" (toString .memory) }}
{{- if .gpus }}
{{- $_ := set $res .gpuResource (toString .gpus) }}
{{- end -}}
requests:
  {{- toYaml $res | nindent 2 }}
limits:
  {{- toYaml $res | nindent 2 }}
{{- end }}

{{/*
Environment of every pod that reads or writes S3 (Ray head and workers, the schedule's pod), as
EnvVar list items. HOME points into the /tmp emptyDir because the root filesystem is read-only
(Keras caches downloads under ~/.keras, matplotlib its config under ~/.config).
*/}}
{{- define "alexnet-train.storageEnv" -}}
- name: HOME
  value: /tmp
{{- with .Values.s3.endpoint }}
- name: AWS_ENDPOINT_URL_S3
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.region }}
- name: AWS_REGION
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/* S3 keys come only from an existing Secret (never from values), as EnvFromSource list items; empty without one. */}}
{{- define "alexnet-train.storageEnvFrom" -}}
{{- with .Values.s3.existingSecret -}}
- secretRef:
    name: {{ . }}
{{- end }}
{{- end }}

{{/* A /tmp emptyDir, size-limited, for pods whose root filesystem is read-only. */}}
{{- define "alexnet-train.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ . }}
{{- end }}

{{/* Placement of the pods that run beside the head (the RayJob's submitter, the schedule's pod,
     the `helm test` pod): the head's nodeSelector, tolerations and affinity. A pool whose nodes
     are all tainted or selected must take them too, or they are never scheduled. */}}
{{- define "alexnet-train.headPlacement" -}}
{{- with .Values.head.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.head.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.head.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
