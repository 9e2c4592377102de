{{- define "kbatch.fullname" -}}
{{- printf "%s" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kbatch.labels" -}}
app.kubernetes.io/name: kbatch
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kbatch.selector" -}}
app.kubernetes.io/name: kbatch
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kbatch.jobNamespace" -}}
{{- .Values.kubernetes.namespace | default .Release.Namespace -}}
{{- end -}}

{{- define "kbatch.notebookNamespace" -}}
{{- .Values.kubernetes.notebookNamespace | default .Release.Namespace -}}
{{- end -}}

{{- define "kbatch.secretName" -}}
{{- .Values.jupyterhub.existingSecret | default (printf "%s-hub-token" (include "kbatch.fullname" .)) -}}
{{- end -}}

{{- define "kbatch.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "kbatch.transferUrl" -}}
{{- .Values.uploads.transferUrl | default (printf "http://%s.%s.svc:%v/services/%s" (include "kbatch.fullname" .) .Release.Namespace .Values.service.port .Values.jupyterhub.serviceName) -}}
{{- end -}}

{{- define "kbatch.uploadsClaim" -}}
{{- .Values.uploads.existingClaim | default (printf "%s-uploads" (include "kbatch.fullname" .)) -}}
{{- end -}}
