{{/*
Base name of every namespaced object and of the ClusterRole/ClusterRoleBinding.
*/}}
{{- define "portcullis.fullname" -}}
{{- default "portcullis-operator" .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{/* Fixed names: the operator finds these objects by name (DESIGN.md §3). */}}
{{- define "portcullis.injectorName" -}}portcullis-injector{{- end -}}
{{- define "portcullis.validatorName" -}}portcullis-validator{{- end -}}
{{- define "portcullis.leaseName" -}}portcullis-operator{{- end -}}
{{- /* ApiKey Secret access, bound by the operator in each tenant namespace only. */ -}}
{{- define "portcullis.tenantSecretsRoleName" -}}{{ include "portcullis.fullname" . }}-tenant-secrets{{- end -}}

{{- define "portcullis.metricsServiceName" -}}
{{- printf "%s-metrics" (include "portcullis.fullname" .) -}}
{{- end -}}

{{- define "portcullis.serviceAccountName" -}}
{{- default (include "portcullis.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "portcullis.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: stable across upgrades (Deployment selectors are immutable). */}}
{{- define "portcullis.selectorLabels" -}}
app.kubernetes.io/name: portcullis
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* Standard labels on every object. */}}
{{- define "portcullis.labels" -}}
helm.sh/chart: {{ include "portcullis.chart" . }}
{{ include "portcullis.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: portcullis
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* image reference: repository@digest, else repository:tag (tag defaults to appVersion). */}}
{{- define "portcullis.image" -}}
{{- if .digest -}}
{{- printf "%s@%s" .repository .digest -}}
{{- else -}}
{{- printf "%s:%s" .repository (default .appVersion .tag) -}}
{{- end -}}
{{- end -}}

{{- define "portcullis.operatorImage" -}}
{{- include "portcullis.image" (merge (dict "appVersion" .Chart.AppVersion) .Values.operator.image) -}}
{{- end -}}

{{- define "portcullis.proxyImage" -}}
{{- include "portcullis.image" (merge (dict "appVersion" .Chart.AppVersion) .Values.proxy.image) -}}
{{- end -}}

{{/*
Namespaces the injector never touches: the configured list, plus kube-system and the
release namespace whatever the list says. Sorted and de-duplicated, as a list.
*/}}
{{- define "portcullis.excludedNamespaces" -}}
{{- $all := concat .Values.webhook.excludedNamespaces (list "kube-system" .Release.Namespace) -}}
{{- toJson (sortAlpha (uniq $all)) -}}
{{- end -}}

{{/* The audit collector's Service, StatefulSet and (operator-written) Secret <name>-tls. */}}
{{- define "portcullis.auditName" -}}portcullis-audit{{- end -}}

{{- define "portcullis.auditSelectorLabels" -}}
app.kubernetes.io/name: portcullis
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: audit
{{- end -}}

{{- define "portcullis.auditLabels" -}}
helm.sh/chart: {{ include "portcullis.chart" . }}
{{ include "portcullis.auditSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: portcullis
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}
