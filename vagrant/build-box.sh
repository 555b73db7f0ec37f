#!/usr/bin/env bash
# Build (or reuse) the Debian 12 Vagrant box for the LXC provider that vagrant/Vagrantfile runs.
#
# Why a box of our own: no Vagrant box can be downloaded on the build machines, and the machines
# the box starts have no route to any package registry. So the box is a debootstrap'ed Debian 12
# root that already holds every package the Ansible role installs (the role then finds them
# present), plus what Vagrant needs to reach it (sshd, sudo, a `vagrant` user with Vagrant's
# insecure key, eth0 on DHCP).
#
# The box file is cached outside the repo, keyed by a hash of this script, so a re-run reuses it
# and any change to the recipe (package list included) builds a new one. The box is registered
# with `vagrant box add` under a name that carries the same hash; the name is printed on the last
# line of stdout so callers can capture it: BOX=$(vagrant/build-box.sh | tail -n1).
#
# Usage: vagrant/build-box.sh            (as root; needs debootstrap, vagrant, vagrant-lxc)
# Env:   REFLECTOR_VAGRANT_CACHE  cache folder (default /var/cache/reflector-vagrant)
#        REFLECTOR_BOX_MIRROR     Debian mirror (default: this host's first apt source)
set -euo pipefail

SCRIPT=$(readlink -f "$0")
CACHE_DIR=${REFLECTOR_VAGRANT_CACHE:-/var/cache/reflector-vagrant}
SUITE=bookworm

# Everything the machines need at run time, because they cannot download anything:
# - what Vagrant needs to manage a Debian guest: openssh-server, sudo, ifupdown, isc-dhcp-client;
# - a real init for the unit and journald tests: systemd, systemd-sysv, dbus;
# - what the role installs (ansible/roles/reflector): python3, python3-venv, iperf3, nftables,
#   minisign, libnftables1, libsystemd0;
# - what Ansible itself needs on a target: python3-apt (apt module), python3-setuptools (the
#   pip module imports pkg_resources), acl (become_user to an unprivileged user);
# - what every Debian server has and minbase lacks: netbase (/etc/services: nft resolves
#   service names such as dhcpv6-client through it);
# - what the tests run inside the machines: iproute2, procps, python3 (the port scan, the
#   closed-port probes); iputils-ping, traceroute and mtr-tiny (the trace-target tests run
#   Debian's own tools from the appliance, as a PacketParamedic appliance does);
# - libnss-myhostname: the machine's own name always resolves (sudo looks it up, and with no
#   DNS on the private network every sudo would otherwise wait for a resolver timeout).
PACKAGES=(
  openssh-server sudo systemd systemd-sysv dbus iproute2 procps ifupdown isc-dhcp-client
  libnss-myhostname netbase
  python3 python3-venv python3-apt python3-setuptools acl
  iperf3 nftables libnftables1 libsystemd0 minisign
  iputils-ping traceroute mtr-tiny
)

BUILD_DIR=""
# A failed or interrupted build leaves nothing behind but the cache folder and its lock.
# (debootstrap mounts /proc and /sys in the root while it works: unmount any it left first).
cleanup() {
  [[ -n $BUILD_DIR ]] || return 0
  findmnt -rn -o TARGET | grep "^$BUILD_DIR/" | sort -r | xargs -r umount -l || true
  rm -rf --one-file-system "$BUILD_DIR"
}
trap cleanup EXIT

log() { printf 'build-box: %s\n' "$*" >&2; }

recipe_hash() {
  sha256sum "$SCRIPT" | cut -c1-12
}

default_mirror() {
  # The host reaches Debian's packages through its configured source; use the same one.
  local uri=""
  if [[ -r /etc/apt/sources.list.d/debian.sources ]]; then
    uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  fi
  if [[ -z $uri && -r /etc/apt/sources.list ]]; then
    uri=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list)
  fi
  printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}

vagrant_insecure_pubkey() {
  local key
  key=$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | head -n1)
  [[ -n $key ]] || { log "Vagrant's insecure public key not found (is vagrant installed?)"; exit 1; }
  printf '%s\n' "$key"
}

