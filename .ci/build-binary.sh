#!/usr/bin/env bash
# Build the release artifacts into dist/:
#   dist/reflector-<version>-linux-<arch>   one executable with its own Python and dependencies
#   dist/reflector-<version>-py3-none-any.whl and dist/reflector-<version>.tar.gz
# PyInstaller (one-file) goes into the build venv here, not into the project's dependencies.
# The binary is built for the machine it runs on: run this script on an arm64 host (or an
# arm64 container/VM) to get the arm64 binary. Needs `make deps` (or .ci/deps.sh) first.
#   --binary-only   skip the wheel and sdist (the binary system test uses this)
#   DIST=DIR        write the artifacts to DIR instead of dist/
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
DIST=${DIST:-dist}
binary_only=0
[[ ${1:-} == --binary-only ]] && binary_only=1
# Pinned to a major version: the spec file uses its API.
PYINSTALLER_REQ="pyinstaller>=6.10,<7"
BUILD_REQ="build>=1.2,<2"

case "$(uname -m)" in
  x86_64) arch=amd64 ;;
  aarch64 | arm64) arch=arm64 ;;
  *) echo "build-binary: unsupported machine $(uname -m) (amd64 and arm64 are built)" >&2; exit 1 ;;
esac
version=$("$PY" -c 'import reflector; print(reflector.__version__)')
name="reflector-${version}-linux-${arch}"

"$PY" -m pip install -q "$PYINSTALLER_REQ" "$BUILD_REQ"
# The binary bundles the optional system extras (journald, nftables) when the venv has them.
"$PY" -c 'import systemd.journal, nftables' 2>/dev/null \
  || echo "build-binary: warning: python-systemd or pip-nftables missing from $PY: the binary will lack journald/nftables support" >&2

mkdir -p "$DIST" build
echo "build-binary: building $DIST/$name"
REFLECTOR_BINARY_NAME="$name" "$PY" -m PyInstaller --noconfirm --clean --log-level WARN \
  --distpath "$DIST" --workpath build/pyinstaller .ci/reflector.spec
"$DIST/$name" --version
((binary_only)) && exit 0

echo "build-binary: building the wheel and sdist"
"$PY" -m build --wheel --sdist --outdir "$DIST" . >build/python-build.log 2>&1 \
  || { tail -n 30 build/python-build.log >&2; exit 1; }
ls -l "$DIST/$name" "$DIST"/*.whl "$DIST"/*.tar.gz
