#!/usr/bin/env bash
# `make vagrant-test`: the firewall-choreography tests against three real machines.
#
# Steps: install the host tools that are missing; build the wheelhouse the machines install
# from (they have no registry access); build or reuse the LXC box (vagrant/build-box.sh); create
# the private network (a bridge of our own and a dnsmasq that gives each machine its fixed
# address); `vagrant up` and provision (the endpoint through Vagrant's ansible provisioner with
# ansible/playbook.yml, the appliance with vagrant/appliance.yml); pair the appliance with the
# endpoint; run vagrant/tests with pytest-testinfra over SSH; and ALWAYS tear everything down
# (`vagrant destroy -f`, dnsmasq stopped by its PID, the bridge deleted), on failure and on
# Ctrl-C too. Only the box (a cache, keyed by the recipe's hash) outlives a run.
#
# Usage: vagrant/run-tests.sh [extra pytest args]     (as root: lxc, bridges, debootstrap)
# Env:   REFLECTOR_VAGRANT_KEEP=1   skip the teardown, to debug the machines by hand
#                                   (then: vagrant/run-tests.sh --destroy-only RUN_DIR)
#        REFLECTOR_VAGRANT_CACHE    box cache (default /var/cache/reflector-vagrant)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
CACHE_DIR=${REFLECTOR_VAGRANT_CACHE:-/var/cache/reflector-vagrant}
ARTIFACTS=$REPO/test-artifacts/vagrant

# The private network. One bridge of our own (not lxcbr0, which a host's lxc-net may own and
# which we must then neither reconfigure nor delete), on a documentation range. The addresses
# and MACs must match MACHINES in the Vagrantfile.
BRIDGE=reflvg0
GATEWAY=198.51.100.1
PREFIX=24
DHCP_RANGE=198.51.100.100,198.51.100.200
DHCP_HOSTS=(
  00:16:3e:52:46:0a,198.51.100.10
  00:16:3e:52:46:0b,198.51.100.11
  00:16:3e:52:46:0c,198.51.100.12
)
MACHINES=(endpoint appliance outsider)
# The host tools this script needs (Debian 12 packages).
APT_PACKAGES=(vagrant vagrant-lxc lxc debootstrap dnsmasq-base ansible-core openssh-client)
# A whole run takes about 10 minutes; a hung `vagrant up` or test must not eat CI's 90.
UP_TIMEOUT_S=900
PROVISION_TIMEOUT_S=900
TESTS_TIMEOUT_S=1200

log() { printf '\n== vagrant-test: %s\n' "$*" >&2; }
die() { printf 'vagrant-test: %s\n' "$*" >&2; exit 1; }

declare -A TIMINGS=()
TIMING_ORDER=()
timed() {  # timed NAME CMD...: run CMD and record how long it took
  local name=$1 t0=$SECONDS rc=0
  shift
  "$@" || rc=$?
  TIMINGS[$name]=$((SECONDS - t0))
  TIMING_ORDER+=("$name")
  return "$rc"
}
print_timings() {
  local name line="timings (s):"
  for name in "${TIMING_ORDER[@]}"; do line+=" $name=${TIMINGS[$name]}"; done
  printf '%s\n' "$line" >&2
}

