#!/usr/bin/env bash
# What `kiln warm` buys a CI node, against issue 19's targets: each a build
# + push to a local registry (wall clock, medians of N runs), with the
# build's JSON summary (layers unpacked, unpack time, bytes pulled).
#   nochange  FROM <base> + COPY of a 1 MB file, rebuilt with nothing changed;
#   warmed    the same, first build on a fresh state dir after
#             `kiln warm --dockerfile` (what the warmer DaemonSet runs);
#   cold      the same, first build on a fresh state dir, no warm (pull included);
#   app       a build stage (busybox, a RUN) + a final `FROM <base>` +
#             `COPY --from=build` of one binary; the row gives the whole
#             build, the target the final stage's unpacking: the whole
#             build's less that of `--target build` (layers, and bytes under
#             the state's unpacked layers).
# Beside them, the registry alone (no Kiln) times the two PUTs a warmed
# build's push waits on: with the rebuild, the floor of the first target.
#
#   benches/warm.sh [--runs N] [--kiln PATH] [--base debian|busybox]
#
# --base debian (the default) is a debootstrap minbase bookworm, made once
# into ~/.cache/kiln-bench (benches/lib.sh push_debian); busybox is the
# quick fixture for smoke runs. Needs: docker-registry, skopeo, jq, gcc, python3,
# root, and a release build of kiln ($CARGO_TARGET_DIR/release/kiln).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=benches/lib.sh
. "$here/lib.sh"
runs=5
base_kind=debian
kiln=${KILN:-${CARGO_TARGET_DIR:-$repo/target}/release/kiln}
while [ $# -gt 0 ]; do
  case $1 in
    --runs) runs=$2; shift 2 ;;
    --kiln) kiln=$2; shift 2 ;;
    --base) base_kind=$2; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "warm.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
case $base_kind in debian|busybox) ;; *) echo "warm.sh: --base debian|busybox, not $base_kind" >&2; exit 2 ;; esac
[ -x "$kiln" ] || { echo "warm.sh: no kiln binary at $kiln (cargo build --release, or --kiln PATH)" >&2; exit 1; }
for tool in docker-registry skopeo jq gcc python3; do
  command -v "$tool" >/dev/null || { echo "warm.sh: $tool is not installed" >&2; exit 1; }
done

make_workdir warm
log=$work/log
mkdir -p "$log"
start_registry "$work" "$log/registry.log"
push_busybox "$work"
case $base_kind in
  debian) base=$(push_debian "$work" "$log") ;;
  busybox) base=$reg/base/busybox:latest ;;
esac

mkdir -p "$work/copy" "$work/app"
head -c 1048576 /dev/urandom >"$work/copy/f"
printf 'FROM %s\nCOPY f /f\n' "$base" >"$work/copy/Dockerfile"
printf '%s\n' '#include <stdio.h>' 'int main(void) { puts("hello from kiln-bench"); return 0; }' >"$work/app/hello.c"
gcc -static -O2 -o "$work/app/hello" "$work/app/hello.c"
cat >"$work/app/Dockerfile" <<DOCKERFILE
FROM $reg/base/busybox:latest AS build
COPY hello /src/hello
RUN mkdir -p /out && cp /src/hello /out/hello && chmod 0755 /out/hello
FROM $base
COPY --from=build /out/hello /usr/local/bin/hello
CMD ["/usr/local/bin/hello"]
DOCKERFILE

