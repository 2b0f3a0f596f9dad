{{/* Names, labels and the derived settings shared by the templates. */}}
{{- define "trafficvlm-nim.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "trafficvlm-nim.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "trafficvlm-nim.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "trafficvlm-nim.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "trafficvlm-nim.selectorLabels" -}}
app.kubernetes.io/name: {{ include "trafficvlm-nim.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "trafficvlm-nim.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "trafficvlm-nim.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: trafficvlm
{{- end }}

{{- define "trafficvlm-nim.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "trafficvlm-nim.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The video spec as compact JSON (keys as in trafficvlm.json). */}}
{{- define "trafficvlm-nim.videoSpecJSON" -}}
{{- $v := .Values.videoSpec -}}
{{- dict "fps" $v.fps "nframes" $v.nframes "max_pixels" $v.maxPixels "min_pixels" $v.minPixels "total_pixels" $v.totalPixels | toJson }}
{{- end }}

{{/* vLLM arguments carrying the video spec: the HF processor's pixel caps and the frame sampling. */}}
{{- define "trafficvlm-nim.vllmVideoArgs" -}}
{{- $v := .Values.videoSpec -}}
{{- $proc := dict "max_pixels" $v.maxPixels "min_pixels" $v.minPixels -}}
{{- $video := dict -}}
{{- if $v.nframes }}{{ $_ := set $video "num_frames" $v.nframes }}{{ else }}{{ $_ := set $proc "fps" $v.fps }}{{ $_ := set $video "fps" $v.fps }}{{ $_ := set $video "num_frames" -1 }}{{ end -}}
--mm-processor-kwargs {{ toJson $proc | squote }} --media-io-kwargs {{ toJson (dict "video" $video) | squote }}
{{- end }}

{{/* Pod/Service annotations: where the checkpoint comes from and how to feed it video. */}}
{{- define "trafficvlm-nim.annotations" -}}
trafficvlm.io/video-spec: {{ include "trafficvlm-nim.videoSpecJSON" . | quote }}
trafficvlm.io/served-model-name: {{ .Values.servedModelName | quote }}
{{- if eq .Values.model.source "s3" }}
trafficvlm.io/model-source: {{ .Values.model.s3.uri | quote }}
{{- else }}
trafficvlm.io/model-source: {{ printf "pvc://%s/%s" .Values.model.pvc.claimName .Values.model.pvc.subPath | quote }}
{{- end }}
{{- end }}
