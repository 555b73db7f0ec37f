"""The control-plane load: mTLS handshakes, RPC round trips and session grants over blocking TLS.

One client for both servers, so the client's own cost is the same on both sides of a ratio:
- against Reflector ("link"): TLS 1.3 with the appliance's Ed25519 certificate and ALPN
  pp-link/1, then Paramedic Link frames built and parsed by the project's `ClientConnection`;
- against the anchor ("rev", `openssl s_server -rev`): the same TLS with a throwaway Ed25519
  certificate, then a line that the server sends back reversed.
A "full handshake" is connect, TLS 1.3 handshake with client certificate, one request and its
answer (proof that the server accepted the certificate), close.

As a script it runs the handshake load in one process (`--threads` blocking clients sharing
`--count` handshakes) and prints {"ok", "errors", "start", "end", "first_error"} as JSON: the
benchmark starts several at once so that client work spreads over the cores. Blocking sockets
in threads, because CPython releases the GIL inside OpenSSL's handshake.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reflector.link import NEED_DATA, PROTOCOL_VERSION, ClientConnection, Reply
from reflector.link.messages import Hello, Request, Response
from reflector.tls import ALPN_LINK

# Every blocking call is bounded: a stuck server must fail the benchmark, not hang it.
SOCKET_TIMEOUT_S: Final = 15.0
READ_CHUNK: Final = 64 * 1024


def client_context(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.3 with our certificate; the server's is not checked (both servers alike)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(cert), str(key))
    ctx.set_alpn_protocols([ALPN_LINK])
    return ctx


def connect(ctx: ssl.SSLContext, port: int) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        return ctx.wrap_socket(raw)
    except BaseException:
        raw.close()
        raise


class LinkSession:
    """A blocking Paramedic Link client on one TLS connection (hello already answered)."""

    def __init__(self, ctx: ssl.SSLContext, port: int) -> None:
        self.sock = connect(ctx, port)
        self.conn = ClientConnection()
        try:
            hello = Hello(version=PROTOCOL_VERSION, features=("udp_echo", "throughput", "tunnel"))
            self.call(hello)
        except BaseException:
            self.sock.close()
            raise

    def call(self, request: Request) -> Response:
        self.sock.sendall(self.conn.send_request(request))
        while True:
            event = self.conn.next_event()
            if isinstance(event, Reply):
                return event.response
            if event is not NEED_DATA:
                raise RuntimeError(f"endpoint error: {event}")
            data = self.sock.recv(READ_CHUNK)
            if not data:
                raise ConnectionError("the endpoint closed the connection")
            self.conn.receive_data(data)

    def close(self) -> None:
        self.sock.close()


class RevSession:
    """The anchor's client: one line out, the same line reversed back."""

    def __init__(self, ctx: ssl.SSLContext, port: int) -> None:
        self.sock = connect(ctx, port)

    def ping(self) -> None:
        self.sock.sendall(b"ping\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = self.sock.recv(READ_CHUNK)
            if not chunk:
                raise ConnectionError("s_server closed the connection")
            data += chunk
        if data != b"gnip\n":
            raise RuntimeError(f"unexpected answer {data!r}")

    def close(self) -> None:
        self.sock.close()


def one_handshake(mode: str, ctx: ssl.SSLContext, port: int) -> None:
    if mode == "link":
        LinkSession(ctx, port).close()  # the hello round trip is part of it
        return
    session = RevSession(ctx, port)
    try:
        session.ping()
    finally:
        session.close()


def handshake_load(mode: str, ctx: ssl.SSLContext, port: int, count: int, threads: int) -> Any:
    lock = threading.Lock()
    state: dict[str, Any] = {"left": count, "ok": 0, "errors": 0, "first_error": None}

    def take() -> bool:
        with lock:
            if state["left"] <= 0:
                return False
            state["left"] -= 1
            return True

    def worker(step: Callable[[], None]) -> None:
        while take():
            try:
                step()
                ok = True
            except (OSError, RuntimeError) as exc:
                ok = False
                error = f"{type(exc).__name__}: {exc}"
            with lock:
                if ok:
                    state["ok"] += 1
                else:
                    state["errors"] += 1
                    state["first_error"] = state["first_error"] or error

    start = time.time()
    pool = [
        threading.Thread(target=worker, args=(lambda: one_handshake(mode, ctx, port),))
        for _ in range(threads)
    ]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return {**state, "start": start, "end": time.time()}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("link", "rev"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args()
    ctx = client_context(args.cert, args.key)
    doc = handshake_load(args.mode, ctx, args.port, args.count, args.threads)
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
