#!/usr/bin/env bash
# Kiln vs buildah and BuildKit on the same Dockerfiles, the same machine and
# one local registry: build + push wall time, medians of N alternating runs.
#
#   benches/compare.sh [--runs N] [--kiln PATH] [--only WORKLOAD[,WORKLOAD]]
#                      [--scenarios SCENARIO[,SCENARIO]] [--peers PEER[,PEER]]
#                      [--debian] [--out FILE] [--readme FILE] [--keep]
#
# The report (a table of medians with every run's time, and the issue's
# targets checked against it) goes to stdout and to --out (default
# benches/results/latest.md); --readme FILE also puts it in FILE between
# the lines `<!-- compare.sh: begin -->` and `<!-- compare.sh: end -->`.
#
# Workloads (all FROM the busybox fixture, fixtures/busybox.sh):
#   anchor5   5 steps: RUN + metadata (the issue's first anchor)
#   anchor6   6 steps: a RUN creating 2000 files, then rm, chmod, COPY
#   monorepo  a context of 50k small files, COPY . /src, then a RUN
#   bigroot   a RUN creating 100k files, then a RUN touching one file
#             (only the last RUN changes between runs: a build arg)
#   debian    (--debian) a `debootstrap --variant=minbase bookworm` base
#             (built once into ~/.cache/kiln-bench) and a multi-stage
#             build: a builder stage takes a C source and a static binary
#             compiled on the host (minbase has no gcc), the slim final
#             stage copies the result
#   apt       (--debian) the same base; the build stage really installs
#             gcc and libc6-dev with apt-get (from the Debian mirror) and
#             compiles; the final stage copies the one binary
# Scenarios:
#   cold      empty caches: fresh kiln --cache-dir, fresh buildah --root
#   nochange  rebuild with warm caches, nothing changed
#   onefile   rebuild after changing one file the app's COPY reads
#   remote    "new machine": fresh local state, warm remote cache
#             (kiln --cache-repo; buildah --cache-from/--cache-to)
#   touch1    bigroot only: the last RUN re-runs in a 100k-file root
#
# Peers (--peers, default both):
#   buildah   its fastest local setup: --storage-driver overlay --isolation
#             chroot --layers, then `buildah push`; remote cache with
#             --cache-to/--cache-from
#   buildkit  Docker Engine's builder (Debian's docker.io): a dockerd of its
#             own on a private socket, leaving the host's network alone
#             (--iptables=false --bridge=none), DOCKER_BUILDKIT=1 `docker
#             build --network=host` then `docker push`; cold = `docker
#             builder prune -af` + `docker image prune -af` (the base too);
#             remote cache = BUILDKIT_INLINE_CACHE=1, then --cache-from
# Timings are wall clock of the build command plus the peer's push command.
#
# Needs: docker-registry (Distribution), skopeo, buildah, docker.io
# (dockerd, docker), busybox-static, and a release build of kiln
# ($CARGO_TARGET_DIR/release/kiln).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=benches/lib.sh
. "$here/lib.sh"
runs=5
kiln=${KILN:-${CARGO_TARGET_DIR:-$repo/target}/release/kiln}
only=anchor5,anchor6,monorepo,bigroot
scenarios=all
out=$here/results/latest.md
readme=
keep=0
peers=buildah,buildkit
given=
[ $# -eq 0 ] || given=$(printf ' %q' "$@")
while [ $# -gt 0 ]; do
  case $1 in
    --runs) runs=$2; shift 2 ;;
    --kiln) kiln=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --scenarios) scenarios=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --readme) readme=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --peers) peers=$2; shift 2 ;;
    --debian) only+=,debian,apt; shift ;;
    -h|--help) sed -n '2,53p' "$0"; exit 0 ;;
    *) echo "compare.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -x "$kiln" ] || { echo "compare.sh: no kiln binary at $kiln (cargo build --release, or --kiln PATH)" >&2; exit 1; }
# peer NAME: whether --peers asks for it.
peer() { [[ ",$peers," == *",$1,"* ]]; }
for p in ${peers//,/ }; do
  case $p in buildah|buildkit) ;; *) echo "compare.sh: --peers: unknown peer $p (buildah, buildkit)" >&2; exit 2 ;; esac