# build CTX STATE NAME [args...]: one build + push with JSON logs; prints
# "SECONDS LAYERS_UNPACKED UNPACK_MS BYTES_PULLED" from its summary.
build() {
  local ctx=$1 state=$2 name=$3 start end; shift 3
  # The disk's dirty data written out first (as compare.sh does): no build
  # pays for the writeback of what the one before wrote, and the warmed
  # build starts as on a node warmed ahead of it, not a moment before.
  sync
  start=${EPOCHREALTIME/,/.}
  "$kiln" build --context "$work/$ctx" --dockerfile "$work/$ctx/Dockerfile" \
    --cache-dir "$state" --log-format json "$@" >"$log/$name.out" 2>"$log/$name.err" ||
    { tail -20 "$log/$name.err" >&2; exit 1; }
  end=${EPOCHREALTIME/,/.}
  tail -1 "$log/$name.err" | jq -r --arg s "$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }')" \
    'select(.event == "summary") | "\($s) \(.layers_unpacked) \(.phases_ms.unpack // 0 | ceil) \(.bytes_pulled)"' |
    grep . || { echo "warm.sh: no summary in $log/$name.err" >&2; exit 1; }
}
# Bytes under a state dir's unpacked layers (the overlay snapshotter's).
unpacked_bytes() { if [ -d "$1/unpacked" ]; then du -sb "$1/unpacked" | cut -f1; else echo 0; fi; }
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) printf "%.3f", v[(NR + 1) / 2]; else printf "%.3f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
max() { tr ' ' '\n' | grep -v '^$' | sort -g | tail -1; }

# The registry's own share of the warmed build's push, with no Kiln: what
# that push sends once its layer is there (a 538-byte config PUT into a
# session opened ahead, as Kiln opens its own, then the manifest naming
# it) by Python's http.client; seconds, the median of 5 such pairs.
registry_puts() {
  python3 - "$reg" "$1" <<'PY'
import hashlib, http.client, json, os, statistics, sys, time
host, run = sys.argv[1], sys.argv[2]
c = http.client.HTTPConnection(host)
def req(method, path, body=None, headers={}):
    c.request(method, path, body=body, headers=headers)
    r = c.getresponse()
    r.read()
    return r
times = []
for i in range(5):
    config = os.urandom(269).hex().encode()
    digest = "sha256:" + hashlib.sha256(config).hexdigest()
    location = req("POST", "/v2/app/floor/blobs/uploads/").getheader("Location")
    location = location.split(host, 1)[-1]
    start = time.perf_counter()
    sep = "&" if "?" in location else "?"
    r = req("PUT", f"{location}{sep}digest={digest}", config, {"Content-Type": "application/octet-stream"})
    assert r.status == 201, r.status
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest, "size": len(config)},
        "layers": []}).encode()
    r = req("PUT", f"/v2/app/floor/manifests/r{run}-{i}", manifest,
            {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    assert r.status == 201, r.status
    times.append(time.perf_counter() - start)
print(f"{statistics.median(times):.4f}")
PY
}

declare -A secs layers unpack pulled
# record SCENARIO "SECONDS LAYERS UNPACK_MS PULLED"
record() {
  local s l u p
  read -r s l u p <<<"$2"
  [ -n "$p" ] || { echo "warm.sh: $1: no build summary" >&2; exit 1; }
  secs[$1]+=" $s"; layers[$1]+=" $l"; unpack[$1]+=" $u"; pulled[$1]+=" $p"
}

build copy "$work/state-nochange" nochange-0 --destination "$reg/app/copy:nochange" >/dev/null
app_bytes=
app_layers=
puts=
for i in $(seq "$runs"); do
  record nochange "$(build copy "$work/state-nochange" "nochange-$i" --destination "$reg/app/copy:nochange")"
  "$kiln" warm --cache-dir "$work/state-warmed-$i" --dockerfile "$work/copy/Dockerfile" >"$log/warm-$i.out" 2>&1 ||
    { cat "$log/warm-$i.out" >&2; exit 1; }
  record warmed "$(build copy "$work/state-warmed-$i" "warmed-$i" --destination "$reg/app/copy:warmed$i")"
  puts+=" $(registry_puts "$i")"
  record cold "$(build copy "$work/state-cold-$i" "cold-$i" --destination "$reg/app/copy:cold$i")"
  # The app: the final stage's share is the whole build's less the build stage's.
  whole=$(build app "$work/state-app-$i" "app-$i" --destination "$reg/app/app:run$i")
  stage=$(build app "$work/state-stage-$i" "stage-$i" --target build --no-push)
  record app "$whole"
  read -r _ l _ _ <<<"$whole"
  read -r _ bl _ _ <<<"$stage"
  app_layers+=" $l-$bl"
  app_bytes+=" $(($(unpacked_bytes "$work/state-app-$i") - $(unpacked_bytes "$work/state-stage-$i")))"
  rm -rf "$work/state-warmed-$i" "$work/state-cold-$i" "$work/state-app-$i" "$work/state-stage-$i"
done

nochange=$(echo "${secs[nochange]}" | median)
warmed=$(echo "${secs[warmed]}" | median)
base_line=$(grep -m1 ' layers fetched' "$log/warm-1.out" | sed 's/^.*: //' || true)
echo "## kiln warm: the first build on a node, medians of $runs runs (base: $base_kind)"
echo
echo "Each a build + push to a local registry; layers unpacked, unpack ms and bytes pulled are"
echo "the most any run's JSON summary gave. kiln warm: ${base_line:-?}"
echo
echo "| scenario | median (s) | runs (s) | layers unpacked | unpack (ms) | bytes pulled |"
echo "|---|---|---|---|---|---|"
for sc in nochange warmed cold app; do
  case $sc in
    nochange) what="no-change rebuild (FROM base + COPY 1 MB)" ;;
    warmed) what="first build after kiln warm" ;;
    cold) what="cold build, no warm (pull included)" ;;
    app) what="app: build stage + final FROM base + COPY --from=build (whole build)" ;;
  esac
  echo "| $what | $(echo "${secs[$sc]}" | median) |${secs[$sc]} | $(echo "${layers[$sc]}" | max) | $(echo "${unpack[$sc]}" | max) | $(echo "${pulled[$sc]}" | max) |"
