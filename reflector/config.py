"""`reflector.toml`: the schema, its defaults and a strict loader (spec §12).

The schema is the dataclasses below; each field carries its bounds in `metadata`, and one generic
walker validates any TOML document against them. A config error names the file, the dotted key
and the reason, and nothing is half-applied: `load_config` either returns a complete, frozen
`Config` or raises `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from reflector.endpoint_id import parse_id
from reflector.errors import ConfigError, EndpointIdError

DEFAULT_STATE_DIR = Path("/var/lib/reflector")
DEFAULT_CONFIG_PATH = Path("/etc/reflector/reflector.toml")
# A config file is operator-written text; anything larger is a mistake or an attack.
MAX_CONFIG_BYTES = 1024 * 1024
# The spec's example peers list is short; bound it so a huge list cannot slow every handshake.
MAX_AUTHORIZED_PEERS = 4096

_WINDOW_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")
_SIZE_RE = re.compile(r"^[1-9]\d{0,9}[KMG]?$")
_PERCENT_RE = re.compile(r"^[1-9]\d{0,3}%$")
_USERNAME_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


def _bounds(lo: int, hi: int) -> dict[str, Any]:
    return {"min": lo, "max": hi}


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    """Where Reflector keeps its state; everything else under it is derived."""

    state_dir: str = field(default=str(DEFAULT_STATE_DIR), metadata={"check": "state_dir"})
    log_level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True, kw_only=True)
class IdentityConfig:
    """The identity key; empty means `<state_dir>/identity.ed25519`."""

    private_key_path: str = field(default="", metadata={"check": "key_path"})


@dataclass(frozen=True, kw_only=True)
class NetworkConfig:
    """The control port, the data-plane mode and the pre-authentication safety limits."""

    listen_address: list[str] = field(
        default_factory=lambda: ["0.0.0.0:4000", "[::]:4000"],
        metadata={"check": "addresses"},
    )
    alpn: Literal["pp-link/1"] = "pp-link/1"
    mode: Literal["tunneled", "direct_ephemeral"] = "tunneled"
    data_port_range_start: int = field(default=5201, metadata=_bounds(1024, 65535))
    data_port_range_end: int = field(default=5299, metadata=_bounds(1024, 65535))
    health_http_address: str = field(default="", metadata={"check": "address_or_empty"})
    handshake_timeout_sec: int = field(default=10, metadata=_bounds(1, 120))
    idle_timeout_sec: int = field(default=300, metadata=_bounds(5, 86400))
    max_connections: int = field(default=256, metadata=_bounds(1, 65536))
    max_connections_per_source: int = field(default=16, metadata=_bounds(1, 4096))
    max_handshakes_per_sec_per_source: int = field(default=20, metadata=_bounds(1, 10000))
    max_frame_size: int = field(default=65536, metadata=_bounds(1024, 1024 * 1024))


@dataclass(frozen=True, kw_only=True)
class AccessConfig:
    """Who may talk to us: the allowlist (plus the state dir's list) and pairing."""

    pairing_enabled: bool = False
    authorized_peers: list[str] = field(default_factory=list, metadata={"check": "peer_ids"})


@dataclass(frozen=True, kw_only=True)
class PeerQuotaConfig:
    """Per-peer overrides under `[quotas.peers."PP..."]`; 0/empty means "use the global"."""

    max_tests_per_hour: int = field(default=0, metadata=_bounds(0, 10000))
    max_bytes_per_day: int = field(default=0, metadata=_bounds(0, 10**15))
    heavy_tests_window: str = field(default="", metadata={"check": "window"})


@dataclass(frozen=True, kw_only=True)
class QuotaConfig:
    """Resource governance (spec §8.1)."""

    max_test_duration_sec: int = field(default=60, metadata=_bounds(1, 3600))
    max_concurrent_tests: int = field(default=1, metadata=_bounds(1, 64))
    max_tests_per_hour_per_peer: int = field(default=10, metadata=_bounds(1, 10000))
    max_bytes_per_day_per_peer: int = field(default=5_000_000_000, metadata=_bounds(0, 10**15))
    cooldown_sec: int = field(default=0, metadata=_bounds(0, 86400))
    allow_udp_echo: bool = True
    allow_throughput: bool = True
    session_grace_sec: int = field(default=5, metadata=_bounds(0, 300))
    heavy_tests_window: str = field(default="", metadata={"check": "window"})
    timezone: str = field(default="UTC", metadata={"check": "timezone"})
    max_udp_echo_pps: int = field(default=2000, metadata=_bounds(1, 100000))
    peers: dict[str, PeerQuotaConfig] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Iperf3Config:
    """The throughput engine (spec §7.1)."""

    # Absolute: engines are started without a search path (a relative name would resolve
    # against whatever directory the service or helper happens to run in).
    path: str = field(default="/usr/bin/iperf3", metadata={"check": "abspath"})
    default_streams: int = field(default=4, metadata=_bounds(1, 128))
    max_streams: int = field(default=8, metadata=_bounds(1, 128))
    max_bitrate_bps: int = field(default=0, metadata=_bounds(0, 10**12))


@dataclass(frozen=True, kw_only=True)
class LimitsConfig:
    """Caps on every test engine's transient scope (or rlimits without systemd)."""

    memory_max: str = field(default="256M", metadata={"check": "size"})
    cpu_quota: str = field(default="100%", metadata={"check": "percent"})
    tasks_max: int = field(default=32, metadata=_bounds(1, 4096))
    runtime_grace_sec: int = field(default=10, metadata=_bounds(1, 600))


@dataclass(frozen=True, kw_only=True)
class AuditConfig:
    """Where audit events go: journald when present, and/or a hash-chained JSON-lines file."""

    journald: Literal["auto", "on", "off"] = "auto"
    jsonl: bool = True


@dataclass(frozen=True, kw_only=True)
class UpdatesConfig:
    """Signed self-update; off by default for locked-down hosts."""

    enabled: bool = False
    # The signed release manifest (http(s) URL or path); empty: `--manifest` is required.
    manifest_url: str = ""
    # The minisign public key releases are checked against; empty: /etc/reflector/update.pub.
    public_key_path: str = ""


@dataclass(frozen=True, kw_only=True)
class PrivsepConfig:
    """The privileged helper (its socket) and the engines' unprivileged identity."""

    # Without a socket here, engines run as local child processes (the documented fallback).
    helper_socket: str = field(default="/run/reflector/privd.sock", metadata={"check": "abspath"})
    engine_user: str = field(default="reflector-engine", metadata={"check": "username"})
    # Under systemd (the service) a missing helper socket refuses tests rather than run engines
    # as the service's own children without scopes, a separate uid or nftables. True allows
    # that fallback there too (a host without the helper, knowingly).
    allow_local_engines: bool = False


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole effective configuration."""

    service: ServiceConfig = field(default_factory=ServiceConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    quotas: QuotaConfig = field(default_factory=QuotaConfig)
    iperf3: Iperf3Config = field(default_factory=Iperf3Config)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    updates: UpdatesConfig = field(default_factory=UpdatesConfig)
    privsep: PrivsepConfig = field(default_factory=PrivsepConfig)

    @property
    def state_dir(self) -> Path:
        return Path(self.service.state_dir)

    @property
    def key_path(self) -> Path:
        if self.identity.private_key_path:
            return Path(self.identity.private_key_path)
        return self.state_dir / "identity.ed25519"


class _Invalid(Exception):
    """Raised inside the walker with (dotted key, reason); turned into ConfigError at the top."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(key, reason)
        self.key = key
        self.reason = reason


def load_config(path: Path | None, *, state_dir: Path | None = None) -> Config:
    """Read and validate `path` (None: all defaults); `state_dir` overrides the file's."""
    label = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_toml(path)
    try:
        config: Config = _build(Config, data, "")
        _check_cross_field(config)
    except _Invalid as exc:
        raise ConfigError(f"{label}: {_one_line(exc.key)}: {exc.reason}") from None
    if state_dir is not None:
        config = _override_state_dir(config, state_dir)
    return config


def _override_state_dir(config: Config, state_dir: Path) -> Config:
    """Apply `--state-dir`: made absolute (from the current directory), checked as the file's
    `service.state_dir` is."""
    absolute = str(state_dir.absolute())
    try:
        _check_state_dir(absolute, "--state-dir")
    except _Invalid as exc:
        raise ConfigError(f"{exc.key}: {exc.reason}") from None
    return dataclasses.replace(
        config, service=dataclasses.replace(config.service, state_dir=absolute)
    )


def parse_config_text(text: str, label: str = "<text>") -> Config:
    """Validate a TOML document given as text (for tests and `config check -`)."""
    try:
        data = tomllib.loads(text)
        config: Config = _build(Config, data, "")
        _check_cross_field(config)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label}: not valid TOML: {_one_line(str(exc))}") from None
    except (RecursionError, ValueError):  # absurd nesting, over-long integer literals
        raise ConfigError(f"{label}: not a usable config (nesting or numbers too large)") from None
    except _Invalid as exc:
        raise ConfigError(f"{label}: {_one_line(exc.key)}: {exc.reason}") from None
    return config


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: config is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {_one_line(str(exc))}") from None
    except (RecursionError, ValueError):  # absurd nesting, over-long integer literals
        raise ConfigError(f"{path}: not a usable config (nesting or numbers too large)") from None


