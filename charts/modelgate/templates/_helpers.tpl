{{- define "modelgate.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "modelgate.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "modelgate.operatorSelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "modelgate.proxySelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: proxy
{{- end -}}

{{- define "modelgate.image" -}}
{{- $tag := .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- printf "%s/%s:%s" .root.Values.image.repository .name $tag -}}
{{- end -}}

{{- define "modelgate.tokenSecret" -}}
{{- .Values.proxyToken.existingSecret | default (printf "%s-proxy-token" (include "modelgate.fullname" .)) -}}
{{- end -}}

{{- define "modelgate.sharedToken" -}}
{{- if eq .Values.proxyAuth.mode "shared-token" -}}true{{- end -}}
{{- end -}}

{{/* The config server speaks TLS only; proxies verify it against the CA ConfigMap. */}}
{{- define "modelgate.operatorUrl" -}}
{{- printf "https://%s-operator.%s.svc:%v" (include "modelgate.fullname" .) .Release.Namespace .Values.operator.ports.config -}}
{{- end -}}

{{- define "modelgate.operatorService" -}}
{{- printf "%s-operator" (include "modelgate.fullname" .) -}}
{{- end -}}

{{- define "modelgate.caSecret" -}}
{{- printf "%s-ca" (include "modelgate.fullname" .) -}}
{{- end -}}

{{/*
What a proxy presents and trusts, at /var/run/modelgate: `token` (its projected
ServiceAccount token, or the shared token in shared-token mode) and `ca.crt` (the operator's
CA; optional, so a pod still starts before the operator has published it - the proxy then
refuses to connect until the file appears, as it re-reads both at every connect).
*/}}
{{- define "modelgate.proxyCredentialsVolume" -}}
- name: modelgate
  projected:
    sources:
      {{- if include "modelgate.sharedToken" . }}
      - secret:
          name: {{ include "modelgate.tokenSecret" . }}
          items: [{key: token, path: token}]
      {{- else }}
      - serviceAccountToken:
          audience: {{ .Values.proxyAuth.audience }}
          expirationSeconds: 3600
          path: token
      {{- end }}
      - configMap:
          name: {{ .Values.tls.caConfigMap }}
          optional: true
          items: [{key: ca.crt, path: ca.crt}]
{{- end -}}

{{/* policy/v1 from Kubernetes 1.21, autoscaling/v2 from 1.23: render what the cluster serves. */}}
{{- define "modelgate.pdbApiVersion" -}}
{{- if semverCompare ">=1.21-0" .Capabilities.KubeVersion.Version -}}policy/v1{{- else -}}policy/v1beta1{{- end -}}
{{- end -}}

{{- define "modelgate.hpaApiVersion" -}}
{{- if semverCompare ">=1.23-0" .Capabilities.KubeVersion.Version -}}autoscaling/v2{{- else -}}autoscaling/v2beta2{{- end -}}
{{- end -}}

{{- define "modelgate.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "modelgate.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end -}}
