{{/* Common labels; app.kubernetes.io/name=kubearch is the project's selector convention. */}}
{{- define "kubearch.labels" -}}
app.kubernetes.io/name: kubearch
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kubearch.operatorSelector" -}}
app.kubernetes.io/name: kubearch
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubearch.fullname" -}}
{{- if eq .Release.Name "kubearch" -}}kubearch-operator{{- else -}}{{ printf "%s-kubearch-operator" .Release.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "kubearch.operatorImage" -}}
{{ .Values.operator.image.repository }}:{{ .Values.operator.image.tag | default .Chart.AppVersion }}
{{- end -}}
