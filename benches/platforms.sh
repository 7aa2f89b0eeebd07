#!/usr/bin/env bash
# What a second platform costs a no-change rebuild: `--platform
# linux/amd64,linux/arm64` against each platform built alone, each a
# no-change rebuild + push to a local registry (wall clock, medians of N
# alternating runs, after one cold build of each). The build: FROM the
# two-platform busybox fixture (fixtures/busybox-index.sh), a COPY and a
# RUN (`uname -m`, under QEMU for arm64 in the cold build).
#
#   benches/platforms.sh [--runs N] [--kiln PATH]
#
# Needs: docker-registry, skopeo, qemu-aarch64 in binfmt_misc (F flag),
# root, and a release build of kiln ($CARGO_TARGET_DIR/release/kiln).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=benches/lib.sh
. "$here/lib.sh"
runs=5
kiln=${KILN:-${CARGO_TARGET_DIR:-$repo/target}/release/kiln}
while [ $# -gt 0 ]; do
  case $1 in
    --runs) runs=$2; shift 2 ;;
    --kiln) kiln=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "platforms.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -x "$kiln" ] || { echo "platforms.sh: no kiln binary at $kiln (cargo build --release, or --kiln PATH)" >&2; exit 1; }

make_workdir platforms
start_registry "$work" "$work/registry.log"
"$repo/fixtures/busybox-index.sh" "$work/base" >/dev/null
skopeo copy --quiet --all --dest-tls-verify=false "oci:$work/base:latest" "docker://$reg/base/multi:latest"
mkdir -p "$work/ctx"
head -c 1048576 /dev/urandom >"$work/ctx/app.bin"
printf 'FROM %s/base/multi:latest\nCOPY app.bin /app.bin\nRUN uname -m > /arch\n' "$reg" >"$work/ctx/Dockerfile"

configs=(linux/amd64,linux/arm64 linux/amd64 linux/arm64)
# build CONFIG: one build + push of CONFIG into its own state and repo;
# prints its wall time in seconds.
build() {
  local name=${1//[\/,]/-} start end
  start=${EPOCHREALTIME/,/.}
  "$kiln" build --context "$work/ctx" --dockerfile "$work/ctx/Dockerfile" \
    --cache-dir "$work/state-$name" --platform "$1" \
    --destination "$reg/app/$name:latest" >"$work/$name.log" 2>&1 ||
    { cat "$work/$name.log" >&2; exit 1; }
  end=${EPOCHREALTIME/,/.}
  awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }'
}
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) printf "%.3f", v[(NR + 1) / 2]; else printf "%.3f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

declare -A cold times
for c in "${configs[@]}"; do cold[$c]=$(build "$c"); done
for _ in $(seq "$runs"); do
  for c in "${configs[@]}"; do times[$c]+=" $(build "$c")"; done
done
echo "| --platform | cold build (s) | no-change rebuild + push, median (s) | runs (s) | median per platform (s) |"
echo "|---|---|---|---|---|"
for c in "${configs[@]}"; do
  m=$(echo "${times[$c]}" | median)
  n=$(echo "$c" | tr ',' '\n' | wc -l)
  echo "| $c | ${cold[$c]} | $m |${times[$c]} | $(awk -v m="$m" -v n="$n" 'BEGIN { printf "%.3f", m / n }') |"
done
