"""Helpers for the hostile-input tests: a real `reflector serve` on loopback and raw clients.

`served_endpoint` runs the endpoint as its own process (so a crash is visible as an exit, and
its memory is its own), with a config given as TOML text, an appliance paired through
`reflector peers add`, and readiness read from NOTIFY_SOCKET. `RawLink` is a blocking mTLS
client from a chosen source address (127.0.0.x: every 127/8 address is loopback on Linux)
that can send arbitrary bytes and reads back whole frames, decoded but not trusted.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import psutil

from reflector.client.link_client import ApplianceIdentity
from reflector.link import NEED_DATA, FrameDecoder, decode_json, encode_frame
from reflector.link.messages import PROTOCOL_VERSION
from reflector.tls import ALPN_LINK, check_expected_peer

REFLECTOR: Final = str(Path(sys.executable).with_name("reflector"))
# A loaded CI machine starts the endpoint in about a second; allow ten.
READY_TIMEOUT_S: Final = 10.0
# How long a raw client waits for one frame before the test calls it lost.
FRAME_TIMEOUT_S: Final = 10.0
STOP_TIMEOUT_S: Final = 10.0


@dataclass
class Served:
    """A running endpoint process and what tests need to reach and inspect it."""

    proc: subprocess.Popen[bytes]
    port: int
    endpoint_id: str
    appliance: ApplianceIdentity
    state_dir: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def audit(self) -> list[dict[str, Any]]:
        path = self.state_dir / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.audit() if r.get("reflector_event") == kind]

    def link(self, source: str = "127.0.0.2") -> RawLink:
        return RawLink(self, source)


def _cli(*args: str) -> str:
    done = subprocess.run([REFLECTOR, *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"reflector {' '.join(args)}: {done.stderr}"
    return done.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def served_endpoint(root: Path, config_text: str) -> Iterator[Served]:
    """Start `reflector serve` with `config_text` (listen address added) and stop it by PID."""
    root.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    config = root / "reflector.toml"
    config.write_text(f'[network]\nlisten_address = ["127.0.0.1:{port}"]\n' + config_text)
    state = root / "state"
    out = _cli("init", "--config", str(config), "--state-dir", str(state))
    endpoint_id = out.rsplit("Endpoint ID:", 1)[1].split()[0]
    appliance = ApplianceIdentity.open(root / "appliance")
    _cli("peers", "add", appliance.identity.endpoint_id, "--config", str(config),
         "--state-dir", str(state))  # fmt: skip
    notify_path = root / "notify.sock"
    stderr_path = root / "serve.stderr"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, stderr_path.open("wb") as err:
        notify.bind(str(notify_path))
        proc = subprocess.Popen(
            [REFLECTOR, "serve", "--config", str(config), "--state-dir", str(state)],
            env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            _wait_ready(notify, proc)
            yield Served(proc, port, endpoint_id, appliance, state, stderr_path)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()


def _wait_ready(notify: socket.socket, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    notify.settimeout(0.2)
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"reflector serve exited with {proc.returncode}"
        try:
            if b"READY=1" in notify.recv(4096).split(b"\n"):
                return
        except TimeoutError:
            continue
    raise AssertionError(f"no READY=1 from reflector serve within {READY_TIMEOUT_S} s")


class RawLink:
    """A blocking, authenticated pp-link/1 connection that sends whatever bytes it is given."""

    def __init__(self, served: Served, source: str) -> None:
        raw = socket.create_connection(
            ("127.0.0.1", served.port), timeout=FRAME_TIMEOUT_S, source_address=(source, 0)
        )
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.sock = served.appliance.context(ALPN_LINK).wrap_socket(raw)
        except BaseException:
            raw.close()
            raise
        check_expected_peer(self.sock, served.endpoint_id)
        self._decoder = FrameDecoder(max_frame_size=2**32 - 1)  # we judge the sizes ourselves
        self._next_id = 1

    def __enter__(self) -> RawLink:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, obj: dict[str, Any]) -> int:
        """Send one request object, numbering it; return its request_id."""
        request_id = self._next_id
        self._next_id += 1
        self.send(encode_frame({**obj, "request_id": request_id}))
        return request_id

    def hello(self) -> dict[str, Any]:
        self.request({"type": "hello", "version": PROTOCOL_VERSION, "features": []})
        reply = self.read_frame()
        assert reply["type"] == "server_hello", reply
        return reply

    def call(self, obj: dict[str, Any]) -> dict[str, Any]:
        request_id = self.request(obj)
        reply = self.read_frame()
        assert reply.get("request_id") == request_id, reply
        return reply

    def read_payload(self, timeout: float = FRAME_TIMEOUT_S) -> bytes | None:
        """The next frame's payload, or None if the server closed the connection."""
        deadline = time.monotonic() + timeout
        while True:
            payload = self._decoder.next_frame()
            if payload is not NEED_DATA:
                assert isinstance(payload, bytes)
                return payload
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no frame from the endpoint within {timeout} s")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(64 * 1024)
            except (ConnectionResetError, ssl.SSLEOFError):
                return None
            if not data:
                return None
            self._decoder.receive_data(data)

    def read_frame(self, timeout: float = FRAME_TIMEOUT_S) -> dict[str, Any]:
        payload = self.read_payload(timeout)
        assert payload is not None, "the endpoint closed the connection instead of answering"
        obj = decode_json(payload)
        assert isinstance(obj, dict), obj
        return obj


class RssWatch:
    """Samples a process's RSS in a thread; `peak` is the highest seen (bytes)."""

    INTERVAL_S: Final = 0.05

    def __init__(self, pid: int) -> None:
        self._proc = psutil.Process(pid)
        self.peak = int(self._proc.memory_info().rss)
        self.start_rss = self.peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.INTERVAL_S):
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, int(self._proc.memory_info().rss))
