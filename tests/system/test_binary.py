"""The single binary on a clean Debian 12 with no Python (spec §1.1: "`reflector --version`
runs on a clean Linux install").

The binary is built with .ci/build-binary.sh (cached under test-artifacts/ by a hash of the
sources, so an unchanged tree reuses it), a minimal Debian 12 root is made with
`debootstrap --variant=minbase` (cached as a tarball keyed by date), and inside that root, in a
`systemd-nspawn` container with a private network, the binary alone initialises an endpoint,
pairs an appliance and measures latency over loopback.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from reflector import __version__
from reflector.update.selfupdate import host_arch

from .conftest import require_system
from .harness import ALLOW_SKIP_ENV

pytestmark = [pytest.mark.system, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "test-artifacts" / "binary"
SUITE, MIRROR = "bookworm", "http://deb.debian.org/debian"
# A first debootstrap downloads ~40 MB and unpacks ~100 packages: ~2 min here; the PyInstaller
# build another ~2 min. Generous bounds so a slow mirror fails with a message, not a hang.
DEBOOTSTRAP_TIMEOUT_S = 900
BUILD_TIMEOUT_S = 900
# The whole in-container scenario: a few start-ups of the binary (~2 s each) and 3 s of probes.
SCENARIO_TIMEOUT_S = 240
# Files whose change changes the binary.
_SOURCE_GLOBS = ("reflector/**/*.py", "pyproject.toml", ".ci/reflector.spec", ".ci/build-binary.sh")


def _fail_or_skip(message: str) -> None:
    if os.environ.get(ALLOW_SKIP_ENV) == "1":
        pytest.skip(message)
    pytest.fail(message, pytrace=False)


def source_hash() -> str:
    digest = hashlib.sha256()
    for pattern in _SOURCE_GLOBS:
        for path in sorted(REPO.glob(pattern)):
            digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def binary() -> Path:
    """The single binary for this tree: reused when the sources are unchanged, else built."""
    require_system(need_systemd=True)
    name = f"reflector-{__version__}-linux-{host_arch()}"
    out = CACHE / f"build-{source_hash()}"
    path = out / name
    if path.is_file():
        return path
    for stale in CACHE.glob("build-*"):  # binaries of older trees: ~25 MB each
        shutil.rmtree(stale, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["bash", str(REPO / ".ci" / "build-binary.sh"), "--binary-only"],
        cwd=REPO,
        env={**os.environ, "DIST": str(out)},
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    (out / "build.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0 and path.is_file(), (
        f"building the binary failed; see {out / 'build.log'}:\n{done.stderr[-3000:]}"
    )
    return path


def _debootstrap_tarball() -> Path:
    """A minbase Debian 12 root as a tarball, made once a day (CI starts clean and makes it)."""
    tarball = CACHE / f"debian-{SUITE}-minbase-{datetime.date.today():%Y%m%d}.tar"
    if tarball.is_file():
        return tarball
    if shutil.which("debootstrap") is None:
        _fail_or_skip("debootstrap is not installed (apt-get install debootstrap)")
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=CACHE))
    try:
        done = subprocess.run(
            ["debootstrap", "--variant=minbase", SUITE, str(work / "root"), MIRROR],
            capture_output=True,
            text=True,
            timeout=DEBOOTSTRAP_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            log = work.parent / "debootstrap-failed.log"
            log.write_text(done.stdout + done.stderr)
            _fail_or_skip(
                f"debootstrap of Debian {SUITE} from {MIRROR} failed (is the mirror reachable?);"
                f" log: {log}; last lines:\n{done.stdout[-1500:]}{done.stderr[-1500:]}"
            )
        partial = tarball.with_suffix(".partial")
        with tarfile.open(partial, "w") as tar:
            tar.add(work / "root", arcname=".")
        partial.rename(tarball)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tarball


@pytest.fixture
def clean_root(binary: Path) -> Iterator[Path]:
    """A fresh Debian 12 minbase root with only the binary added to it."""
    tarball = _debootstrap_tarball()
    root = Path(tempfile.mkdtemp(prefix="reflector-clean-root-"))
    try:
        # Our own tarball, made by root from debootstrap's tree: extract it as it is.
        subprocess.run(["tar", "-xpf", str(tarball), "-C", str(root)], check=True)
        shutil.copy2(binary, root / "usr/local/bin/reflector")
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_in_container(root: Path, script: str) -> subprocess.CompletedProcess[str]:
    """Run a shell script in an nspawn container on `root` with its own network (loopback
    only); the container and everything in it ends with the script."""
    return subprocess.run(
        [
            "systemd-nspawn",
            "--quiet",
            "--register=no",
            "--keep-unit",
            "--private-network",
            "--as-pid2",
            "--console=pipe",
            f"--machine=rbin-{uuid.uuid4().hex[:8]}",
            "-D",
            str(root),
            "/bin/bash",
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
        timeout=SCENARIO_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )


def test_a_clean_debian_root_has_no_python(clean_root: Path) -> None:
    """The premise of the next test: nothing in the root could run a Python program."""
    found = [str(p) for p in (clean_root / "usr").glob("**/bin/python*")]
    assert not found, f"the minimal root unexpectedly has Python: {found}"
    assert not list((clean_root / "usr/lib").glob("**/libpython*")), "libpython in the root"


SCENARIO = r"""
set -euo pipefail
R=/usr/local/bin/reflector
if command -v python3 >/dev/null; then echo "python3 is present"; exit 90; fi
$R --version
$R init --state-dir /tmp/s
EID=$($R id --state-dir /tmp/s)
echo "endpoint $EID"
APP=$($R client id --state-dir /tmp/app)
$R peers add "$APP" --state-dir /tmp/s
cat > /tmp/reflector.toml <<'EOF'
[service]
state_dir = "/tmp/s"
[network]
listen_address = "127.0.0.1:4000"
[audit]
journald = "auto"
EOF
$R serve --config /tmp/reflector.toml >/tmp/serve.log 2>&1 &
SERVE=$!
for _ in $(seq 200); do
  grep -q "^Endpoint ID:" /tmp/serve.log && break
  kill -0 $SERVE 2>/dev/null || { echo "serve exited:"; cat /tmp/serve.log; exit 91; }
  sleep 0.1