done
# Debian's client matches Debian's daemon; a newer docker on PATH may not.
docker_bin=$(command -v /usr/bin/docker || command -v docker || true)
tools="docker-registry skopeo"
peer buildah && tools+=" buildah"
peer buildkit && tools+=" dockerd $docker_bin"
for tool in $tools; do
  command -v "$tool" >/dev/null || { echo "compare.sh: $tool is not installed (apt-get install docker-registry skopeo buildah docker.io)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "compare.sh: run as root (buildah overlay storage, kiln RUN isolation)" >&2; exit 1; }
if [ -n "$readme" ]; then
  # Exactly one begin line, then one end line: anything else would lose text.
  [ "$(grep -x -e '<!-- compare.sh: begin -->' -e '<!-- compare.sh: end -->' "$readme" 2>/dev/null | paste -sd' ')" = \
    '<!-- compare.sh: begin --> <!-- compare.sh: end -->' ] ||
    { echo "compare.sh: --readme $readme: no <!-- compare.sh: begin --> / <!-- compare.sh: end --> lines" >&2; exit 2; }
fi

work=$(mktemp -d /var/tmp/kiln-bench.XXXXXX)
reg_pid=
dockerd_pid=
cleanup() {
  if [ -n "$reg_pid" ]; then kill "$reg_pid" 2>/dev/null || true; wait "$reg_pid" 2>/dev/null || true; fi
  if [ -n "$dockerd_pid" ]; then kill "$dockerd_pid" 2>/dev/null || true; wait "$dockerd_pid" 2>/dev/null || true; fi
  # buildah's overlay driver may leave mounts under its roots.
  { findmnt -rn -o TARGET | grep "^$work/" || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  if [ "$keep" = 1 ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
log=$work/log
mkdir -p "$log"
# Run a copy: a cargo build during the bench must not swap the binary.
kiln_src=$kiln
kiln_built=$(date -u -r "$kiln" '+%Y-%m-%d %H:%M UTC')
cp "$kiln" "$work/kiln"
kiln=$work/kiln

# --- registry -------------------------------------------------------------
start_registry "$work" "$log/registry.log"
push_busybox "$work"
base=$reg/base/busybox:latest

# --- optional Debian base -------------------------------------------------------
# benches/lib.sh's push_debian, shared with warm.sh.
debian_base() { push_debian "$work" "$log"; }

# --- buildah storage driver -------------------------------------------------
driver=overlay
peer buildah || driver=none
probe=$work/probe
if peer buildah && ! buildah --storage-driver overlay --root "$probe/root" --runroot "$probe/run" \
     from --tls-verify=false --name probe "$base" >"$log/probe.log" 2>&1 \
   || ! buildah --storage-driver overlay --root "$probe/root" --runroot "$probe/run" \
     run --isolation chroot probe true >>"$log/probe.log" 2>&1; then
  driver=vfs
fi
if peer buildah; then
  buildah --storage-driver "$driver" --root "$probe/root" --runroot "$probe/run" rm -a >/dev/null 2>&1 || true
  buildah --storage-driver "$driver" --root "$probe/root" --runroot "$probe/run" rmi -a -f >/dev/null 2>&1 || true
fi
{ findmnt -rn -o TARGET | grep "^$probe/" || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
rm -rf "$probe"

# buildah's --cache-from/--cache-to (1.27+).
buildah_remote=0
peer buildah && buildah bud --help 2>/dev/null | grep -q -- '--cache-from' && buildah_remote=1

# --- BuildKit: a dockerd of its own ---------------------------------------------
bk=$work/bk
dk() { DOCKER_HOST="unix://$bk/docker.sock" DOCKER_BUILDKIT=1 "$docker_bin" "$@"; }
if peer buildkit; then
  mkdir -p "$bk"
  dockerd --data-root "$bk/docker" --exec-root "$bk/exec" --pidfile "$bk/dockerd.pid" -H "unix://$bk/docker.sock" \
    --iptables=false --ip-forward=false --ip-masq=false --bridge=none --storage-driver overlay2 \
    --insecure-registry "$reg" >"$log/dockerd.log" 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 120); do dk version >/dev/null 2>&1 && break; sleep 0.5; done
  dk version >/dev/null 2>&1 || { echo "compare.sh: dockerd did not start:" >&2; tail -20 "$log/dockerd.log" >&2; exit 1; }
fi

# --- workloads ----------------------------------------------------------------
ctx=$work/ctx
mk_anchor5() {
  mkdir -p "$ctx/anchor5"
  cat >"$ctx/anchor5/Dockerfile" <<EOF
FROM $base
RUN echo hello >/hello.txt && mkdir -p /app
ENV APP_ENV=bench
LABEL org.example.bench=anchor5
WORKDIR /app
CMD ["sh"]
EOF
}
mk_anchor6() {
  mkdir -p "$ctx/anchor6/app"
  cat >"$ctx/anchor6/Dockerfile" <<EOF
FROM $base
RUN mkdir -p /data && cd /data && i=0 && while [ \$i -lt 2000 ]; do echo \$i >f\$i; i=\$((i+1)); done
RUN rm -f /data/f1*
RUN chmod -R go-w /data
COPY app/ /app/
WORKDIR /app
CMD ["sh", "/app/run.sh"]
EOF
  printf '#!/bin/sh\necho app\n' >"$ctx/anchor6/app/run.sh"
  for i in $(seq 20); do printf 'file %s\n' "$i" >"$ctx/anchor6/app/src$i.txt"; done
}
mk_monorepo() {
  local d=$ctx/monorepo
  mkdir -p "$d/src"
  # 50 packages x 1000 one-line files = 50k files.
  for p in $(seq -w 0 49); do
    mkdir -p "$d/src/pkg$p"
    (cd "$d/src/pkg$p" && seq 1 1000 | sed "s/^/pkg$p line /" | split -l 1 -a 3 - f)
  done
  cat >"$d/Dockerfile" <<EOF
FROM $base
COPY . /src
RUN find /src -type f | wc -l >/file-count
CMD ["sh"]
EOF
}
mk_bigroot() {
  mkdir -p "$ctx/bigroot"
  cat >"$ctx/bigroot/Dockerfile" <<EOF
FROM $base
RUN mkdir /big && cd /big && for d in \$(seq 0 99); do mkdir \$d && (cd \$d && seq 1 1000 | xargs touch); done
ARG TOUCH=0
RUN echo "\$TOUCH" >/big/0/1
CMD ["sh"]
EOF
}
mk_debian() {
  local d=$ctx/debian debian
  debian=$(debian_base)
  mkdir -p "$d/bin"
  printf '%s\n' '#include <stdio.h>' 'int main(void) { puts("hello from kiln-bench"); return 0; }' >"$d/hello.c"
  command -v gcc >/dev/null || { echo "compare.sh: --debian needs gcc on the host (static hello)" >&2; exit 1; }
  gcc -static -O2 -o "$d/bin/hello" "$d/hello.c"
  cat >"$d/Dockerfile" <<DOCKERFILE
FROM $debian AS build
WORKDIR /src
COPY hello.c bin/hello /src/
RUN mkdir -p /out && install -m 0755 /src/hello /out/hello && /out/hello >/out/greeting && sha256sum /src/hello.c >/out/source.sha256
FROM $debian
RUN useradd --system --no-create-home app
COPY --from=build /out/ /usr/local/bin/
USER app
CMD ["/usr/local/bin/hello"]
DOCKERFILE
}
mk_apt() {
  local d=$ctx/apt debian
  debian=$(debian_base)
  mkdir -p "$d"
  printf '%s\n' '#include <stdio.h>' 'int main(void) { puts("hello from kiln-bench apt"); return 0; }' >"$d/hello.c"
  cat >"$d/Dockerfile" <<DOCKERFILE
FROM $debian AS build
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY hello.c /src/
RUN mkdir -p /out && gcc -O2 -o /out/hello hello.c && /out/hello
FROM $debian
COPY --from=build /out/hello /usr/local/bin/hello
CMD ["/usr/local/bin/hello"]
DOCKERFILE
}
# The file scenario `onefile` changes.
change_file() {
  case $1 in
    anchor6) echo "change $2" >>"$ctx/anchor6/app/src1.txt" ;;
    monorepo) echo "change $2" >>"$ctx/monorepo/src/pkg00/faaa" ;;
    debian|apt) echo "/* change $2 */" >>"$ctx/$1/hello.c" ;;
  esac
}

# --- runners ------------------------------------------------------------------
now() { echo "${EPOCHREALTIME/,/.}"; }
# Before each timed run: the disk's dirty data written out, so no tool's run
# pays for the writeback of what the one before it wrote (a cold run writes
# hundreds of MB, and BuildKit's and buildah's cleanups delete as much).
settle() { sync; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

# kiln_run WL STATE TAG LOGNAME [extra args...] -> prints seconds
kiln_run() {
  local wl=$1 state=$2 tag=$3 name=$4; shift 4
  local t0 t1
  settle
  t0=$(now)
  if ! "$kiln" build --context "$ctx/$wl" --dockerfile "$ctx/$wl/Dockerfile" \
      --destination "$reg/kiln/$wl:$tag" --cache-dir "$state" "$@" >"$log/$name.out" 2>"$log/$name.err"; then
    echo "compare.sh: kiln build failed ($name):" >&2; tail -20 "$log/$name.err" >&2; exit 1
  fi
  t1=$(now)
  elapsed "$t0" "$t1"
}
# buildah_run WL ROOT TAG LOGNAME [extra bud args...] -> prints seconds
buildah_run() {
  peer buildah || return 0
  local wl=$1 root=$2 tag=$3 name=$4; shift 4
  local b=(buildah --storage-driver "$driver" --root "$root/root" --runroot "$root/run")
  local t0 t1
  settle
  t0=$(now)
  if ! "${b[@]}" bud --tls-verify=false --isolation chroot --layers "$@" -t "$wl:$tag" "$ctx/$wl" \
      >"$log/$name.out" 2>"$log/$name.err"; then
    echo "compare.sh: buildah bud failed ($name):" >&2; tail -20 "$log/$name.err" >&2; exit 1
  fi
  if ! "${b[@]}" push --tls-verify=false "$wl:$tag" "docker://$reg/buildah/$wl:$tag" \
      >>"$log/$name.out" 2>>"$log/$name.err"; then
    echo "compare.sh: buildah push failed ($name):" >&2; tail -20 "$log/$name.err" >&2; exit 1
  fi
  t1=$(now)
  elapsed "$t0" "$t1"
}
# buildkit_run WL TAG LOGNAME [extra build args...] -> prints seconds
buildkit_run() {
  peer buildkit || return 0
  local wl=$1 tag=$2 name=$3; shift 3
  local t0 t1
  settle
  t0=$(now)
  if ! dk build --network=host "$@" -t "$reg/buildkit/$wl:$tag" "$ctx/$wl" >"$log/$name.out" 2>"$log/$name.err"; then
    echo "compare.sh: docker build failed ($name):" >&2; tail -20 "$log/$name.err" >&2; exit 1
  fi
  if ! dk push "$reg/buildkit/$wl:$tag" >>"$log/$name.out" 2>>"$log/$name.err"; then
    echo "compare.sh: docker push failed ($name):" >&2; tail -20 "$log/$name.err" >&2; exit 1
  fi
  t1=$(now)
  elapsed "$t0" "$t1"
}
# BuildKit's cold state: no build cache, no images, the base included.
drop_buildkit() {
  peer buildkit || return 0
  dk builder prune -af >/dev/null 2>&1 || true
  dk image prune -af >/dev/null 2>&1 || true
}
drop_buildah() {
  peer buildah || return 0
  local root=$1
  buildah --storage-driver "$driver" --root "$root/root" --runroot "$root/run" rm -a >/dev/null 2>&1 || true
  { findmnt -rn -o TARGET | grep "^$root/" || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$root"
}
median() { tr ' ' '\n' | { grep -v '^$' || true; } | sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) { print "n/a"; exit } if (NR % 2) printf "%.3f", v[(NR + 1) / 2]; else printf "%.3f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

rows=()
phases=()
# Per "WL SCENARIO": Kiln's median, the ratio cells, and the unrounded
# quotients the targets compare (0.254 is not within 0.25), against
# buildah, BuildKit and the faster of the two.
declare -A kiln_median ratio_b ratio_x exact step_median
# ratio K P -> "0.42×" (or n/a); quotient K P -> 6 decimals (or n/a)
ratio() { awk -v k="$1" -v p="$2" 'BEGIN { if (k == "n/a" || p == "n/a") print "n/a"; else printf "%.2f×", k / p }'; }
quotient() { awk -v k="$1" -v p="$2" 'BEGIN { if (k == "n/a" || p == "n/a") print "n/a"; else printf "%.6f", k / p }'; }
# record WL SCENARIO "kiln times" "buildah times" "buildkit times" [note]
record() {
  local km bm xm fm raw
  km=$(echo "$3" | median)
  bm=$(echo "$4" | median)
  xm=$(echo "$5" | median)
  fm=$(printf '%s\n' "$bm" "$xm" | { grep -v n/a || true; } | sort -g | head -1)
  kiln_median["$1 $2"]=$km
  ratio_b["$1 $2"]=$(ratio "$km" "$bm")
  ratio_x["$1 $2"]=$(ratio "$km" "$xm")
  exact["$1 $2 buildah"]=$(quotient "$km" "$bm")
  exact["$1 $2 buildkit"]=$(quotient "$km" "$xm")
  exact["$1 $2 faster"]=$(quotient "$km" "${fm:-n/a}")
  raw="kiln:$3; buildah:${4:- none}; buildkit:${5:- none}"
  rows+=("| $1 | $2 | $km | $bm | $xm | ${ratio_b["$1 $2"]} | ${ratio_x["$1 $2"]} | $raw${6:+; $6} |")
  printf '  %-9s %-9s kiln %-7s buildah %-7s buildkit %-7s  [kiln: %s] [buildah: %s] [buildkit: %s]\n' \
    "$1" "$2" "$km" "$bm" "$xm" "$3" "$4" "$5" >&2
}
# median_run "t1 t2 t3": the number (from 1) of the run whose time is the
# median (the lower middle one for an even count), so its phases go with it.
median_run() {
  echo "$1" | tr ' ' '\n' | { grep -v '^$' || true; } | awk '{ print $1, NR }' | sort -g |
    awk '{ r[NR] = $2 } END { print r[int((NR + 1) / 2)] }'
}
# phases_row WL SCENARIO "kiln times": the phase table's row of the median run.
phases_row() {
  phases+=("| $1 | $2 | $(kiln_phases "$1-$2-kiln-$(median_run "$3")") |")
}
# kiln_phase LOGNAME PHASE: that phase's seconds in a kiln run's summary
# (nothing when it has none).
kiln_phase() {
  { grep -m1 '^ *time:' "$log/$1.err" || true; } | { grep -o " $2 [0-9.]*" || true; } | cut -d' ' -f3
}
# The kiln summary's phase line of a run's log, e.g. "resolve 0.010s, lookup 0.004s".
kiln_phases() {
  local line total
  line=$(grep -m1 '^ *time:' "$log/$1.err" | sed 's/^ *time: *//' || true)
  total=$(grep -m1 'built in' "$log/$1.err" | sed 's/.*built in \([0-9.]*s\).*(outputs \([0-9.]*s\).*/built in \1, outputs \2/' || true)
  echo "$line; $total"
}

# --- scenarios ----------------------------------------------------------------
# cold: a fresh kiln state, a fresh buildah root and an emptied dockerd per
# run, a new tag per run.
# Each run's state is removed after the last run, not after its own: on ext4
# without a journal (this machine's disk), a new inode skips those freed in
# the last minute one by one (the kernel's recently_deleted()), so a run just
# after thousands of files were removed spent seconds allocating inodes (a
# base's unpack: 0.9 s, or 5.5-6 s four times in ten with the previous state
# removed right before). BuildKit's prune, which only its daemon can do, stays
# before its own runs.
sc_cold() {
  local wl=$1 kt="" bt="" xt="" i s
  for i in $(seq "$runs"); do
    s=$(kiln_run "$wl" "$work/k-cold-$wl-$i" "cold$i" "$wl-cold-kiln-$i"); kt+=" $s"
    s=$(buildah_run "$wl" "$work/b-cold-$wl-$i" "cold$i" "$wl-cold-buildah-$i"); bt+=" $s"
    drop_buildkit
    s=$(buildkit_run "$wl" "cold$i" "$wl-cold-buildkit-$i"); xt+=" $s"
  done
  for i in $(seq "$runs"); do
    rm -rf "$work/k-cold-$wl-$i"
    drop_buildah "$work/b-cold-$wl-$i"
  done
  record "$wl" cold "$kt" "$bt" "$xt" "kiln unpack per run (s): $(kiln_unpacks "$wl")"
  phases_row "$wl" cold "$kt"
}
# kiln_unpacks WL: each cold run's unpack phase, from its summary (- if none):
# the base's unpack is what a recently emptied disk slows (see sc_cold).
kiln_unpacks() {
  local i u out=""
  for i in $(seq "$runs"); do
    u=$(kiln_phase "$1-cold-kiln-$i" unpack)
    out+="${out:+ }${u:--}"
  done
  echo "$out"
}
# warm: one build each into persistent state, used by nochange and onefile.
warm() {
  local wl=$1
  kiln_run "$wl" "$work/k-warm-$wl" warm "$wl-warm-kiln" >/dev/null
  buildah_run "$wl" "$work/b-warm-$wl" warm "$wl-warm-buildah" >/dev/null
  drop_buildkit
  buildkit_run "$wl" warm "$wl-warm-buildkit" >/dev/null
}
sc_nochange() {
  local wl=$1 kt="" bt="" xt="" i s
  for i in $(seq "$runs"); do
    s=$(kiln_run "$wl" "$work/k-warm-$wl" nochange "$wl-nochange-kiln-$i"); kt+=" $s"
    s=$(buildah_run "$wl" "$work/b-warm-$wl" nochange "$wl-nochange-buildah-$i"); bt+=" $s"
    s=$(buildkit_run "$wl" nochange "$wl-nochange-buildkit-$i"); xt+=" $s"
  done
  record "$wl" nochange "$kt" "$bt" "$xt"
  phases_row "$wl" nochange "$kt"
}
# onefile: each run changes the file first; every builder sees the same change.
sc_onefile() {
  local wl=$1 kt="" bt="" xt="" i s
  for i in $(seq "$runs"); do
    change_file "$wl" "$i"
    s=$(kiln_run "$wl" "$work/k-warm-$wl" onefile "$wl-onefile-kiln-$i"); kt+=" $s"
    s=$(buildah_run "$wl" "$work/b-warm-$wl" onefile "$wl-onefile-buildah-$i"); bt+=" $s"
    s=$(buildkit_run "$wl" onefile "$wl-onefile-buildkit-$i"); xt+=" $s"
  done
  record "$wl" onefile "$kt" "$bt" "$xt"
  phases_row "$wl" onefile "$kt"
}
# The bytes a kiln run's summary says it pulled.
kiln_pulled() { { grep -o '[0-9]* bytes pulled' "$log/$1.err" || echo '? bytes'; } | tail -1 | cut -d' ' -f1; }
# The compressed size of an image's layers in the registry.
layer_bytes() {
  skopeo inspect --raw --tls-verify=false "docker://$1" |
    python3 -c 'import json, sys; print(sum(l["size"] for l in json.load(sys.stdin)["layers"]))'
}
# other_layer_bytes STATE IMAGE: the bytes of the layer blobs (gzip, zstd or
# plain tar) in a kiln state dir's store that are not layers of IMAGE, i.e. the
# layers a remote-cache build pulled (or made) that the image does not need.
other_layer_bytes() {
  skopeo inspect --raw --tls-verify=false "docker://$2" | python3 -c '
import json, os, sys
wanted = {l["digest"].split(":")[1] for l in json.load(sys.stdin)["layers"]}
store, other = sys.argv[1], 0
for name in os.listdir(store):
    with open(os.path.join(store, name), "rb") as f:
        head = f.read(262)
    layer = head[:2] == b"\x1f\x8b" or head[:4] == b"\x28\xb5\x2f\xfd" or head[257:262] == b"ustar"
    if layer and name not in wanted:
        other += os.path.getsize(os.path.join(store, name))
print(other)' "$1/blobs/sha256"
}
declare -A pulled final_layers other_layers
# remote: a previous build filled the remote cache; each run starts from
# empty local state (a "new machine"). States are removed at the end.
sc_remote() {
  local wl=$1 kt="" bt="" xt="" i s note=""
  kiln_run "$wl" "$work/k-seed-$wl" seed "$wl-remote-seed-kiln" --cache-repo "$reg/kiln/cache-$wl" >/dev/null
  if [ "$buildah_remote" = 1 ]; then
    buildah_run "$wl" "$work/b-seed-$wl" seed "$wl-remote-seed-buildah" \
      --cache-to "$reg/buildah/cache-$wl" --cache-from "$reg/buildah/cache-$wl" >/dev/null
  fi
  drop_buildkit
  buildkit_run "$wl" seed "$wl-remote-seed-buildkit" --build-arg BUILDKIT_INLINE_CACHE=1 >/dev/null
  for i in $(seq "$runs"); do
    s=$(kiln_run "$wl" "$work/k-remote-$wl-$i" "remote$i" "$wl-remote-kiln-$i" --cache-repo "$reg/kiln/cache-$wl"); kt+=" $s"
    [ "$i" != 1 ] || other_layers["$wl"]=$(other_layer_bytes "$work/k-remote-$wl-$i" "$reg/kiln/$wl:remote1")
    if [ "$buildah_remote" = 1 ]; then
      s=$(buildah_run "$wl" "$work/b-remote-$wl-$i" "remote$i" "$wl-remote-buildah-$i" \
        --cache-from "$reg/buildah/cache-$wl"); bt+=" $s"
    fi
    drop_buildkit
    s=$(buildkit_run "$wl" "remote$i" "$wl-remote-buildkit-$i" --cache-from "$reg/buildkit/$wl:seed"); xt+=" $s"
  done
  # As sc_cold does, for the same reason.
  rm -rf "$work/k-seed-$wl" "$work"/k-remote-"$wl"-*
  if [ "$buildah_remote" = 1 ]; then
    for root in "$work/b-seed-$wl" "$work"/b-remote-"$wl"-*; do drop_buildah "$root"; done
  fi
  peer buildah && [ "$buildah_remote" = 0 ] && note="buildah $(buildah --version | awk '{print $3}') has no --cache-from"
  # Did the runs really hit the remote cache, and what did Kiln pull?
  local hits
  hits=$(grep -ho '[0-9]* hits from --cache-repo' "$log/$wl-remote-kiln-1.err" | head -1 || true)
  pulled["$wl"]=$(kiln_pulled "$wl-remote-kiln-1")
  final_layers["$wl"]=$(layer_bytes "$reg/kiln/$wl:remote1")
  note="${note:+$note; }kiln run 1: ${hits:-?}, ${pulled[$wl]} bytes pulled (the image's layers: ${final_layers[$wl]} bytes; other layers held: ${other_layers[$wl]} bytes)"
  if [ "$buildah_remote" = 1 ]; then
    note+="; buildah run 1: $(grep -ci 'Using cache' "$log/$wl-remote-buildah-1.out" || true) 'Using cache' lines"
  fi
  if peer buildkit; then
    note+="; buildkit run 1: $(grep -c 'CACHED' "$log/$wl-remote-buildkit-1.err" || true) CACHED steps"
  fi
  record "$wl" remote "$kt" "$bt" "$xt" "$note"
}
# touch1: only the last RUN changes (a build arg it alone reads).
sc_touch1() {
  local wl=$1 kt="" bt="" xt="" i s
  for i in $(seq "$runs"); do
    s=$(kiln_run "$wl" "$work/k-warm-$wl" touch1 "$wl-touch1-kiln-$i" --build-arg "TOUCH=$i"); kt+=" $s"
    s=$(buildah_run "$wl" "$work/b-warm-$wl" touch1 "$wl-touch1-buildah-$i" --build-arg "TOUCH=$i"); bt+=" $s"
    s=$(buildkit_run "$wl" touch1 "$wl-touch1-buildkit-$i" --build-arg "TOUCH=$i"); xt+=" $s"
  done
  step_median["$wl touch1"]=$(for i in $(seq "$runs"); do kiln_phase "$wl-touch1-kiln-$i" run; done | median)
  record "$wl" touch1 "$kt" "$bt" "$xt" "kiln phases (median run): $(kiln_phases "$wl-touch1-kiln-$(median_run "$kt")")"
}

# target_row SCENARIO PEER LIMIT TEXT: met or missed by every workload that
# ran SCENARIO, by its Kiln/PEER ratio (PEER: buildah, buildkit, or faster,
# the faster of the two in that row).
target_row() {
  local sc=$1 peer=$2 limit=$3 text=$4 key v list="" worst=0
  for key in "${!kiln_median[@]}"; do
    [ "${key#* }" = "$sc" ] || continue
    v=${exact[$key $peer]}
    [ "$v" = n/a ] && continue
    list+="${list:+, }${key% *} $(awk -v v="$v" 'BEGIN { printf "%.2f×", v }')"
    worst=$(awk -v a="$worst" -v b="$v" 'BEGIN { print (b > a ? b : a) }')
  done
  [ -n "$list" ] || return 0
  list=$(tr ',' '\n' <<<"$list" | sed 's/^ //' | sort | paste -sd, - | sed 's/,/, /g')
  echo "| $text | $(awk -v w="$worst" -v l="$limit" 'BEGIN { print (w <= l ? "met" : "**missed**") }'): $list |"
}

# want SCENARIO: whether --scenarios asks for it.
want() { [ "$scenarios" = all ] || [[ ",$scenarios," == *",$1,"* ]]; }

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
echo "compare.sh: $runs runs per scenario, buildah storage driver $driver, registry $reg, work $work" >&2
IFS=, read -r -a wls <<<"$only"
for wl in "${wls[@]}"; do
  echo "== $wl" >&2
  "mk_$wl"
  case $wl in
    anchor5) want cold && sc_cold "$wl"; warm "$wl"; want nochange && sc_nochange "$wl"; want remote && sc_remote "$wl" ;;
    anchor6|monorepo|debian|apt)
      want cold && sc_cold "$wl"; warm "$wl"; want nochange && sc_nochange "$wl"
      want onefile && sc_onefile "$wl"; want remote && sc_remote "$wl" ;;
    bigroot) warm "$wl"; want touch1 && sc_touch1 "$wl" ;;
    *) echo "compare.sh: unknown workload $wl" >&2; exit 2 ;;
  esac
  # Free the warm states as we go (bigroot's are large).
  drop_buildah "$work/b-warm-$wl"; rm -rf "$work/k-warm-$wl"; drop_buildkit
