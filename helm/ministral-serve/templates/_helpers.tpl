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

{{/* metadata of every object but the RayService: name (a suffix to the full name), namespace, labels. */}}
{{- define "ministral-serve.metadata" -}}
{{- $root := index . 0 -}}
{{- $suffix := index . 1 -}}
name: {{ include "ministral-serve.fullname" $root }}{{ with $suffix }}-{{ . }}{{ end }}
namespace: {{ $root.Release.Namespace }}
labels:
  {{- include "ministral-serve.labels" $root | nindent 2 }}
{{- end -}}

{{/* What the layout asks of the cluster (serve/configs/cluster-needs.json). */}}
{{- define "ministral-serve.needs" -}}
{{- $all := .Files.Get "files/serve-configs/cluster-needs.json" | fromJson -}}
{{- if not (hasKey $all .Values.layout) -}}
{{- fail (printf "layout %q is not a preset of serve/layouts.py: %s" .Values.layout (keys $all | sortAlpha | join ", ")) -}}
{{- end -}}
{{- index $all .Values.layout | toJson -}}
{{- end -}}

{{/* The front door as `ministral-serve run` sets it up (serve/configs/front-door.json, from serve/front_door.py). */}}
{{- define "ministral-serve.frontDoor" -}}
{{- .Files.Get "files/serve-configs/front-door.json" -}}
{{- end -}}

{{/* Where the tenants file of auth.tenantsSecret is mounted in every Ray container. */}}
{{- define "ministral-serve.tenantsDir" -}}
/etc/ministral/tenants
{{- end -}}

{{/*
The layout's generated Serve config with the values' overrides applied:
serveConfig.applicationArgs deep-merged into the application's args, then
model.source, auth.allowAnonymous and auth.tenantsSecret (as auth.tenants_file:
the application builder reads it to deploy the quota ledger).
*/}}
{{- define "ministral-serve.serveConfig" -}}
{{- $config := .Files.Get (printf "files/serve-configs/%s.yaml" .Values.layout) | fromYaml -}}
{{- $application := index $config.applications 0 -}}
{{- $args := mergeOverwrite (deepCopy $application.args) (deepCopy .Values.serveConfig.applicationArgs) -}}
{{- $_ := set $args "model" (mergeOverwrite (deepCopy (default (dict) $args.model)) (dict "source" .Values.model.source)) -}}
{{- if .Values.auth.allowAnonymous -}}
{{- $_ := set $args "auth" (mergeOverwrite (deepCopy (default (dict) $args.auth)) (dict "allow_anonymous" true)) -}}
{{- end -}}
{{- if .Values.auth.tenantsSecret.name -}}
{{- $tenantsFile := printf "%s/tenants.yaml" (include "ministral-serve.tenantsDir" .) -}}
{{- $_ := set $args "auth" (mergeOverwrite (deepCopy (default (dict) $args.auth)) (dict "tenants_file" $tenantsFile)) -}}
{{- end -}}
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

{{/* The model cache volume's claim: an existing one, the chart's own, or none. */}}
{{- define "ministral-serve.modelClaim" -}}
{{- if .Values.model.cache.create -}}
{{ include "ministral-serve.fullname" . }}-models
{{- else -}}
{{ .Values.model.cache.persistentVolumeClaim }}
{{- end -}}
{{- end -}}

{{/*
Environment of every Ray container: the front door as `ministral-serve run`
sets it, the model cache, the Hugging Face token, the API keys, then
extraEnv (which may change only the front door's tunable variables).
*/}}
{{- define "ministral-serve.env" -}}
{{- $frontDoor := include "ministral-serve.frontDoor" . | fromJson -}}
{{- $environment := index $frontDoor.environment .Values.frontDoor -}}
{{- $overrides := dict -}}
{{- $extra := list -}}
{{- range .Values.extraEnv -}}
{{- if hasKey $environment .name -}}
{{- if not (has .name $frontDoor.tunable) -}}
{{- fail (printf "extraEnv sets %s, which the front door fixes (serve/front_door.py); it may change only %s" .name (join ", " $frontDoor.tunable)) -}}
{{- end -}}
{{- $_ := set $overrides .name . -}}
{{- else -}}
{{- $extra = append $extra . -}}
{{- end -}}
{{- end -}}
{{- range $name := keys $environment | sortAlpha }}
{{- if hasKey $overrides $name }}
- {{ index $overrides $name | toJson }}
{{- else }}
- name: {{ $name }}
  value: {{ index $environment $name | quote }}
{{- end }}
{{- end }}
{{- if include "ministral-serve.modelClaim" . }}
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
{{- range $extra }}
- {{ toJson . }}
{{- end }}
{{- end -}}

