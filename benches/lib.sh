# Shared by the bench scripts (sourced, not run): a local Distribution
# registry with the busybox fixture pushed to it.

# make_workdir NAME: sets `work` to a fresh /var/tmp/kiln-NAME.* dir, removed
# on exit (kept, and said so, when the caller set keep=1) after the registry
# start_registry started is stopped.
make_workdir() {
  work=$(mktemp -d "/var/tmp/kiln-$1.XXXXXX")
  reg_pid=
  trap remove_workdir EXIT
}
remove_workdir() {
  if [ -n "$reg_pid" ]; then kill "$reg_pid" 2>/dev/null || true; wait "$reg_pid" 2>/dev/null || true; fi
  if [ "${keep:-0}" = 1 ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}

# start_registry WORK LOG: serves WORK/registry on a free loopback port;
# sets `reg` (host:port) and `reg_pid` (for the caller's cleanup). Fails
# when the registry does not answer.
start_registry() {
  local work=$1 log=$2 port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  reg=127.0.0.1:$port
  printf 'version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: %s\n  delete:\n    enabled: true\nhttp:\n  addr: %s\n' \
    "$work/registry" "$reg" >"$work/registry.yml"
  docker-registry serve "$work/registry.yml" >"$log" 2>&1 &
  reg_pid=$!
  for _ in $(seq 100); do
    curl -fs "http://$reg/v2/" >/dev/null 2>&1 && break
    sleep 0.05
  done
  curl -fs "http://$reg/v2/" >/dev/null || { echo "$(basename "$0"): registry did not start" >&2; return 1; }
}

# push_busybox WORK: builds the busybox fixture into WORK/busybox and pushes
# it as $reg/base/busybox:latest.
push_busybox() {
  "$repo/fixtures/busybox.sh" "$1/busybox" >/dev/null
  skopeo copy --quiet --dest-tls-verify=false "oci:$1/busybox:latest" "docker://$reg/base/busybox:latest"
}

# push_debian WORK LOG: a minbase bookworm root, debootstrapped once and kept
# in ~/.cache/kiln-bench (a few minutes, needs deb.debian.org), packed as a
# one-layer OCI image (sorted, numeric owners, epoch mtimes) and pushed as
# $reg/base/debian:bookworm; prints that reference. Called in $(…), so the
# "once" per WORK is a file (WORK/debian.ref).
push_debian() {
  local work=$1 log=$2
  [ ! -s "$work/debian.ref" ] || { cat "$work/debian.ref"; return; }
  local cache=${XDG_CACHE_HOME:-$HOME/.cache}/kiln-bench
  local rootfs=$cache/bookworm-minbase
  if [ ! -d "$rootfs" ]; then
    command -v debootstrap >/dev/null || apt-get install -y debootstrap >&2
    rm -rf "$rootfs.tmp"
    echo "$(basename "$0"): debootstrap --variant=minbase bookworm (once, into $rootfs)" >&2
    debootstrap --variant=minbase bookworm "$rootfs.tmp" http://deb.debian.org/debian >"$log/debootstrap.log" 2>&1
    rm -rf "$rootfs.tmp"/var/cache/apt/archives/*.deb "$rootfs.tmp"/var/lib/apt/lists/*
    mv "$rootfs.tmp" "$rootfs"
  fi
  local oci=$work/debian d=$work/debian-work
  mkdir -p "$oci/blobs/sha256" "$d"
  tar -C "$rootfs" --sort=name --mtime=@0 --numeric-owner --format=pax --pax-option=delete=atime,delete=ctime \
    --exclude='./proc/*' --exclude='./sys/*' --exclude='./dev/*' -cf "$d/layer.tar" .
  gzip -n -6 <"$d/layer.tar" >"$d/layer.tar.gz"
  local diff_id layer layer_size config config_size manifest manifest_size arch
  arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
  diff_id=$(sha256sum "$d/layer.tar" | cut -d' ' -f1)
  layer=$(sha256sum "$d/layer.tar.gz" | cut -d' ' -f1)
  layer_size=$(stat -c %s "$d/layer.tar.gz")
  cp "$d/layer.tar.gz" "$oci/blobs/sha256/$layer"
  printf '%s' '{"architecture":"'"$arch"'","config":{"Cmd":["bash"],"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},"created":"1970-01-01T00:00:00Z","history":[{"created":"1970-01-01T00:00:00Z","created_by":"debootstrap --variant=minbase bookworm"}],"os":"linux","rootfs":{"diff_ids":["sha256:'"$diff_id"'"],"type":"layers"}}' >"$d/config.json"
  config=$(sha256sum "$d/config.json" | cut -d' ' -f1); config_size=$(stat -c %s "$d/config.json")
  cp "$d/config.json" "$oci/blobs/sha256/$config"
  printf '%s' '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:'"$config"'","size":'"$config_size"'},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:'"$layer"'","size":'"$layer_size"'}]}' >"$d/manifest.json"
  manifest=$(sha256sum "$d/manifest.json" | cut -d' ' -f1); manifest_size=$(stat -c %s "$d/manifest.json")
  cp "$d/manifest.json" "$oci/blobs/sha256/$manifest"
  printf '%s' '{"imageLayoutVersion":"1.0.0"}' >"$oci/oci-layout"
  printf '%s' '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:'"$manifest"'","size":'"$manifest_size"',"annotations":{"org.opencontainers.image.ref.name":"bookworm"}}]}' >"$oci/index.json"
  rm -rf "$d"
  skopeo copy --quiet --dest-tls-verify=false "oci:$oci:bookworm" "docker://$reg/base/debian:bookworm"
  echo "$reg/base/debian:bookworm" | tee "$work/debian.ref"
}
