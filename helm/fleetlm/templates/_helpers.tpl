{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "fleetlm.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's full name: the release name, or release-chart when they differ. */}}
{{- define "fleetlm.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "fleetlm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select the operator pods; never change them (Deployment selectors are immutable). */}}
{{- define "fleetlm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fleetlm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "fleetlm.labels" -}}
{{ include "fleetlm.selectorLabels" . }}
app.kubernetes.io/part-of: fleetlm
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ include "fleetlm.chart" . }}
{{- end -}}

{{- define "fleetlm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fleetlm.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "fleetlm.image" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) -}}
{{- end -}}

{{/*
Least privilege: exactly the verbs the operator uses on the objects it manages. It deletes only the
router's objects when spec.router is switched off (owner references let the garbage collector remove
every other child), never lists Secrets, and touches no other kinds.
*/}}
{{- define "fleetlm.managedRules" }}
- apiGroups: ["fleetlm.dev"]
  resources: ["llmservices"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["fleetlm.dev"]
  resources: ["llmservices/status"]
  verbs: ["get", "patch"]
# Held so the operator may grant them to a service's router (RBAC forbids granting what one lacks):
# the router reads its replicas from EndpointSlices and asks for a replica through /scale.
- apiGroups: ["fleetlm.dev"]
  resources: ["llmservices/scale"]
  verbs: ["get", "patch"]
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps", "serviceaccounts"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]  # the router's own Role (endpointslices, this service's /scale)
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["inference.networking.k8s.io"]
  resources: ["inferencepools"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["llm-d.ai", "inference.networking.x-k8s.io"]
  resources: ["inferenceobjectives"]
  verbs: ["get", "create", "patch"]
- apiGroups: [""]
  resources: ["secrets"]  # the admin-token Secret: read back and created once; never listed
  verbs: ["get", "create"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# spec.model.cache: the claim (created once; its owner reference follows whenDeleted), the fill Job
# (watched for progress), and the fill's ServiceAccount with a Role to patch that one Job (granting it
# needs the operator to hold get/patch on jobs itself).
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "create", "patch"]
{{- end }}