def _build(cls: type[Any], data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"{prefix}{key}"
            known = ", ".join(sorted(fields))
            raise _Invalid(where, f"unknown key (known keys here: {known})")
    values: dict[str, Any] = {}
    for name, value in data.items():
        values[name] = _convert(hints[name], fields[name], value, f"{prefix}{name}")
    return cls(**values)


def _convert(hint: Any, fld: dataclasses.Field[Any], value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise _Invalid(key, f"must be a table, got {_type_name(value)}")
        return _build(hint, value, key + ".")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            allowed = " | ".join(repr(c) for c in choices)
            raise _Invalid(key, f"must be one of {allowed}, got {value!r}")
        return value
    if origin is dict:
        return _convert_peer_table(typing.get_args(hint)[1], value, key)
    if origin is list:
        return _convert_list(fld, value, key)
    return _convert_scalar(hint, fld, value, key)


def _convert_peer_table(item_cls: type[Any], value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Invalid(key, f"must be a table, got {_type_name(value)}")
    out: dict[str, Any] = {}
    for peer, sub in value.items():
        try:
            canonical = parse_id(peer)
        except EndpointIdError as exc:
            raise _Invalid(f"{key}.{peer}", f"not a valid peer ID: {exc}") from None
        if not isinstance(sub, dict):
            raise _Invalid(f"{key}.{peer}", f"must be a table, got {_type_name(sub)}")
        out[canonical] = _build(item_cls, sub, f"{key}.{peer}.")
    return out


def _convert_list(fld: dataclasses.Field[Any], value: Any, key: str) -> list[str]:
    check = fld.metadata.get("check")
    if check == "addresses" and isinstance(value, str):
        value = [value]  # the spec's example writes a single address
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Invalid(key, f"must be a list of strings, got {_type_name(value)}")
    if check == "addresses":
        if not value:
            raise _Invalid(key, "must name at least one address")
        for item in value:
            _check_address(item, key)
        return list(value)
    if len(value) > MAX_AUTHORIZED_PEERS:
        raise _Invalid(key, f"at most {MAX_AUTHORIZED_PEERS} entries, got {len(value)}")
    ids = []
    for index, item in enumerate(value):
        try:
            ids.append(parse_id(item))
        except EndpointIdError as exc:
            raise _Invalid(f"{key}[{index}]", f"not a valid peer ID {item!r}: {exc}") from None
    return ids


def _convert_scalar(hint: Any, fld: dataclasses.Field[Any], value: Any, key: str) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise _Invalid(key, f"must be true or false, got {_type_name(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(key, f"must be an integer, got {_type_name(value)}")
        lo, hi = fld.metadata.get("min"), fld.metadata.get("max")
        if lo is not None and hi is not None and not lo <= value <= hi:
            raise _Invalid(key, f"must be between {lo} and {hi}, got {value}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise _Invalid(key, f"must be a string, got {_type_name(value)}")
        _check_string(fld.metadata.get("check"), value, key)
        return value
    raise _Invalid(key, f"unsupported type {hint!r}")  # pragma: no cover - schema bug


def _check_string(check: str | None, value: str, key: str) -> None:
    if len(value) > 4096:
        raise _Invalid(key, "longer than 4096 characters")
    if check == "window" and value and not _WINDOW_RE.match(value):
        raise _Invalid(key, f'must look like "01:00-06:00" (24-hour HH:MM-HH:MM), got {value!r}')
    if check == "size" and not _SIZE_RE.match(value):
        raise _Invalid(key, f'must be a byte count like "256M" (suffix K, M or G), got {value!r}')
    if check == "percent" and not _PERCENT_RE.match(value):
        raise _Invalid(key, f'must be a percentage like "50%", got {value!r}')
    if check == "timezone":
        _check_timezone(value, key)
    if check == "abspath" and not value.startswith("/"):
        raise _Invalid(key, f"must be an absolute path, got {value!r}")
    if check == "username" and not _USERNAME_RE.match(value):
        raise _Invalid(key, f"must be a system user name ([a-z_][a-z0-9_-]*), got {value!r}")
    if check == "key_path" and value:
        _check_key_path(value, key)
    if check == "state_dir":
        _check_state_dir(value, key)
    if check == "address_or_empty" and value:
        _check_address(value, key)


# The key's directory is made private (0700); these shared directories must never be.
_SHARED_DIRS = frozenset(
    Path(p)
    for p in ("/", "/etc", "/var", "/var/lib", "/usr", "/root", "/home", "/tmp", "/opt")  # noqa: S108
)


def _check_key_path(value: str, key: str) -> None:
    path = Path(value)
    if not path.is_absolute():
        raise _Invalid(key, f"must be an absolute path, got {value!r}")
    if path.parent in _SHARED_DIRS:
        raise _Invalid(
            key, f"must be in a directory of its own (it is made mode 0700), not {path.parent}"
        )


def _check_state_dir(value: str, key: str) -> None:
    """Absolute (a relative one would follow the working directory of whoever runs us) and
    not a shared system directory, which `ensure_private_dir` would otherwise make 0700."""
    path = Path(value)
    if not path.is_absolute():
        raise _Invalid(key, f"must be an absolute path, got {value!r}")
    if path in _SHARED_DIRS:
        raise _Invalid(key, f"must be a directory of its own (it is made mode 0700), not {path}")


def _check_timezone(value: str, key: str) -> None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise _Invalid(key, f"unknown time zone {value!r} (e.g. 'UTC', 'Europe/Berlin')") from None


def parse_address(text: str, *, allow_ephemeral: bool = False) -> tuple[str, int]:
    """Split "1.2.3.4:4000" or "[::1]:4000" into (host, port); raise ValueError if malformed.

    Port 0 ("any free port") is only for tests and the demo, never in a config file.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f'must look like "0.0.0.0:4000" or "[::]:4000", got {text!r}')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ipaddress.ip_address(host).version != 6:
            raise ValueError(f"only IPv6 addresses go in brackets, got {text!r}")
    else:
        if ipaddress.ip_address(host).version != 4:
            raise ValueError(f"IPv6 addresses must be in brackets, got {text!r}")
    port = int(port_text)
    if port == 0 and allow_ephemeral:
        return host, port
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be between 1 and 65535, got {port}")
    return host, port


def _check_address(text: str, key: str) -> None:
    try:
        parse_address(text)
    except ValueError as exc:
        raise _Invalid(key, str(exc)) from None


def _check_cross_field(config: Config) -> None:
    net = config.network
    if net.data_port_range_end < net.data_port_range_start:
        raise _Invalid(
            "network.data_port_range_end",
            f"must not be below data_port_range_start ({net.data_port_range_start}),"
            f" got {net.data_port_range_end}",
        )
    ip = config.iperf3
    if ip.default_streams > ip.max_streams:
        raise _Invalid(
            "iperf3.default_streams",
            f"must not exceed max_streams ({ip.max_streams}), got {ip.default_streams}",
        )
    control_ports = {parse_address(a)[1] for a in net.listen_address}
    clash = control_ports & set(range(net.data_port_range_start, net.data_port_range_end + 1))
    if clash:
        raise _Invalid(
            "network.data_port_range_start",
            f"data port range overlaps the control port {min(clash)}",
        )


def _one_line(text: str) -> str:
    """Errors are one line: a key or message carrying a newline is shown escaped."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _type_name(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
    names.update({list: "an array", dict: "a table"})
    return names.get(type(value), type(value).__name__)


def effective_config(config: Config) -> Config:
    """`config` with derived defaults written out (the key path under the state dir).

    For `reflector config show`: the operator should see the file Reflector will really use,
    not the empty string that means "the default".
    """
    identity = dataclasses.replace(config.identity, private_key_path=str(config.key_path))
    return dataclasses.replace(config, identity=identity)


def config_to_toml(config: Config) -> str:
    """Render `config` as TOML that parses back to an equal `Config`."""
    lines: list[str] = []
    for section in dataclasses.fields(config):
        obj = getattr(config, section.name)
        lines.append(f"[{section.name}]")
        nested: list[str] = []
        for fld in dataclasses.fields(obj):
            value = getattr(obj, fld.name)
            if isinstance(value, dict):
                for peer, sub in value.items():
                    nested.append(f'\n[{section.name}.{fld.name}."{peer}"]')
                    nested.extend(
                        f"{f.name} = {_toml_value(getattr(sub, f.name))}"
                        for f in dataclasses.fields(sub)
                    )
                continue
            lines.append(f"{fld.name} = {_toml_value(value)}")
        lines.extend(nested)
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # A JSON string is a TOML basic string once DEL, which TOML also wants escaped, is.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")