done
sleep 0.5
$R client latency -e 127.0.0.1:4000 --expect-id "$EID" --state-dir /tmp/app \
  --duration 3 --json > /tmp/latency.json
echo "--- latency"; cat /tmp/latency.json; echo "--- end"
kill -TERM $SERVE
wait $SERVE || echo "serve exit code $?"
echo "--- serve log"; cat /tmp/serve.log
echo SCENARIO-OK
"""


def test_single_binary_serves_and_measures_without_python(clean_root: Path) -> None:
    done = run_in_container(clean_root, SCENARIO)
    transcript = f"--- stdout\n{done.stdout[-6000:]}\n--- stderr\n{done.stderr[-4000:]}"
    assert done.returncode == 0 and "SCENARIO-OK" in done.stdout, transcript
    assert f"reflector {__version__} (" in done.stdout, transcript
    assert "single-binary: yes" in done.stdout, transcript
    assert "authorized PP" in done.stdout, transcript
    report = json.loads(done.stdout.split("--- latency\n", 1)[1].split("--- end", 1)[0])
    assert report["test"] == "latency" and report["mode"] == "tunneled"
    latency = report["latency"]
    assert latency["sent"] > 0 and latency["received"] == latency["sent"], report
    assert latency["rtt"]["count"] == latency["received"]


DEGRADED = r"""
set -uo pipefail
R=/usr/local/bin/reflector
rm -f /usr/lib/*/libsystemd.so.0* /usr/lib/*/libnftables.so.1*
$R init --state-dir /tmp/s >/dev/null || exit 90
# python-systemd and the libsystemd it links are inside the binary: reading the journal works.
$R audit export --source journal --state-dir /tmp/s || exit 91
echo "journal export ok"
printf '%s\n' '[service]' 'state_dir = "/tmp/s"' '[network]' \
  'listen_address = "127.0.0.1:4000"' 'mode = "direct_ephemeral"' '[audit]' \
  'journald = "off"' > /tmp/direct.toml
timeout 8 $R serve --config /tmp/direct.toml
echo "serve exit $?"
printf '%s\n' '[service]' 'state_dir = "/tmp/s"' '[network]' \
  'listen_address = "127.0.0.1:4001"' '[audit]' 'journald = "off"' > /tmp/tunneled.toml
timeout 4 $R serve --config /tmp/tunneled.toml >/tmp/tunneled.log 2>&1
echo "tunneled serve exit $?"
"""


def test_single_binary_without_libsystemd_or_libnftables_degrades_clearly(
    clean_root: Path,
) -> None:
    """The host libraries are optional: journald support is bundled; without libnftables,
    direct mode names the missing library and does not start (it would otherwise run without
    the drop rule over its data ports); tunneled mode needs neither library."""
    done = run_in_container(clean_root, DEGRADED)
    transcript = f"--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"
    assert done.returncode == 0, transcript
    assert "journal export ok" in done.stdout, transcript
    assert "serve exit 1\n" in done.stdout, transcript  # refused to start, one clear line
    assert "direct mode needs Reflector's nftables table" in done.stderr, transcript
    assert "libnftables.so.1" in done.stderr, transcript
    assert "Traceback" not in done.stderr, transcript
    assert "tunneled serve exit 124" in done.stdout, transcript  # still serving at the timeout
