{{- define "gpupool.labels" -}}
app.kubernetes.io/name: gpupool
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- /* What selects the operator's pods: its Deployment, Services, PDB and NetworkPolicy. */ -}}
{{- define "gpupool.operatorSelector" -}}
app.kubernetes.io/name: gpupool
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "gpupool.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- /*
Rules that relate two values, which values.schema.json cannot state. Each
stops the install or upgrade with what to change.
*/ -}}
{{- define "gpupool.checks" -}}
{{- if and (gt (int .Values.operator.replicas) 1) (not .Values.operator.leaderElection.enabled) }}
{{- fail "operator.replicas > 1 needs operator.leaderElection.enabled: without an election every replica would act on every AiJob" }}
{{- end }}
{{- with .Values.pool }}
{{- if .enabled }}
{{- if not $.Values.chain.rpcUrl }}
{{- fail "pool.enabled needs chain.rpcUrl: pool leases are paid on chain" }}
{{- end }}
{{- if eq $.Values.org "my-org" }}
{{- fail "pool.enabled needs org: the name other members know this organisation by (their allowedOrgs and deniedOrgs name it); set it, e.g. --set org=acme" }}
{{- end }}
{{- if le (int .heartbeatGraceMs) (int .heartbeatEveryMs) }}
{{- fail (printf "pool.heartbeatGraceMs (%v) must be longer than pool.heartbeatEveryMs (%v): a provider would be taken for failed between two heartbeats" .heartbeatGraceMs .heartbeatEveryMs) }}
{{- end }}
{{- range .policy.allowedOrgs }}
{{- if has . $.Values.pool.policy.deniedOrgs }}
{{- fail (printf "pool.policy: organisation %q is in both allowedOrgs and deniedOrgs" .) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- if and .Values.chain.sweep.to (not .Values.chain.rpcUrl) }}
{{- fail "chain.sweep.to needs chain.rpcUrl: the sweep is a transaction on chain" }}
{{- end }}
{{- with .Values.chain }}
{{- $to := lower .sweep.to }}
{{- if eq $to "0x0000000000000000000000000000000000000000" }}
{{- fail "chain.sweep.to is the zero address: tokens swept there would be lost; name a wallet you hold the key to, or leave it empty for no sweep" }}
{{- end }}
{{- if and $to (or (eq $to (lower .escrowAddress)) (eq $to (lower .tokenAddress))) }}
{{- fail "chain.sweep.to is the escrow or the token contract: tokens swept there would be lost; name a wallet you hold the key to" }}
{{- end }}
{{- end }}
{{- if and .Values.agent.enabled (eq .Values.agent.backend "simulated") (not .Values.agent.simulatedInventory) }}
{{- fail "agent.backend simulated needs agent.simulatedInventory (product, memoryMib, count): the GPUs each node reports" }}
{{- end }}
{{- end -}}
