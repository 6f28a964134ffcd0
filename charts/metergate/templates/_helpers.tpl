{{/*
Names and labels.
*/}}
{{- define "metergate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "metergate.fullname" -}}
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

{{- define "metergate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "metergate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "metergate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "metergate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "metergate.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "metergate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "metergate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "metergate.terminationGracePeriodSeconds" -}}
{{- add (int .Values.drainDeadlineSeconds) 15 }}
{{- end }}

{{/*
Settings files. Secrets appear only as ${NAME} references, expanded by metergate from the environment
variables that "metergate.secretEnv" defines.
*/}}
{{- define "metergate.commonSettings" -}}
host: 0.0.0.0
port: {{ .Values.port }}
drain_deadline_s: {{ .Values.drainDeadlineSeconds }}
{{- with .Values.publicUrl }}
public_url: {{ . | quote }}
{{- end }}
{{- if not .Values.database.existingSecret.name }}
database_url: {{ .Values.database.url | default "sqlite:////var/lib/metergate/metergate.db" | quote }}
{{- end }}
{{- if eq (toString .Values.redis.wallet) "true" }}
redis_wallet: true
{{- end }}
# Bills the store did not take yet, journaled on the pod's own volume (an emptyDir outlives a container restart).
settlement_spool_dir: /var/lib/metergate/settlements
pricing:
  {{- toYaml .Values.pricing | nindent 2 }}
{{- if and .Values.portalSecrets.existingSecret .Values.portalSecrets.keys }}
portal_secrets:
{{- range $index, $entry := .Values.portalSecrets.keys }}
  {{ $entry.id }}: "${MG_PORTAL_SECRET_{{ $index }}}"
{{- end }}
{{- end }}
{{- with .Values.settings }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The secretSettings entries meant for a role, as ${MG_SETTING_<n>} references. Call with (dict "root" $ "role" ...).
*/}}
{{- define "metergate.secretSettings" -}}
{{- $role := .role }}
{{- range $index, $entry := .root.Values.secretSettings }}
{{- if has $role ($entry.roles | default (list "control")) }}
{{ $entry.setting }}: "${MG_SETTING_{{ $index }}}"
{{- end }}
{{- end }}
{{- end }}

{{- define "metergate.sidecarSettings" -}}
{{ include "metergate.commonSettings" . }}
routes:
{{- range $index, $route := .Values.routes }}
  - prefix: {{ $route.prefix | quote }}
    upstream: {{ $route.upstream | quote }}
    provider: {{ $route.provider | default "openai" | quote }}
    provider_id: {{ $route.providerId | default "openai" | quote }}
    {{- if and $route.apiKeySecret $route.apiKeySecret.name }}
    api_key: "${MG_ROUTE_{{ $index }}_API_KEY}"
    {{- end }}
{{- else }} []
{{- end }}
{{- include "metergate.secretSettings" (dict "root" . "role" "sidecar") }}
{{- end }}

{{- define "metergate.controlSettings" -}}
{{ include "metergate.commonSettings" . }}
{{- if and .Values.adminKeys.existingSecret .Values.adminKeys.keys }}
admin_keys:
{{- range $index, $key := .Values.adminKeys.keys }}
  - "${MG_ADMIN_KEY_{{ $index }}}"
{{- end }}
{{- end }}
{{- include "metergate.secretSettings" (dict "root" . "role" "control") }}
{{- end }}

{{/*
Environment: secrets by reference. Call with (dict "root" $ "role" "sidecar"|"control").
*/}}
{{- define "metergate.secretEnv" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- if $v.database.existingSecret.name }}
- name: METERGATE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $v.database.existingSecret.name }}
      key: {{ $v.database.existingSecret.key }}
{{- end }}
{{- if $v.redis.existingSecret.name }}
- name: METERGATE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $v.redis.existingSecret.name }}
      key: {{ $v.redis.existingSecret.key }}
{{- else if $v.redis.url }}
- name: METERGATE_REDIS_URL
  value: {{ $v.redis.url | quote }}
{{- end }}

