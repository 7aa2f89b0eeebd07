# Shared by the bench scripts (sourced, not run): a local Distribution
# registry with the busybox fixture pushed to it.

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
