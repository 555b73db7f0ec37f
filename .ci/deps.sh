#!/usr/bin/env bash
# Install what Reflector needs on a fresh Debian 12 host: apt packages (only the missing ones),
# then a venv in .venv with the package and its test tools. Idempotent and quiet when done.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3 python3-venv python3-dev python3-wheel gcc pkg-config libsystemd-dev
  nftables libnftables1 iperf3 openssl iproute2 procps util-linux
  systemd systemd-container stunnel4 irtt minisign traceroute mtr-tiny python3-jinja2
  ansible-core ansible-lint python3-apt curl
)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "deps: missing apt packages (run as root to install): ${missing[*]}" >&2
    exit 1
  fi
  echo "deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "deps: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.reflector-deps
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  echo "deps: installing the package and its tools into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e ".[system,dev]"
  touch "$stamp"
fi
