{{/* The prefix of every object's name. */}}
{{- define "fleetgate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else if contains "fleetgate" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-fleetgate" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "fleetgate.labels" -}}
app.kubernetes.io/name: fleetgate
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fleetgate
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Labels of the embedded NATS server's objects: not app.kubernetes.io/name fleetgate, so that
     no fleetgate selector picks them up. */}}
{{- define "fleetgate.natsLabels" -}}
app.kubernetes.io/name: nats
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fleetgate
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The labels that select every fleetgate pod of this release. */}}
{{- define "fleetgate.selector" -}}
app.kubernetes.io/name: fleetgate
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* A service's values over the defaults. Call with (list $ $name $spec); returns YAML. */}}
{{- define "fleetgate.service" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
{{- $spec := index . 2 | default dict -}}
{{- $merged := mustMergeOverwrite (deepCopy $root.Values.defaults) (deepCopy $spec) -}}
{{- $_ := set $merged "name" $name -}}
{{- if not (hasKey $merged "command") -}}{{- $_ := set $merged "command" $name -}}{{- end -}}
{{- if not (hasKey $merged "enabled") -}}{{- $_ := set $merged "enabled" true -}}{{- end -}}
{{- toYaml $merged -}}
{{- end -}}

{{/* The NATS URL fleetgate connects to. */}}
{{- define "fleetgate.natsUrl" -}}
{{- if .Values.nats.url -}}
{{- .Values.nats.url -}}
{{- else if .Values.nats.embedded.enabled -}}
{{- printf "nats://%s-nats:4222" (include "fleetgate.fullname" .) -}}
{{- else -}}
{{- fail "nats.url is empty and nats.embedded.enabled is false: fleetgate's services need NATS" -}}
{{- end -}}
{{- end -}}

{{/* The image reference. */}}
{{- define "fleetgate.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
