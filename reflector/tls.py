"""Mutual TLS 1.3 with self-signed, key-pinned Ed25519 certificates (spec §5.1, §5.2).

Every peer's certificate is self-signed and its public key *is* the peer's identity: there is no
CA, so chain verification has nothing to say. Who the peer is gets decided after the handshake,
by the application, from the public key (`peer_id_of`), and whether it may talk is the allowlist's
business (spec §5.3), not this module's.

Python's `ssl` cannot express that. With `CERT_REQUIRED` OpenSSL rejects any self-signed peer
certificate that is not in the trust store; with `CERT_NONE` a server does not even ask the client
for a certificate. So both contexts are built with `CERT_REQUIRED` (the server then sends a
CertificateRequest and, when the client sends no certificate, fails with TLS alert 116
certificate_required), and the trust-store check is replaced, through ctypes, by OpenSSL's
application verification hook (`SSL_CTX_set_cert_verify_callback`). Our hook accepts a chain whose
leaf carries an Ed25519 key and rejects anything else with alert 42 bad_certificate, so a peer
with an unusable key learns why instead of seeing a silent close.

What the hook does not replace: proof of key possession. The TLS 1.3 CertificateVerify signature
over the handshake transcript is checked by OpenSSL against the leaf's public key whatever the
chain verification said, so a peer cannot claim someone else's certificate without the private
key.

Reaching the `SSL_CTX*` behind an `ssl.SSLContext` relies on CPython's object layout (the pointer
is the first field after the object header). That is checked before use, against values Python
set through its own API, and the context is refused (fail closed) if anything disagrees.

Servers built on asyncio should listen through `server_protocol_factory` rather than `ssl=`:
Python 3.11's asyncio closes a failed handshake without sending OpenSSL's alert, so a refused
peer would read a bare EOF instead of "certificate required".
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import ssl
from asyncio import sslproto
from collections.abc import Callable, Sequence
from pathlib import Path

from reflector.certificate import BadCertificate, peer_id_from_certificate_der
from reflector.endpoint_id import parse_id
from reflector.errors import EndpointIdError, ReflectorError

__all__ = [
    "ALPN_HTTP",
    "ALPN_LINK",
    "ALPN_TUNNEL",
    "HANDSHAKE_TIMEOUT",
    "AlertingSSLProtocol",
    "EndpointMismatch",
    "TlsSetupError",
    "check_expected_peer",
    "client_context",
    "peer_id_of",
    "server_context",
    "server_protocol_factory",
]

# Application protocols (RFC 7301), versioned so a v2 can be negotiated alongside v1.
ALPN_LINK = "pp-link/1"  # the control-plane RPC ("Paramedic Link", spec §6)
ALPN_TUNNEL = "pp-tunnel/1"  # a tunneled data-plane stream (spec §3.2, tunneled mode)
ALPN_HTTP = "http/1.1"  # `GET /health` over the mTLS port (spec §7.4), for allowlisted keys

# OpenSSL ABI constants (stable since 1.1.0; the version check in _libssl guards the rest).
_SSL_VERIFY_PEER = 0x01
_SSL_VERIFY_FAIL_IF_NO_PEER_CERT = 0x02
# What CERT_REQUIRED means on the wire: request a certificate and fail without one.
_EXPECTED_VERIFY_MODE = _SSL_VERIFY_PEER | _SSL_VERIFY_FAIL_IF_NO_PEER_CERT
_SSL_CTRL_GET_MIN_PROTO_VERSION = 130
_SSL_CTRL_GET_MAX_PROTO_VERSION = 131
_TLS1_3_VERSION = 0x0304
_NID_ED25519 = 1087
# "certificate rejected": OpenSSL maps it to alert 42 bad_certificate.
_X509_V_ERR_CERT_REJECTED = 28
# A harmless option bit (server cipher preference; ignored by TLS 1.3 suites) flipped through
# Python and read back through ctypes, to prove the pointer is this context's live SSL_CTX.
_PROBE_OPTION = ssl.OP_CIPHER_SERVER_PREFERENCE

# A loopback handshake takes ~2 ms and a WAN one a few round trips; 10 s bounds how long a peer
# that connects and then stalls can hold a connection slot before it is dropped.
HANDSHAKE_TIMEOUT = 10.0

# Handshake-time options. No tickets: nothing resumes, so every connection presents and proves
# its key afresh, and idle servers keep no ticket keys. No compression: CRIME-style leaks.
_OPTIONS = ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


class TlsSetupError(ReflectorError):
    """A TLS context cannot be built safely (unreadable key/certificate, unknown ssl layout)."""


class EndpointMismatch(ReflectorError):
    """The peer proved a key, but not the one whose ID the caller pinned."""


def server_context(
    cert_path: Path,
    key_path: Path,
    alpn: Sequence[str] = (ALPN_LINK, ALPN_TUNNEL, ALPN_HTTP),
) -> ssl.SSLContext:
    """A TLS 1.3-only server context that requires and accepts any Ed25519 client certificate.

    The handshake only proves the client holds the key in its certificate; callers must then
    identify it with `peer_id_of` and authorise that ID.
    """
    context = _mutual_context(ssl.PROTOCOL_TLS_SERVER, cert_path, key_path, list(alpn))
    # Python's option alone still lets OpenSSL 3 send stateful TLS 1.3 tickets; send none.
    context.num_tickets = 0
    return context


def client_context(cert_path: Path, key_path: Path, alpn: str = ALPN_LINK) -> ssl.SSLContext:
    """A TLS 1.3-only client context presenting our certificate and accepting any Ed25519 server.

    There is no hostname check: the server is pinned by its key with `check_expected_peer`.
    """
    return _mutual_context(ssl.PROTOCOL_TLS_CLIENT, cert_path, key_path, [alpn])


def peer_id_of(ssl_obj: ssl.SSLObject | ssl.SSLSocket) -> str:
    """The peer's ID, computed from the public key of the certificate it proved in the handshake.

    Raises BadCertificate when the peer sent no certificate or one without an Ed25519 key.
    """
    der = ssl_obj.getpeercert(binary_form=True)
    if not der:
        raise BadCertificate("the peer presented no certificate")
    return peer_id_from_certificate_der(der)


def check_expected_peer(ssl_obj: ssl.SSLObject | ssl.SSLSocket, expected_id: str) -> str:
    """Return the peer's ID if it is `expected_id` (any accepted spelling), else raise.

    This is how a client pins the endpoint it meant to reach: with no CA and no hostname, the
    key is the only thing that can say it is the right server.
    """
    try:
        expected = parse_id(expected_id)
    except EndpointIdError as exc:
        raise EndpointMismatch(f"the expected endpoint ID is not valid: {exc}") from exc
    actual = peer_id_of(ssl_obj)
    if actual != expected:
        raise EndpointMismatch(f"peer is {actual}, expected {expected}: refusing to continue")
    return actual


def server_protocol_factory(
    context: ssl.SSLContext,
    app_protocol_factory: Callable[[], asyncio.BaseProtocol],
    *,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> Callable[[], asyncio.BaseProtocol]:
    """A protocol factory for `loop.create_server(factory, host, port)` (no `ssl=` argument).

    It runs asyncio's own TLS server protocol, so the application protocol sees the same
    transport as with `ssl=context`, except that a refused handshake sends its TLS alert
    (certificate_required, bad_certificate, protocol_version) before the connection closes.
    """

    def build() -> asyncio.BaseProtocol:
        return AlertingSSLProtocol(
            asyncio.get_running_loop(),
            app_protocol_factory(),
            context,
            None,  # type: ignore[arg-type]  # no waiter: nobody awaits a server connection
            server_side=True,
            ssl_handshake_timeout=handshake_timeout,  # type: ignore[arg-type]  # float is fine
        )

    return build


class AlertingSSLProtocol(sslproto.SSLProtocol):
    """asyncio's TLS protocol, changed in one place: a failed handshake flushes its alert.

    Python 3.11's asyncio drops the connection as soon as the handshake raises, discarding the
    alert OpenSSL has just queued, so a refused peer reads a bare EOF instead of the reason.
    """

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        # Private to asyncio; if a later Python renames it, the alert is lost as before, no worse.
        flush = getattr(self, "_process_outgoing", None)
        transport = self._transport
        if handshake_exc is not None and flush and transport and not transport.is_closing():
            flush()
        super()._on_handshake_complete(handshake_exc)


def _mutual_context(
    protocol: ssl._SSLMethod, cert_path: Path, key_path: Path, alpn: list[str]
) -> ssl.SSLContext:
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.options |= _OPTIONS
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(alpn)
    try:
        context.load_cert_chain(certfile=cert_path, keyfile=key_path)
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(
            f"cannot load TLS certificate {cert_path} with key {key_path}: {exc}"
        ) from exc
    _accept_ed25519_peers(context)
    return context


def _accept_ed25519_peers(context: ssl.SSLContext) -> None:
    """Replace trust-store verification of the peer's chain by our Ed25519 leaf check."""
    lib = _libssl()
    address = _ssl_ctx_address(context)
    _check_ssl_ctx_address(lib, context, address)
    lib.SSL_CTX_set_cert_verify_callback(address, _VERIFY_CALLBACK, None)