done

# --- report -------------------------------------------------------------------
commit=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git -C "$repo" status --porcelain --untracked-files=no 2>/dev/null | head -1)
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
{
  echo "## Kiln vs buildah and BuildKit: build + push, medians of $runs alternating runs"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- machine: $(nproc) CPUs ($cpu), kernel $(uname -r), $(awk '/MemTotal/ {printf "%.0f GB RAM", $2/1048576}' /proc/meminfo)"
  echo "- kiln: commit $commit${dirty:+ (with uncommitted changes)}; $("$kiln" --version 2>/dev/null || echo kiln), binary $kiln_src built $kiln_built"
  if peer buildah; then
    echo "- buildah: $(buildah --version | awk '{print $3}'), --storage-driver $driver --isolation chroot --layers, then buildah push$( [ "$driver" = vfs ] && echo ' (overlay was not usable here: vfs)')"
  fi
  if peer buildkit; then
    echo "- BuildKit: Docker Engine $(dk version --format '{{.Server.Version}}' 2>/dev/null) (dockerd of its own, overlay2), DOCKER_BUILDKIT=1 docker build --network=host, then docker push"
  fi
  echo "- load average (1/5/15 min) at start: $load_start; at end: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews the numbers)"
  echo "- registry: Distribution $(docker-registry --version 2>/dev/null | awk '{print $3}') on 127.0.0.1, plain HTTP; base: the busybox fixture"
  echo "- rerun: \`benches/compare.sh$given\` (as root, after \`cargo build --release\`)"
  echo
  echo "| workload | scenario | Kiln (s) | buildah (s) | BuildKit (s) | Kiln/buildah | Kiln/BuildKit | notes |"
  echo "|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "Workloads: anchor5 = RUN + 4 metadata steps; anchor6 = RUN creating 2000 files, rm, chmod, COPY, WORKDIR, CMD;"
  echo "monorepo = COPY of a 50k-file context + a RUN; debian (with --debian) = a debootstrap minbase bookworm base,"
  echo "a builder stage (COPY of a C source and a host-built static binary, RUN) and a final stage (RUN useradd,"
  echo "COPY --from=build, USER); apt (with --debian) = the same base, a build stage that runs apt-get install gcc"
  echo "libc6-dev and compiles, a final stage that copies the binary; bigroot = a RUN creating 100k files, then a RUN (touch1) that"
  echo "writes one file and is the only step to re-run (a build arg). Scenarios: cold = empty local state;"
  echo "nochange = warm rebuild; onefile = one file the COPY reads changed; remote = empty local state, warm remote"
  echo "cache (kiln --cache-repo, buildah --cache-from, BuildKit BUILDKIT_INLINE_CACHE=1 then --cache-from)."
  echo
  echo "Against the issue's targets (Kiln/peer medians of this run; the worst workload decides):"
  echo
  echo "| target | result |"
  echo "|---|---|"
  target_row cold buildkit 1.0 "cold build ≤ 1.0× BuildKit"
  target_row cold buildah 0.6 "cold build ≤ 0.6× buildah"
  target_row onefile faster 0.25 "one-file-change rebuild ≤ 0.25× the faster peer"
  target_row nochange buildah 0.1 "no-change rebuild ≤ 0.1× buildah"
  target_row nochange buildkit 0.25 "no-change rebuild ≤ 0.25× BuildKit"
  target_row remote faster 0.5 "remote-cache rebuild ≤ 0.5× the faster peer"
  if [ -n "${kiln_median[anchor6 nochange]:-}" ]; then
    echo "| anchor6 no-change rebuild ≤ 0.020 s with the push | $(awk -v k="${kiln_median[anchor6 nochange]}" 'BEGIN { print (k <= 0.020 ? "met" : "**missed**") }'): ${kiln_median[anchor6 nochange]} s |"
  fi
  if [ -n "${pulled[apt]:-}" ]; then
    # Configs are pulled too (Kiln reads them to build the image); the
    # target is about layers: none but the final image's may be pulled.
    echo "| apt remote-cache rebuild pulls no layer but the final image's | $(awk -v o="${other_layers[apt]}" 'BEGIN { print (o == 0 ? "met" : "**missed**") }'): other layers held ${other_layers[apt]} bytes; ${pulled[apt]} bytes pulled in all, the final image's layers ${final_layers[apt]} bytes |"
  fi
  if [ -n "${step_median[bigroot touch1]:-}" ]; then
    echo "| a RUN touching one file in a 100k-file root: the step, snapshot included, ≤ 0.3 s | $(awk -v s="${step_median[bigroot touch1]}" 'BEGIN { print (s <= 0.3 ? "met" : "**missed**") }'): ${step_median[bigroot touch1]} s (Kiln's run phase, median; the walk snapshotter's rescan alone is a micro-bench) |"
  fi
  if [ -n "${kiln_median[debian nochange]:-}" ]; then
    echo "| Debian no-change rebuild < 0.2 s with the push | $(awk -v k="${kiln_median[debian nochange]}" 'BEGIN { print (k < 0.2 ? "met" : "**missed**") }'): ${kiln_median[debian nochange]} s |"
  fi
  if [ "${#phases[@]}" -gt 0 ]; then
    echo
    echo "Kiln's own phase times (its build summary, the median run of each scenario):"
    echo
    echo "| workload | scenario | phases |"
    echo "|---|---|---|"
    printf '%s\n' "${phases[@]}"
  fi
} >"$work/report.md"
cat "$work/report.md"
if [ -n "$out" ]; then
  mkdir -p "$(dirname "$out")"
  cp "$work/report.md" "$out"
  echo "compare.sh: wrote $out" >&2
fi
if [ -n "$readme" ]; then
  awk -v report="$work/report.md" '
    $0 == "<!-- compare.sh: begin -->" { print; while ((getline line < report) > 0) print line; skip = 1; next }
    $0 == "<!-- compare.sh: end -->" { skip = 0 }
    !skip { print }' "$readme" >"$work/readme.new"
  cat "$work/readme.new" >"$readme"
  echo "compare.sh: put the report in $readme" >&2
fi
