{{- define "ministral-serve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ministral-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ministral-serve.labels" -}}
{{ include "ministral-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* What the layout asks of the cluster (serve/configs/cluster-needs.json). */}}
{{- define "ministral-serve.needs" -}}
{{- $all := .Files.Get "files/serve-configs/cluster-needs.json" | fromJson -}}
{{- if not (hasKey $all .Values.layout) -}}
{{- fail (printf "layout %q is not a preset of serve/layouts.py: %s" .Values.layout (keys $all | sortAlpha | join ", ")) -}}
{{- end -}}
{{- index $all .Values.layout | toJson -}}
{{- end -}}

{{/*
The layout's generated Serve config with the values' overrides applied:
serveConfig.applicationArgs deep-merged into the application's args, then model.source.
*/}}
{{- define "ministral-serve.serveConfig" -}}
{{- $config := .Files.Get (printf "files/serve-configs/%s.yaml" .Values.layout) | fromYaml -}}
{{- $application := index $config.applications 0 -}}
{{- $args := mergeOverwrite (deepCopy $application.args) (deepCopy .Values.serveConfig.applicationArgs) -}}
{{- $_ := set $args "model" (mergeOverwrite (deepCopy (default (dict) $args.model)) (dict "source" .Values.model.source)) -}}
{{- $_ := set $application "args" $args -}}
{{- $_ := set $config "applications" (list $application) -}}
{{- toYaml $config -}}
{{- end -}}

{{- define "ministral-serve.podMetadata" -}}
labels:
  {{- include "ministral-serve.selectorLabels" . | nindent 2 }}
  {{- with .Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .Values.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Environment of every Ray container: the model cache, the Hugging Face token, the API keys. */}}
{{- define "ministral-serve.env" -}}
{{- if .Values.model.cache.persistentVolumeClaim }}
- name: HF_HOME
  value: {{ printf "%s/huggingface" .Values.model.cache.mountPath | quote }}
{{- end }}
{{- with .Values.model.huggingFaceToken.secretName }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.model.huggingFaceToken.key }}
{{- end }}
{{- with .Values.apiKeys.secretName }}
- name: MINISTRAL_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.apiKeys.key }}
{{- end }}
{{- end -}}

{{- define "ministral-serve.volumeMounts" -}}
{{- if .Values.model.cache.persistentVolumeClaim }}
volumeMounts:
  - name: model-cache
    mountPath: {{ .Values.model.cache.mountPath }}
{{- end }}
{{- end -}}

{{- define "ministral-serve.podSpecCommon" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 1000
  runAsGroup: 100
  fsGroup: 100
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .Values.model.cache.persistentVolumeClaim }}
volumes:
  - name: model-cache
    persistentVolumeClaim:
      claimName: {{ .Values.model.cache.persistentVolumeClaim }}
{{- end }}
{{- end -}}

{{- define "ministral-serve.image" -}}
{{ printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end -}}

{{/* Where a group's pods go: its nodeSelector, tolerations and affinity values. */}}
{{- define "ministral-serve.placement" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
