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

{{/* Non-empty when a service (call with (list $ $svc)) keeps data in the embedded store: it has
     `storage.enabled` and no `postgres` Secret is set. */}}
{{- define "fleetgate.embeddedStore" -}}
{{- $root := index . 0 -}}
{{- $svc := index . 1 -}}
{{- if and $svc.storage $svc.storage.enabled (not $root.Values.postgres.existingSecret) -}}true{{- end -}}
{{- end -}}

{{/* fleetgate's settings as rendered into service-config.yml: the `config` value, with what is
     left unset derived from the services enabled: gateway.extensions (dcx, and cmx when a cmx
     service runs) and dcx.reliable_receivers (epts when an epts service runs). */}}
{{- define "fleetgate.config" -}}
{{- $root := . -}}
{{- $config := deepCopy .Values.config -}}
{{- if $config.nats }}{{- if $config.nats.url }}
{{- fail "set nats.url (the chart value), not config.nats.url: the chart passes it as FLEETGATE_NATS_URL" }}
{{- end }}{{- end }}
{{- if and $config.storage (not .Values.configSecret) }}{{- if $config.storage.postgres }}{{- if $config.storage.postgres.url }}
{{- fail "config.storage.postgres.url would put the database password in the ConfigMap: name a Secret in postgres.existingSecret instead" }}
{{- end }}{{- end }}{{- end }}
{{- $commands := list -}}
{{- range $name, $spec := .Values.services -}}
{{- $svc := include "fleetgate.service" (list $root $name $spec) | fromYaml -}}
{{- if $svc.enabled }}{{ $commands = append $commands $svc.command }}{{ end -}}
{{- end -}}
{{- $gateway := $config.gateway | default dict -}}
{{- $dcx := $config.dcx | default dict -}}
{{- $epts := (($config.epts | default dict).instance) | default "epts" -}}
{{- $cmx := (($config.cmx | default dict).instance) | default "cmx" -}}
{{- if not (hasKey $gateway "extensions") -}}
{{- $extensions := list (($dcx.instance) | default "dcx") -}}
{{- if has "cmx" $commands }}{{ $extensions = append $extensions $cmx }}{{ end -}}
{{- $_ := set $gateway "extensions" $extensions -}}
{{- end -}}
{{- if not (hasKey $dcx "reliable_receivers") -}}
{{- $_ := set $dcx "reliable_receivers" (ternary (list $epts) (list) (has "epts" $commands)) -}}
{{- else if and (has $epts $dcx.reliable_receivers) (not (has "epts" $commands)) -}}
{{- fail (printf "config.dcx.reliable_receivers lists %s, but no epts service is enabled: devices would get 504" $epts) -}}
{{- end -}}
{{- $_ := set $config "gateway" $gateway -}}
{{- $_ := set $config "dcx" $dcx -}}
{{- toYaml $config -}}
{{- end -}}
