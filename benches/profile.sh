#!/usr/bin/env bash
# Profiles Kiln's no-change rebuild of the 6-step anchor (busybox fixture,
# a RUN creating 2000 files, rm, chmod, COPY, WORKDIR, CMD) against a local
# registry: `perf stat` over 10 warm rebuilds, then a `perf record` with
# DWARF call graphs over 3 of them, and the top symbols, self and children
# (then the engine's own frames, with children).
# With --cold, the same for cold builds (an empty --cache-dir each time);
# with --quick, 2 builds for perf stat and 1 recorded (a smoke run).
#
#   benches/profile.sh [--cold] [--quick] [--kiln PATH] [--keep]
#
# Needs perf, docker-registry, skopeo, busybox-static, root.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=benches/lib.sh
. "$here/lib.sh"
kiln=${KILN:-${CARGO_TARGET_DIR:-$repo/target}/release/kiln}
keep=0
cold=0
stat_runs=10
record_runs=3
while [ $# -gt 0 ]; do
  case $1 in
    --kiln) kiln=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --cold) cold=1; shift ;;
    --quick) stat_runs=2; record_runs=1; shift ;;
    *) echo "profile.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
command -v perf >/dev/null || { echo "profile.sh: perf is not installed" >&2; exit 1; }

make_workdir profile
cp "$kiln" "$work/kiln"

start_registry "$work" /dev/null
push_busybox "$work"

ctx=$work/ctx
mkdir -p "$ctx/app"
cat >"$ctx/Dockerfile" <<EOF
FROM $reg/base/busybox:latest
RUN mkdir -p /data && cd /data && i=0 && while [ \$i -lt 2000 ]; do echo \$i >f\$i; i=\$((i+1)); done
RUN rm -f /data/f1*
RUN chmod -R go-w /data
COPY app/ /app/
WORKDIR /app
CMD ["sh", "/app/run.sh"]
EOF
printf '#!/bin/sh\necho app\n' >"$ctx/app/run.sh"
for i in $(seq 20); do echo "$i" >"$ctx/app/src$i.txt"; done

build=("$work/kiln" build --context "$ctx" --dockerfile "$ctx/Dockerfile"
  --destination "$reg/kiln/app:1" --cache-dir "$work/state")
what="no-change rebuilds"
if [ "$cold" = 1 ]; then
  # A fresh state dir for every build.
  build=(bash -c 'rm -rf "$1"; shift; exec "$@"' _ "$work/state" "${build[@]}")
  what="cold builds"
fi
"${build[@]}" >/dev/null 2>&1 # warm the cache (and the page cache)
"${build[@]}" 2>&1 | grep -E 'time:|built in'

echo "== perf stat, $stat_runs $what"
perf stat -r "$stat_runs" -e task-clock,context-switches,cpu-migrations,page-faults "${build[@]}" 2>&1 >/dev/null |
  sed -n '/Performance counter stats/,$p' || true

echo "== perf record (DWARF call graphs), $record_runs $what"
perf record -q -F 5000 --call-graph dwarf,32768 -o "$work/perf.data" -- \
  bash -c 'n=$1; shift; for _ in $(seq "$n"); do "$@" >/dev/null 2>&1; done' _ "$record_runs" "${build[@]}" 2>/dev/null
echo "-- self time, top 15"
perf report -i "$work/perf.data" --comm kiln --no-children --sort dso,symbol -g none 2>/dev/null |
  grep '%' | grep -v '^#' | head -15 | cut -c1-150 || true
perf report -i "$work/perf.data" --comm kiln --children --sort symbol -g none 2>/dev/null |
  grep '%' | grep -v '^#' >"$work/children.txt" || true
echo "-- with children (Kiln's and its crates' frames), top 25"
grep -E 'kiln|oci_|regex::|rustls|rocksdb' "$work/children.txt" | head -25 | cut -c1-150 || true
# The engine's frames on their own, so that they show even when the CLI,
# the registry client or TLS set-up fill the list above.
echo "-- with children (the engine's frames), top 15"
grep -E '\] kiln_engine::' "$work/children.txt" | head -15 | cut -c1-150 || true
