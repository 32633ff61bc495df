#!/usr/bin/env bash
# Builds gpupool's container image (the operator, the node agent and the CLI)
# as an OCI image archive, with no container engine: the layer is a tar of
# the binaries, the C library they link and a few files from /etc; the config,
# manifest and index are written here. The archive loads with `docker load`
# or `podman load`, and pushes with `skopeo copy oci-archive:OUT docker://REF`.
#
#   e2e/image.sh BIN_DIR OUT [REF]
#
# BIN_DIR holds gpupool-operator, gpupool-agent and gpupool (`make image`
# passes target/release). REF defaults to the chart's image and appVersion.
# The same binaries give the same archive, byte for byte (SOURCE_DATE_EPOCH
# sets the timestamps, 0 by default).
set -euo pipefail
# Byte order for every sort, so file order does not depend on the machine's locale.
export LC_ALL=C

bin_dir=${1:?usage: e2e/image.sh BIN_DIR OUT [REF]}
out=${2:?usage: e2e/image.sh BIN_DIR OUT [REF]}
here=$(cd "$(dirname "$0")/.." && pwd)
version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$here/charts/gpupool/Chart.yaml")
repo=$(sed -n 's/^ *repository: *//p' "$here/charts/gpupool/values.yaml" | head -n 1)
ref=${3:-$repo:$version}
epoch=${SOURCE_DATE_EPOCH:-0}
binaries=(gpupool-operator gpupool-agent gpupool)
# The unprivileged user the chart's runAsNonRoot needs, by number.
uid=65532

[ -f /etc/ssl/certs/ca-certificates.crt ] || { echo "image.sh needs TLS roots in /etc/ssl/certs/ca-certificates.crt (Debian's ca-certificates)" >&2; exit 1; }
for tool in tar gzip sha256sum ldd; do
  command -v "$tool" >/dev/null || { echo "image.sh needs $tool" >&2; exit 1; }
done
for b in "${binaries[@]}"; do
  [ -x "$bin_dir/$b" ] || { echo "$bin_dir/$b is not built" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root/usr/local/bin" "$root/etc/ssl/certs" "$root/tmp"

for b in "${binaries[@]}"; do
  install -m 0755 "$bin_dir/$b" "$root/usr/local/bin/$b"
done

# The C library the binaries link (libc, libm, libgcc_s and the loader), at
# the paths the loader looks in, from the machine that built them: they need
# nothing else. NVML is not here: the agent loads libnvidia-ml.so.1 at run
# time from what the NVIDIA container runtime mounts.
linked=$(for b in "${binaries[@]}"; do ldd "$bin_dir/$b"; done)
if grep -q 'not found' <<<"$linked"; then
  echo "image.sh: a library the binaries link is missing here:" >&2
  grep 'not found' <<<"$linked" >&2
  exit 1
fi
libs=$(echo "$linked" \
  | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)
for lib in $libs; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
  chmod 0755 "$root$lib"
done

# TLS roots for the chain's RPC URL and the OTLP endpoint; a user to run as.
cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:%s:%s:nonroot:/tmp:/sbin/nologin\n' $uid $uid > "$root/etc/passwd"
printf 'root:x:0:\nnonroot:x:%s:\n' $uid > "$root/etc/group"
chmod 0644 "$root/etc/passwd" "$root/etc/group" "$root/etc/ssl/certs/ca-certificates.crt"
chmod 1777 "$root/tmp"

# Same inputs, same bytes: sorted names, fixed times and owners, no gzip name or time.
deterministic_tar() {
  local dir=$1 dest=$2; shift 2
  tar --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner \
    --format=posix --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$dir" -cf "$dest" "$@"
}
deterministic_tar "$root" "$work/layer.tar" $(cd "$root" && ls -A | sort)
diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
gzip -n < "$work/layer.tar" > "$work/layer.tar.gz"

layout=$work/layout
mkdir -p "$layout/blobs/sha256"
blob() { # FILE -> prints "digest size" after storing FILE as a blob
  local d s
  d=$(sha256sum "$1" | cut -d' ' -f1)
  s=$(stat -c %s "$1")
  cp "$1" "$layout/blobs/sha256/$d"
  echo "$d $s"
}
read -r layer_digest layer_size < <(blob "$work/layer.tar.gz")

created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
cat > "$work/config.json" <<EOF
{"architecture":"amd64","os":"linux","created":"$created","config":{"User":"$uid:$uid","Env":["PATH=/usr/local/bin:/usr/bin:/bin","SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"],"Cmd":["gpupool-operator"],"WorkingDir":"/","Labels":{"org.opencontainers.image.title":"gpupool","org.opencontainers.image.version":"$version","org.opencontainers.image.source":"https://github.com/gpupool/gpupool","org.opencontainers.image.description":"gpupool operator, node agent and CLI"}},"rootfs":{"type":"layers","diff_ids":["sha256:$diff_id"]},"history":[{"created":"$created","created_by":"e2e/image.sh"}]}
EOF
read -r config_digest config_size < <(blob "$work/config.json")

cat > "$work/manifest.json" <<EOF
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:$config_digest","size":$config_size},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:$layer_digest","size":$layer_size}]}
EOF
read -r manifest_digest manifest_size < <(blob "$work/manifest.json")

printf '{"imageLayoutVersion":"1.0.0"}\n' > "$layout/oci-layout"
cat > "$layout/index.json" <<EOF
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:$manifest_digest","size":$manifest_size,"annotations":{"io.containerd.image.name":"$ref","org.opencontainers.image.ref.name":"$version"}}]}
EOF
# Docker's own index of the archive, for `docker load` before OCI layouts.
cat > "$layout/manifest.json" <<EOF
[{"Config":"blobs/sha256/$config_digest","RepoTags":["$ref"],"Layers":["blobs/sha256/$layer_digest"]}]
EOF

mkdir -p "$(dirname "$out")"
deterministic_tar "$layout" "$out.partial" blobs index.json manifest.json oci-layout
mv "$out.partial" "$out"
echo "$ref sha256:$manifest_digest $(stat -c %s "$out") bytes -> $out"
