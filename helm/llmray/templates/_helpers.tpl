{{/* Names and labels shared by the templates. */}}

{{- define "llmray.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "llmray.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "llmray.labels" -}}
{{ include "llmray.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "llmray.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "llmray.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Exactly the API calls the operator makes (operator/llmray_operator/rbac.py; a test
     compares the two). No Secrets, Namespaces or CRDs: see docs/operator.md. */}}
{{- define "llmray.rules" -}}
- apiGroups: ["llmray.io"]
  resources: ["finetunejobs", "llmdeployments"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["llmray.io"]
  resources: ["finetunejobs/status", "llmdeployments/status"]
  verbs: ["patch"]
- apiGroups: ["llmray.io"]
  resources: ["finetunejobs/finalizers", "llmdeployments/finalizers"]
  verbs: ["update"]
- apiGroups: ["ray.io"]
  resources: ["rayjobs"]
  verbs: ["get", "list", "watch", "create"]
- apiGroups: ["ray.io"]
  resources: ["rayservices"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}