{{- define "ministral-serve.volumeMounts" -}}
{{- range .Values.writableDirs }}
- name: {{ .name }}
  mountPath: {{ .mountPath }}
{{- end }}
{{- if eq .Values.frontDoor "haproxy" }}
- name: front-door
  mountPath: {{ (include "ministral-serve.frontDoor" . | fromJson).launcher.path | dir }}
  readOnly: true
{{- end }}
{{- if include "ministral-serve.modelClaim" . }}
- name: model-cache
  mountPath: {{ .Values.model.cache.mountPath }}
{{- end }}
{{- if .Values.auth.tenantsSecret.name }}
# A whole-volume mount, never subPath: the kubelet updates it when the Secret changes.
- name: tenants
  mountPath: {{ include "ministral-serve.tenantsDir" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* The pod spec fields head and workers share. Argument: (list $ "head"|"worker"). */}}
{{- define "ministral-serve.podSpecCommon" -}}
{{- $ := index . 0 -}}
{{- $nodeType := index . 1 -}}
{{- with $.Values.securityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
serviceAccountName: {{ include "ministral-serve.serviceAccountName" $ }}
automountServiceAccountToken: {{ $.Values.serviceAccount.automountServiceAccountToken }}
{{- with $.Values.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with $.Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  {{- range $.Values.writableDirs }}
  - name: {{ .name }}
    emptyDir: {{ with .sizeLimit }}{sizeLimit: {{ . }}}{{ else }}{}{{ end }}
  {{- end }}
  {{- if eq $.Values.frontDoor "haproxy" }}
  - name: front-door
    configMap:
      name: {{ include "ministral-serve.fullname" $ }}-front-door
      defaultMode: 0555
  {{- end }}
  {{- with include "ministral-serve.modelClaim" $ }}
  - name: model-cache
    persistentVolumeClaim:
      claimName: {{ . }}
  {{- end }}
  {{- with $.Values.auth.tenantsSecret.name }}
  # The tenants file: owned by root and, with the pod's fsGroup, by its group, which
  # the Ray user belongs to (0440); without an fsGroup, readable by all (0444).
  - name: tenants
    secret:
      secretName: {{ . }}
      defaultMode: {{ if (default (dict) $.Values.securityContext).fsGroup }}0440{{ else }}0444{{ end }}
      items:
        - {key: {{ $.Values.auth.tenantsSecret.key | quote }}, path: tenants.yaml}
  {{- end }}
  {{- if and (eq $nodeType "head") $.Values.rayAutoscaling.enabled (not $.Values.serviceAccount.automountServiceAccountToken) }}
  # The Kubernetes API credentials of KubeRay's autoscaler sidecar alone
  # (autoscalerOptions.volumeMounts), as the kubelet would mount them in every container.
  - name: autoscaler-api-access
    projected:
      defaultMode: 0444
      sources:
        - serviceAccountToken:
            path: token
            expirationSeconds: 3607
        - configMap:
            name: kube-root-ca.crt
            items:
              - {key: ca.crt, path: ca.crt}
        - downwardAPI:
            items:
              - path: namespace
                fieldRef: {apiVersion: v1, fieldPath: metadata.namespace}
  {{- end }}
{{- end -}}

{{- define "ministral-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{ default (include "ministral-serve.fullname" .) .Values.serviceAccount.name }}
{{- else -}}
{{ default "default" .Values.serviceAccount.name }}
{{- end -}}
{{- end -}}

{{- define "ministral-serve.image" -}}
{{- if .Values.image.digest -}}
{{ printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else -}}
{{ printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end -}}
{{- end -}}

{{/* A digest cannot change under a pod: pull it once. A tag can: pull it every time. */}}
{{- define "ministral-serve.pullPolicy" -}}
{{- default (ternary "IfNotPresent" "Always" (not (empty .Values.image.digest))) .Values.image.pullPolicy -}}
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