done
echo
# What no warmed build can go below: the rebuild, plus the two PUTs it
# must wait for one after the other (the registry checks a manifest's
# config is there).
puts_median=$(echo "$puts" | median)
floor=$(awk -v n="$nochange" -v p="$puts_median" 'BEGIN { printf "%.2f", (n + p) / n }')
echo "The registry alone (no Kiln; Python's http.client, medians of 5 each run): a config PUT then"
echo "a manifest PUT take $puts_median s (runs (s):$puts). With the no-change rebuild that is ${floor}×"
echo "the rebuild, before the warmed build has made its layer."
echo
echo "| target | verdict |"
echo "|---|---|"
ratio=$(awk -v w="$warmed" -v n="$nochange" 'BEGIN { printf "%.2f", w / n }')
verdict() { if [ "$1" = 1 ]; then echo met; else echo '**missed**'; fi; }
echo "| first build after kiln warm ≤ 1.5× no-change rebuild | $(verdict "$(awk -v w="$warmed" -v n="$nochange" 'BEGIN { print (w <= 1.5 * n) }')"): ${ratio}× (the registry's two PUTs alone: ${floor}×) |"
cold_layers=$(echo "${layers[cold]}" | max); cold_unpack=$(echo "${unpack[cold]}" | max)
echo "| cold build without warm: unpack 0 | $(verdict "$([ "$cold_layers" = 0 ] && [ "$cold_unpack" = 0 ] && echo 1)"): $cold_layers layers, $cold_unpack ms |"
# The run whose final stage unpacked the most layers: WHOLE-STAGE.
worst=$(for w in $app_layers; do echo "$((w)) $w"; done | sort -g | tail -1 | cut -d' ' -f2)
final=$((worst)); app_bytes=$(echo "$app_bytes" | max)
echo "| app final stage unpacks nothing | $(verdict "$([ "$final" = 0 ] && echo 1)"): $final layers, $app_bytes bytes (the whole build ${worst%-*} layers, --target build ${worst#*-}) |"
