#!/usr/bin/env bash
# Builds Kiln's own images with Kiln itself, from deploy/Dockerfile: the
# plain image and the `debug` variant (with a busybox shell).
#
#   deploy/image.sh [--kiln PATH] [--oci-layout DIR] [--destination REPO[:TAG]]
#                   [--insecure] [--cache-dir DIR]
#
# --oci-layout DIR      write both into an OCI layout: tags `latest` and `debug`
# --destination R[:T]   push the plain image to R:T (default tag latest) and
#                       the debug one to R:debug (T=latest) or R:T-debug
# --kiln PATH           the kiln binary to ship and to build with (default
#                       $CARGO_TARGET_DIR/release/kiln); the shipped copy is
#                       stripped (~23 MB instead of ~500 MB of debug info)
# Prints the size of the stripped binary and each image's compressed size.
#
# Needs: binutils (strip), busybox-static, ca-certificates; run as root.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
kiln=${KILN:-${CARGO_TARGET_DIR:-$repo/target}/release/kiln}
layout=
destination=
insecure=()
cache_dir=()
while [ $# -gt 0 ]; do
  case $1 in
    --kiln) kiln=$2; shift 2 ;;
    --oci-layout) layout=$2; shift 2 ;;
    --destination) destination=$2; shift 2 ;;
    --insecure) insecure=(--insecure); shift ;;
    --cache-dir) cache_dir=(--cache-dir "$2"); shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "deploy/image.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$layout" ] && [ -z "$destination" ]; then
  echo "deploy/image.sh: give --oci-layout DIR and/or --destination REPO[:TAG]" >&2
  exit 2
fi
[ -x "$kiln" ] || { echo "deploy/image.sh: no kiln binary at $kiln (cargo build --release, or --kiln PATH)" >&2; exit 2; }
busybox=$(command -v busybox) || { echo "deploy/image.sh: busybox-static is needed for the debug image" >&2; exit 2; }
certs=/etc/ssl/certs/ca-certificates.crt
[ -f "$certs" ] || { echo "deploy/image.sh: $certs missing (apt-get install ca-certificates)" >&2; exit 2; }

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
rootfs=$ctx/rootfs
mkdir -p "$rootfs/kiln" "$rootfs/etc/ssl/certs" "$rootfs/workspace" "$rootfs/kaniko/.docker" \
  "$rootfs/root" "$rootfs/tmp" "$ctx/home" "$ctx/busybox"
chmod 1777 "$rootfs/tmp" "$rootfs/workspace"
chmod 0700 "$rootfs/root"
strip -o "$rootfs/kiln/kiln" "$kiln"
# The shared libraries the binary loads, where the loader looks for them.
ldd "$kiln" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' |
  while read -r lib; do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
  done
cp -L "$certs" "$rootfs/etc/ssl/certs/"
printf 'root:x:0:0:root:/root:/busybox/sh\nkiln:x:1000:1000:kiln:/home/kiln:/busybox/sh\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\nkiln:x:1000:\n' >"$rootfs/etc/group"
# The debug image's shell and tools: one static busybox and its applets.
cp "$busybox" "$ctx/busybox/busybox"
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$ctx/busybox/$applet"
done
echo "stripped kiln: $(stat -c %s "$rootfs/kiln/kiln") bytes"

# REPO[:TAG] -> the debug variant's reference.
debug_ref() {
  local r=$1 tag=latest
  if [[ ${r##*/} == *:* ]]; then tag=${r##*:}; r=${r%:*}; fi
  if [ "$tag" = latest ]; then echo "$r:debug"; else echo "$r:$tag-debug"; fi
}

for target in kiln debug; do
  args=(build --context "dir://$ctx" --dockerfile "$here/Dockerfile" --target "$target"
    --reproducible "${insecure[@]}" "${cache_dir[@]}")
  ref=$destination
  [ "$target" = debug ] && [ -n "$ref" ] && ref=$(debug_ref "$ref")
  if [ -n "$ref" ]; then
    args+=(--destination "$ref")
  else
    # The layout's tag comes from the destination's; nothing is pushed.
    args+=(--no-push --destination "kiln:$([ "$target" = kiln ] && echo latest || echo debug)")
  fi
  [ -n "$layout" ] && args+=(--oci-layout-path "$layout")
  digest_file=$ctx/digest-$target
  "$kiln" "${args[@]}" --digest-file "$digest_file"
  echo "$target: $(cat "$digest_file")${ref:+ pushed to $ref}"
done
if [ -n "$layout" ]; then
  for tag in latest debug; do
    manifest=$(python3 -c '
import json, sys
layout, tag = sys.argv[1:]
index = json.load(open(f"{layout}/index.json"))
[m] = [m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
manifest = json.load(open(f"{layout}/blobs/sha256/" + m["digest"].split(":")[1]))
print(sum(l["size"] for l in manifest["layers"]))' "$layout" "$tag")
    echo "image $tag: $manifest bytes compressed"
  done
fi
