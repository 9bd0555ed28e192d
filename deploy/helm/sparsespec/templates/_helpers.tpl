{{/* Names and labels. */}}
{{- define "sparsespec.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sparsespec.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "sparsespec.labels" -}}
{{ include "sparsespec.selector" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{/* The pools this chart knows; anything else in values is refused by values.schema.json. */}}
{{- define "sparsespec.pools" -}}verifier drafter{{- end -}}

{{/* The Secret holding the Redis password (ours, or the user's existing one). */}}
{{- define "sparsespec.redisSecret" -}}
{{- if .Values.redis.auth.existingSecret -}}
{{- .Values.redis.auth.existingSecret -}}
{{- else -}}
{{- printf "%s-redis" (include "sparsespec.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the API keys (ours, from apiKeys.keys, or apiKeys.existingSecret). */}}
{{- define "sparsespec.apiKeysSecret" -}}
{{- if .Values.apiKeys.existingSecret -}}
{{- .Values.apiKeys.existingSecret -}}
{{- else -}}
{{- printf "%s-api-keys" (include "sparsespec.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* redis://[:$(REDIS_PASSWORD)@]HOST:PORT/DB; Kubernetes expands $(REDIS_PASSWORD) from the env. */}}
{{- define "sparsespec.redisUrl" -}}
{{- $r := .Values.redis -}}
{{- $host := printf "%s-redis" (include "sparsespec.fullname" .) -}}
{{- $port := 6379 -}}
{{- $db := 0 -}}
{{- $scheme := "redis" -}}
{{- if not $r.bundled -}}
{{- $host = required "redis.external.host is required when redis.bundled is false (or set redis.bundled: true)" $r.external.host -}}
{{- $port = $r.external.port -}}
{{- $db = $r.external.db -}}
{{- if $r.external.tls }}{{ $scheme = "rediss" }}{{ end -}}
{{- end -}}
{{- $auth := "" -}}
{{- if $r.auth.enabled }}{{ $auth = ":$(REDIS_PASSWORD)@" }}{{ end -}}
{{- printf "%s://%s%s:%v/%v" $scheme $auth $host $port $db -}}
{{- end -}}

{{/* Render-time checks that a schema cannot express; each fails with the value's path. */}}
{{- define "sparsespec.validate" -}}
{{- $_ := required "model.path is required: the model directory or .gguf file inside the container (e.g. /models/llama-3.1-8b on model.volume)" .Values.model.path -}}
{{- if lt (int .Values.verifier.replicas) 1 -}}
{{- fail (printf "verifier.replicas must be >= 1 (a release without verifiers cannot generate), got %v" .Values.verifier.replicas) -}}
{{- end -}}
{{- range $pool := splitList " " (include "sparsespec.pools" .) -}}
{{- $p := index $.Values $pool -}}
{{- range $flag, $_ := $p.args -}}
{{- if has $flag (list "model" "redis" "host" "port" "worker-id" "device" "dtype" "max-context" "drain-s" "api-keys" "tls-cert" "tls-key" "tls-client-ca" "drafter-tls-ca" "drafter-tls-cert" "drafter-tls-key" "drafter-tls-server-name" "health-port" "metrics-port") -}}
{{- fail (printf "%s.args.%s is set by the chart (model.*, redis.*, apiKeys.*, tls.*, metrics.*, %s.port, %s.gpu, verifier.drainSeconds); remove it" $pool $flag $pool $pool) -}}
{{- end -}}
{{- end -}}
{{- if $p.autoscaling.enabled -}}
{{- if gt (int $p.autoscaling.minReplicas) (int $p.autoscaling.maxReplicas) -}}
{{- fail (printf "%s.autoscaling.minReplicas (%v) must be <= maxReplicas (%v)" $pool $p.autoscaling.minReplicas $p.autoscaling.maxReplicas) -}}
{{- end -}}
{{- if not (and $p.resources.requests $p.resources.requests.cpu) -}}
{{- fail (printf "%s.resources.requests.cpu is required when %s.autoscaling.enabled (the HPA scales on CPU utilization)" $pool $pool) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if lt (int .Values.verifier.autoscaling.minReplicas) 1 -}}
{{- fail (printf "verifier.autoscaling.minReplicas must be >= 1, got %v" .Values.verifier.autoscaling.minReplicas) -}}
{{- end -}}
{{- if and .Values.apiKeys.enabled (not .Values.apiKeys.existingSecret) (not .Values.apiKeys.keys) -}}
{{- fail "apiKeys.keys or apiKeys.existingSecret is required when apiKeys.enabled" -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) -}}
{{- fail "tls.existingSecret is required when tls.enabled (a Secret with tls.crt, tls.key and ca.crt)" -}}
{{- end -}}
{{- if and .Values.tls.enabled (or (eq (int .Values.tls.healthPort) (int .Values.verifier.port)) (eq (int .Values.tls.healthPort) (int .Values.drafter.port))) -}}
{{- fail (printf "tls.healthPort (%v) must differ from verifier.port and drafter.port" .Values.tls.healthPort) -}}
{{- end -}}
{{- if and .Values.metrics.enabled (has (int .Values.metrics.port) (list (int .Values.verifier.port) (int .Values.drafter.port) (int .Values.tls.healthPort))) -}}
{{- fail (printf "metrics.port (%v) must differ from verifier.port, drafter.port and tls.healthPort" .Values.metrics.port) -}}
{{- end -}}
{{- if and .Values.redis.auth.enabled (not .Values.redis.auth.existingSecret) (not .Values.redis.auth.password) -}}
{{- fail "redis.auth.password or redis.auth.existingSecret is required when redis.auth.enabled" -}}
{{- end -}}
{{- end -}}