configure_root() {
  local root=$1
  # The vagrant user: passwordless sudo and Vagrant's insecure key (Vagrant swaps in a fresh
  # per-machine key on the first `vagrant up`).
  chroot "$root" useradd --create-home --shell /bin/bash vagrant
  install -d -m 0700 -o 0 -g 0 "$root/home/vagrant/.ssh"
  install -m 0600 "$(vagrant_insecure_pubkey)" "$root/home/vagrant/.ssh/authorized_keys"
  chroot "$root" chown -R vagrant:vagrant /home/vagrant/.ssh
  printf 'vagrant ALL=(ALL) NOPASSWD:ALL\n' > "$root/etc/sudoers.d/vagrant"
  chmod 0440 "$root/etc/sudoers.d/vagrant"

  cat > "$root/etc/network/interfaces" <<'EOF'
auto lo
iface lo inet loopback

auto eth0
iface eth0 inet dhcp
EOF
  # Every machine must get its own machine-id and ssh host keys, not the box's: an empty
  # machine-id makes systemd generate one at first boot, and a oneshot regenerates host keys.
  : > "$root/etc/machine-id"
  rm -f "$root"/etc/ssh/ssh_host_*
  cat > "$root/etc/systemd/system/ssh-hostkeys.service" <<'EOF'
[Unit]
Description=Generate this machine's own ssh host keys
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
RequiredBy=ssh.service
EOF
  # No name of its own: each container keeps the one the provider gives it (reflector-RUN-
  # endpoint...). minbase has no /etc/hosts, and its resolv.conf is the build host's, whose
  # nameserver the machines cannot reach: name lookups must fail at once, not time out.
  rm -f "$root/etc/hostname"
  printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' > "$root/etc/hosts"
  printf '# No DNS on the private network (see vagrant/build-box.sh).\n' > "$root/etc/resolv.conf"
  chroot "$root" systemctl enable ssh-hostkeys.service ssh.service networking.service >/dev/null
  # The box must not start an iperf3 daemon of its own: Reflector spawns iperf3 per session.
  chroot "$root" systemctl disable iperf3.service >/dev/null 2>&1 || true
  # The downloaded .debs are not needed in the box (it halves its size).
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
}

package_box() {
  local root=$1 out=$2 work
  work=$(dirname "$root")
  # vagrant-lxc unpacks rootfs.tar.gz and expects its entries under `rootfs/`.
  tar --numeric-owner -C "$work" -czf "$work/rootfs.tar.gz" ./rootfs
  printf 'lxc.arch = x86_64\nlxc.include = /usr/share/lxc/config/common.conf\n' > "$work/lxc-config"
  printf '{"provider":"lxc","version":"1.0.0","built-on":"%s"}\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    > "$work/metadata.json"
  tar -C "$work" -czf "$out.partial" rootfs.tar.gz lxc-config metadata.json
  mv "$out.partial" "$out"
}

build_box_file() {
  local out=$1 work
  work=$(mktemp -d "$CACHE_DIR/build.XXXXXX")
  BUILD_DIR=$work
  local packages
  packages=$(IFS=,; printf '%s' "${PACKAGES[*]}")
  log "debootstrap $SUITE minbase (about 4 minutes)"
  debootstrap --variant=minbase --include="$packages" "$SUITE" "$work/rootfs" "$(default_mirror)" \
    > "$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
  configure_root "$work/rootfs"
  log "packaging $out"
  package_box "$work/rootfs" "$out"
}

prune_other_boxes() {
  # Boxes of earlier recipes are never used again: drop their files and registrations.
  local keep=$1 file name
  for file in "$CACHE_DIR"/reflector-debian12-*.box; do
    [[ -e $file && $(basename "$file" .box) != "$keep" ]] || continue
    log "removing the old box $(basename "$file")"
    rm -f "$file"
  done
  vagrant box list --machine-readable 2>/dev/null \
    | awk -F, -v keep="$keep" '$3 == "box-name" && $4 ~ /^reflector-debian12-/ && $4 != keep {print $4}' \
    | while read -r name; do
      vagrant box remove --force --all "$name" >&2 || true
    done
}

main() {
  [[ $(id -u) -eq 0 ]] || { log "must run as root (debootstrap, chroot)"; exit 1; }
  install -d -m 0755 "$CACHE_DIR"
  local hash box_name box_file
  hash=$(recipe_hash)
  box_name="reflector-debian12-$hash"
  box_file="$CACHE_DIR/$box_name.box"
  # Two runs at once must not build the same box twice or add it half-written.
  exec 9> "$CACHE_DIR/build.lock"
  flock 9
  if [[ -s $box_file ]]; then
    log "reusing $box_file"
  else
    local t0=$SECONDS
    build_box_file "$box_file"
    log "built $box_file in $((SECONDS - t0)) s"
  fi
  prune_other_boxes "$box_name"
  if ! vagrant box list --machine-readable 2>/dev/null | grep -q ",box-name,$box_name\$"; then
    log "vagrant box add $box_name"
    vagrant box add --force --name "$box_name" "$box_file" >&2
  fi
  printf '%s\n' "$box_name"
}

main "$@"