def _ssl_ctx_address(context: ssl.SSLContext) -> int:
    """The `SSL_CTX*` stored right after the object header of CPython's PySSLContext struct."""
    header_size = object.__basicsize__
    if type(context).__basicsize__ < header_size + ctypes.sizeof(ctypes.c_void_p):
        raise TlsSetupError("ssl.SSLContext has an unknown layout: refusing to start")
    return ctypes.c_void_p.from_address(id(context) + header_size).value or 0


def _check_ssl_ctx_address(lib: ctypes.CDLL, context: ssl.SSLContext, address: int) -> None:
    """Fail closed unless `address` is the live SSL_CTX that `context` configures.

    Every value compared was set through Python's own API, so a wrong pointer, a different
    OpenSSL instance or a changed struct shows up as a mismatch, not as a silently open door.
    """
    if not address:
        raise TlsSetupError("ssl.SSLContext has no OpenSSL context pointer: refusing to start")
    observed = (
        lib.SSL_CTX_get_verify_mode(address),
        lib.SSL_CTX_get_options(address),
        lib.SSL_CTX_ctrl(address, _SSL_CTRL_GET_MIN_PROTO_VERSION, 0, None),
        lib.SSL_CTX_ctrl(address, _SSL_CTRL_GET_MAX_PROTO_VERSION, 0, None),
    )
    expected = (_EXPECTED_VERIFY_MODE, int(context.options), _TLS1_3_VERSION, _TLS1_3_VERSION)
    if observed != expected or not _probe_sees_python_changes(lib, context, address):
        raise TlsSetupError(
            "cannot reach the OpenSSL context behind ssl.SSLContext safely "
            f"(read {observed}, expected {expected}): refusing to start"
        )