ensure_packages() {
  local pkg missing=()
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Other jobs on the machine may hold apt's lock for a while: wait for it, do not fail.
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_venv() {
  # pytest-testinfra and the wheel build come from the project's venv (`make deps`).
  if ! "$REPO/.venv/bin/python" -c "import testinfra, pytest" 2>/dev/null; then
    bash "$REPO/.ci/deps.sh"
  fi
}

build_wheelhouse() {
  # Every wheel the role installs on a machine that cannot reach PyPI: reflector itself and
  # its dependencies (the `system` extra too: systemd-python is compiled here, against the
  # same Debian 12 libsystemd the box has).
  rm -rf "$RUN_DIR/wheelhouse"
  "$REPO/.venv/bin/pip" wheel -q --disable-pip-version-check --wheel-dir "$RUN_DIR/wheelhouse" \
    "$REPO[system]" > "$RUN_DIR/wheelhouse.log" 2>&1 \
    || { tail -n 30 "$RUN_DIR/wheelhouse.log" >&2; return 1; }
  ls "$RUN_DIR/wheelhouse"/reflector-*.whl > /dev/null
}

network_up() {
  if ip link show "$BRIDGE" > /dev/null 2>&1; then
    die "bridge $BRIDGE already exists: another run is active, or a killed run left it" \
      "(if none runs: ip link del $BRIDGE)"
  fi
  ip link add "$BRIDGE" type bridge
  echo "$BRIDGE" > "$RUN_DIR/bridge"
  ip addr add "$GATEWAY/$PREFIX" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  local args=(
    --conf-file=/dev/null --bind-interfaces --interface="$BRIDGE" --except-interface=lo
    --listen-address="$GATEWAY" --port=0 --dhcp-range="$DHCP_RANGE,1h"
    --dhcp-authoritative --pid-file="$RUN_DIR/dnsmasq.pid"
    --dhcp-leasefile="$RUN_DIR/dnsmasq.leases" --log-facility="$RUN_DIR/dnsmasq.log"
  )
  local host
  for host in "${DHCP_HOSTS[@]}"; do args+=(--dhcp-host="$host"); done
  dnsmasq "${args[@]}"
}

network_down() {
  local pid
  if [[ -s $RUN_DIR/dnsmasq.pid ]]; then
    pid=$(cat "$RUN_DIR/dnsmasq.pid")
    # Only the dnsmasq this run started: its PID file, and its command line must say so.
    if grep -qa -- "--pid-file=$RUN_DIR/dnsmasq.pid" "/proc/$pid/cmdline" 2>/dev/null; then
      kill "$pid" || true
    fi
    rm -f "$RUN_DIR/dnsmasq.pid"
  fi
  if [[ -s $RUN_DIR/bridge ]]; then
    ip link del "$(cat "$RUN_DIR/bridge")" 2>/dev/null || true
    rm -f "$RUN_DIR/bridge"
  fi
}

vagrant_env() {
  export VAGRANT_CWD=$HERE
  # Machine state lives with the run, not in the repository: parallel checkouts and a
  # read-only clone both work, and nothing is left in the work tree.
  export VAGRANT_DOTFILE_PATH=$RUN_DIR/dotvagrant
  export VAGRANT_DEFAULT_PROVIDER=lxc
  export VAGRANT_CHECKPOINT_DISABLE=1
  export VAGRANT_NO_COLOR=1
  export REFLECTOR_VAGRANT_BOX=$BOX
  export REFLECTOR_VAGRANT_RUN=$RUN_ID
  export REFLECTOR_VAGRANT_BRIDGE=$BRIDGE
  export REFLECTOR_WHEELHOUSE=$RUN_DIR/wheelhouse
  export REFLECTOR_VAGRANT_SSH_CONFIG=$RUN_DIR/ssh-config
  export ANSIBLE_NOCOLOR=1
  export ANSIBLE_FORCE_COLOR=0
}

machines_up() {
  timeout "$UP_TIMEOUT_S" vagrant up --no-provision --provider=lxc > "$RUN_DIR/up.log" 2>&1 \
    || { tail -n 40 "$RUN_DIR/up.log" >&2; return 1; }
  vagrant ssh-config "${MACHINES[@]}" > "$RUN_DIR/ssh-config"
}

machines_provision() {
  timeout "$PROVISION_TIMEOUT_S" vagrant provision > "$RUN_DIR/provision.log" 2>&1 \
    || { tail -n 60 "$RUN_DIR/provision.log" >&2; return 1; }
  grep -E "^ *(endpoint|appliance) *: *(ok|changed)=" "$RUN_DIR/provision.log" >&2 || true
}

on() {  # on MACHINE CMD...: run a command on a machine over SSH
  local machine=$1
  shift
  ssh -F "$RUN_DIR/ssh-config" -o BatchMode=yes -o LogLevel=ERROR "$machine" "$@"
}

pair_appliance() {
  local appliance_id
  appliance_id=$(on appliance sudo /usr/local/bin/reflector client id | tr -d '[:space:]')
  [[ $appliance_id == PP* ]] || die "unexpected appliance id: $appliance_id"
  echo "$appliance_id" > "$RUN_DIR/appliance-id"
  # As the service's user: the allowlist lives in its 0700 state dir.
  on endpoint sudo -u reflector /usr/local/bin/reflector peers add "$appliance_id" \
    --config /etc/reflector/reflector.toml
  on endpoint sudo -u reflector /usr/local/bin/reflector id --config /etc/reflector/reflector.toml \
    > "$RUN_DIR/endpoint-id"
}

run_pytest() {
  # The tests switch the endpoint's mode by re-provisioning it (`vagrant provision endpoint`
  # with REFLECTOR_MODE), so they inherit the Vagrant environment exported above.
  timeout "$TESTS_TIMEOUT_S" "$REPO/.venv/bin/python" -m pytest -p no:cacheprovider -ra \
    --rootdir="$HERE/tests" -c /dev/null \
    --ssh-config="$RUN_DIR/ssh-config" \
    --hosts="ssh://endpoint,ssh://appliance,ssh://outsider" \
    "$HERE/tests" "$@"
}

save_artifacts() {
  mkdir -p "$ARTIFACTS"
  cp -f "$RUN_DIR"/*.log "$ARTIFACTS/" 2>/dev/null || true
  [[ -s $RUN_DIR/ssh-config ]] || return 0
  on endpoint sudo journalctl --no-pager -n 400 -u 'reflector*' -u nftables \
    > "$ARTIFACTS/endpoint-journal.txt" 2>&1 || true
  on endpoint sudo nft list ruleset > "$ARTIFACTS/endpoint-ruleset.txt" 2>&1 || true
}

teardown() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if [[ -n ${RUN_DIR:-} && -d $RUN_DIR ]]; then
    save_artifacts
    if [[ ${REFLECTOR_VAGRANT_KEEP:-0} == 1 ]]; then
      log "KEEPING the machines: vagrant/run-tests.sh --destroy-only $RUN_DIR"
      print_timings
      exit "$rc"
    fi
    log "destroying the machines and the network"
    if [[ -d $RUN_DIR/dotvagrant ]]; then
      timed destroy timeout 300 vagrant destroy -f > "$RUN_DIR/destroy.log" 2>&1 \
        || tail -n 20 "$RUN_DIR/destroy.log" >&2
      cp -f "$RUN_DIR/destroy.log" "$ARTIFACTS/" 2>/dev/null
    fi
    # A container vagrant lost track of (an interrupted `up`) is still ours by its name.
    local name
    for name in "${MACHINES[@]}"; do
      if lxc-info -n "reflector-$RUN_ID-$name" > /dev/null 2>&1; then
        lxc-stop -k -n "reflector-$RUN_ID-$name" > /dev/null 2>&1
        lxc-destroy -n "reflector-$RUN_ID-$name" > /dev/null 2>&1
      fi
    done
    network_down
    rm -rf --one-file-system "$RUN_DIR"
  fi
  print_timings
  if [[ ${DESTROY_ONLY:-0} == 1 ]]; then
    log "torn down"
  elif ((rc == 0)); then
    log "passed"
  else
    log "FAILED (exit $rc); logs in $ARTIFACTS"
  fi
  exit "$rc"
}

destroy_only() {
  # Tear down a run kept with REFLECTOR_VAGRANT_KEEP=1.
  RUN_DIR=$1
  RUN_ID=$(basename "$RUN_DIR" | sed 's/^run-//')
  BOX=$(cat "$RUN_DIR/box" 2>/dev/null || true)
  vagrant_env
  REFLECTOR_VAGRANT_KEEP=0
  DESTROY_ONLY=1
  trap teardown EXIT
  exit 0
}

main() {
  [[ $(id -u) -eq 0 ]] || die "must run as root (lxc, bridges, debootstrap)"
  if [[ ${1:-} == --destroy-only ]]; then
    destroy_only "$2"
  fi
  install -d -m 0755 "$CACHE_DIR"
  # One run per host at a time: the bridge and its subnet exist once.
  exec 8> "$CACHE_DIR/run.lock"
  flock -n 8 || die "another vagrant-test run holds $CACHE_DIR/run.lock"

  RUN_ID=$(date +%H%M%S)-$$
  RUN_DIR=$CACHE_DIR/run-$RUN_ID
  mkdir -p "$RUN_DIR"
  rm -rf "$ARTIFACTS"
  trap teardown EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM

  log "host packages"
  timed packages ensure_packages
  ensure_venv
  log "wheelhouse"
  timed wheelhouse build_wheelhouse
  log "box (built once, then reused from $CACHE_DIR)"
  local t0=$SECONDS
  BOX=$(bash "$HERE/build-box.sh" | tail -n1)
  TIMINGS[box]=$((SECONDS - t0))
  TIMING_ORDER+=(box)
  [[ -n $BOX ]] || die "build-box.sh printed no box name"
  echo "$BOX" > "$RUN_DIR/box"
  vagrant_env
  log "network $BRIDGE $GATEWAY/$PREFIX"
  network_up
  log "vagrant up (box $BOX, run $RUN_ID)"
  timed up machines_up
  log "provision (ansible: endpoint with the role, appliance with appliance.yml)"
  timed provision machines_provision
  log "pair the appliance with the endpoint"
  timed pair pair_appliance
  log "tests"
  timed tests run_pytest "$@"
}

main "$@"
