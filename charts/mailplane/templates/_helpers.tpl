{{/* Resource name prefix: "<release>-mailplane", or the release name if it contains the chart name. */}}
{{- define "mailplane.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "mailplane.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object the chart creates. */}}
{{- define "mailplane.labels" -}}
helm.sh/chart: {{ include "mailplane.chart" . }}
app.kubernetes.io/part-of: mailplane
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The operator's selector labels. `name` doubles as the Prometheus job (jobLabel). */}}
{{- define "mailplane.operator.selectorLabels" -}}
app.kubernetes.io/name: mailplane-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "mailplane.operator.labels" -}}
{{ include "mailplane.labels" . }}
app.kubernetes.io/name: mailplane-operator
app.kubernetes.io/component: operator
{{- end -}}

{{- define "mailplane.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (printf "%s-operator" (include "mailplane.fullname" .)) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "mailplane.relay.serviceAccountName" -}}
{{- default (printf "%s-relay" (include "mailplane.fullname" .)) .Values.relay.serviceAccount.name -}}
{{- end -}}

{{- define "mailplane.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* A custom resource from values: apiVersion, kind, name, labels, spec. */}}
{{- define "mailplane.customResource" -}}
apiVersion: mailplane.io/v1alpha1
kind: {{ .kind }}
metadata:
  name: {{ .name }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "mailplane.labels" .root | nindent 4 }}
spec:
  {{- toYaml .spec | nindent 2 }}
{{- end -}}

{{/* The operator's --relay-defaults: relay.pod and relay.service without the empty fields. */}}
{{- define "mailplane.relayDefaults" -}}
{{- $pod := dict -}}
{{- range $key := list "labels" "annotations" "nodeSelector" "tolerations" "affinity" "topologySpreadConstraints" "priorityClassName" -}}
{{- with index $.Values.relay.pod $key -}}
{{- $_ := set $pod $key . -}}
{{- end -}}
{{- end -}}
{{- with (.Values.relay.pod.imagePullSecrets | default .Values.imagePullSecrets) -}}
{{- $_ := set $pod "imagePullSecrets" . -}}
{{- end -}}
{{- $service := dict -}}
{{- range $key := list "type" "annotations" -}}
{{- with index $.Values.relay.service $key -}}
{{- $_ := set $service $key . -}}
{{- end -}}
{{- end -}}
{{- toJson (dict "pod" $pod "service" $service) -}}
{{- end -}}