{{- if $v.portalSecrets.existingSecret }}
{{- range $index, $entry := $v.portalSecrets.keys }}
- name: MG_PORTAL_SECRET_{{ $index }}
  valueFrom:
    secretKeyRef:
      name: {{ $v.portalSecrets.existingSecret }}
      key: {{ $entry.key }}
{{- end }}
{{- end }}
{{- if eq .role "sidecar" }}
{{- range $index, $route := $v.routes }}
{{- if and $route.apiKeySecret $route.apiKeySecret.name }}
- name: MG_ROUTE_{{ $index }}_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $route.apiKeySecret.name }}
      key: {{ $route.apiKeySecret.key | default "api-key" }}
{{- end }}
{{- end }}
{{- end }}
{{- $role := .role }}
{{- range $index, $entry := $v.secretSettings }}
{{- if has $role ($entry.roles | default (list "control")) }}
- name: MG_SETTING_{{ $index }}
  valueFrom:
    secretKeyRef:
      name: {{ $entry.secret.name }}
      key: {{ $entry.secret.key }}
{{- end }}
{{- end }}
{{- if and (eq .role "control") $v.adminKeys.existingSecret }}
{{- range $index, $key := $v.adminKeys.keys }}
- name: MG_ADMIN_KEY_{{ $index }}
  valueFrom:
    secretKeyRef:
      name: {{ $v.adminKeys.existingSecret }}
      key: {{ $key }}
{{- end }}
{{- end }}
{{- end }}

{{/*
One metergate container. Call with (dict "root" $ "role" "sidecar"|"control" "resources" ...).
*/}}
{{- define "metergate.container" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
name: metergate
image: {{ include "metergate.image" $root | quote }}
imagePullPolicy: {{ $v.image.pullPolicy }}
args:
  - --config
  - /etc/metergate/{{ .role }}.yaml
  - --role
  - {{ .role }}
  - --log-format
  - {{ $v.logFormat }}
  - --log-level
  - {{ $v.logLevel }}
ports:
  - name: metergate
    containerPort: {{ $v.port }}
    protocol: TCP
{{- $env := include "metergate.secretEnv" (dict "root" $root "role" .role) | trim }}
{{- if $env }}
env:
  {{- $env | nindent 2 }}
{{- end }}
readinessProbe:
  httpGet:
    path: /readyz
    port: metergate
  periodSeconds: 5
  timeoutSeconds: 2
  failureThreshold: 3
livenessProbe:
  httpGet:
    path: /livez
    port: metergate
  periodSeconds: 10
  timeoutSeconds: 2
  failureThreshold: 3
resources:
  {{- toYaml .resources | nindent 2 }}
securityContext:
  {{- toYaml $v.securityContext | nindent 2 }}
volumeMounts:
  - name: metergate-config
    mountPath: /etc/metergate
    readOnly: true
  - name: metergate-data
    mountPath: /var/lib/metergate
  - name: metergate-tmp
    mountPath: /tmp
{{- end }}

{{/*
The metergate sidecar, for a pod's `initContainers` (a native sidecar: restartPolicy Always, Kubernetes
1.29+). Its startup probe holds the pod's app containers back until the proxy answers, so an app never
meets a cold proxy; on termination it is stopped after the app. Use with "metergate.sidecarVolumes":

  spec:
    initContainers:
      {{- include "metergate.sidecar" . | nindent 6 }}       # this chart, or .Subcharts.metergate from yours
    volumes:
      {{- include "metergate.sidecarVolumes" . | nindent 6 }}

The app reaches the proxy at http://127.0.0.1:<port><route prefix>/v1 and names the paying customer with
the X-Metergate-Customer header. The pod's terminationGracePeriodSeconds should exceed drainDeadlineSeconds.
*/}}
{{- define "metergate.sidecar" -}}
- {{ include "metergate.container" (dict "root" . "role" "sidecar" "resources" .Values.sidecar.resources) | trim | nindent 2 | trim }}
  restartPolicy: Always
  startupProbe:
    httpGet:
      path: /livez
      port: metergate
    periodSeconds: {{ .Values.sidecar.startupProbe.periodSeconds }}
    timeoutSeconds: 1
    failureThreshold: {{ .Values.sidecar.startupProbe.failureThreshold }}
{{- end }}

{{- define "metergate.sidecarVolumes" -}}
- name: metergate-config
  configMap:
    name: {{ include "metergate.fullname" . }}-config
- name: metergate-data
  emptyDir: {}
- name: metergate-tmp
  emptyDir:
    medium: Memory
    sizeLimit: 16Mi
{{- end }}