def _probe_sees_python_changes(lib: ctypes.CDLL, context: ssl.SSLContext, address: int) -> bool:
    """Flip one option bit through Python and check the pointer sees it, then restore it."""
    original = context.options
    try:
        context.options = original ^ _PROBE_OPTION
        flipped = int(lib.SSL_CTX_get_options(address)) == int(original ^ _PROBE_OPTION)
    finally:
        context.options = original
    return flipped and int(lib.SSL_CTX_get_options(address)) == int(original)


_VerifyCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


def _verify_leaf_is_ed25519(store_ctx: int | None, _arg: int | None) -> int:
    """OpenSSL's chain check for us: 1 if the leaf key is Ed25519, else 0 with a reason set.

    Runs inside the handshake on OpenSSL's thread of control; it must never raise (an escaping
    exception would be printed and swallowed by ctypes), so any failure rejects.
    """
    try:
        lib = _libssl()
        leaf = lib.X509_STORE_CTX_get0_cert(store_ctx)
        key = lib.X509_get0_pubkey(leaf) if leaf else None
        if key and lib.EVP_PKEY_get_base_id(key) == _NID_ED25519:
            return 1
        lib.X509_STORE_CTX_set_error(store_ctx, _X509_V_ERR_CERT_REJECTED)
    except Exception:  # noqa: S110 - rejecting is the safe answer to anything unexpected
        pass
    return 0


# One callback object for the whole process: it holds no per-context state, and a module-level
# reference keeps it alive for as long as any SSL_CTX may call it.
_VERIFY_CALLBACK = _VerifyCallback(_verify_leaf_is_ed25519)


# OpenSSL 3.0 renamed these; Python 3.11 may still be linked against 1.1.1.
_OPENSSL_1_1_NAMES = {"EVP_PKEY_get_base_id": "EVP_PKEY_base_id"}


@functools.cache
def _libssl() -> ctypes.CDLL:
    """The libssl/libcrypto that `_ssl` itself uses, with the prototypes we call.

    Opening the `_ssl` extension (already loaded, so dlopen returns the same handle) and looking
    symbols up through it resolves them in its own dependencies: the very same library instance,
    never a second copy with separate state.
    """
    path = getattr(ssl._ssl, "__file__", None)  # type: ignore[attr-defined]
    if not path:
        raise TlsSetupError("the _ssl module is built in; cannot reach OpenSSL: refusing to start")
    lib = ctypes.CDLL(path)
    c_void_p, c_int = ctypes.c_void_p, ctypes.c_int
    prototypes: dict[str, tuple[list[type[ctypes._CData]], type[ctypes._CData] | None]] = {
        "OpenSSL_version_num": ([], ctypes.c_ulong),
        "SSL_CTX_get_verify_mode": ([c_void_p], c_int),
        "SSL_CTX_get_options": ([c_void_p], ctypes.c_uint64),
        "SSL_CTX_ctrl": ([c_void_p, c_int, ctypes.c_long, c_void_p], ctypes.c_long),
        "SSL_CTX_set_cert_verify_callback": ([c_void_p, _VerifyCallback, c_void_p], None),
        "X509_STORE_CTX_get0_cert": ([c_void_p], c_void_p),
        "X509_STORE_CTX_set_error": ([c_void_p, c_int], None),
        "X509_get0_pubkey": ([c_void_p], c_void_p),
        "EVP_PKEY_get_base_id": ([c_void_p], c_int),
    }
    try:
        for name, (argtypes, restype) in prototypes.items():
            function = getattr(lib, name, None) or getattr(lib, _OPENSSL_1_1_NAMES[name])
            function.argtypes = argtypes
            function.restype = restype
            setattr(lib, name, function)  # callers use the 3.0 name on either version
    except (AttributeError, KeyError) as exc:
        raise TlsSetupError(f"OpenSSL lacks a function Reflector needs: {exc}") from exc
    if lib.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
        raise TlsSetupError("ctypes reached a different OpenSSL than ssl uses: refusing to start")
    return lib
