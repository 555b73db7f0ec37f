"""What runs for a test, and the transient scope around it (pure: argv and unit properties).

The helper builds every command line here from a fixed list of engines and the validated
fields of a `StartEngine`; nothing a caller sends is ever passed through as text. The IP
addresses and numbers that do appear were parsed and re-rendered canonically by the protocol.

Each engine runs as `systemd-run --scope --uid=<engine user>`: systemd 252 creates the scope
`reflector-test-<test_id>.scope` with its own cgroup, moves systemd-run into it, drops to the
engine user (setresgid, initgroups, setresuid) and execs the engine. So the engine stays a child
of the helper (its exit status is the helper's to collect and its stdout is the pipe the helper
gave it), while systemd enforces RuntimeMaxSec= and owns the cgroup.

IPAddressAllow=/IPAddressDeny=, SocketBindAllow=/SocketBindDeny= and IPAccounting= need BPF on
the unified (cgroup v2) hierarchy. On a v1/v2 hybrid host systemd accepts them and silently does
nothing, so the helper probes once (`probe_argv`) and only lists what was observed to work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Final

from reflector.config import Iperf3Config
from reflector.engines.iperf import server_argv
from reflector.privsep.protocol import StartEngine

__all__ = [
    "PROBE_SCRIPT",
    "STOP_TIMEOUT_S",
    "SYSTEMD_RUN",
    "UNIT_PREFIX",
    "EngineCommand",
    "HostSupport",
    "cgroup_limit_files",
    "engine_command",
    "ip_counters_from_journal",
    "ip_counters_from_show",
    "parse_probe_output",
    "probe_argv",
    "runtime_max_s",
    "scope_argv",
    "scope_protections",
    "unit_name",
]

SYSTEMD_RUN: Final = "/usr/bin/systemd-run"
UNIT_PREFIX: Final = "reflector-test-"
# iperf3 writes its JSON and exits within milliseconds of SIGTERM; two seconds before systemd
# escalates to SIGKILL (the default, 90 s, would hold a test slot for nothing).
STOP_TIMEOUT_S: Final = 2
# A fixed, minimal environment for engines: nothing of the helper's (LISTEN_FDS, ...) leaks.
ENGINE_ENV: Final[Mapping[str, str]] = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
}


@dataclass(frozen=True, kw_only=True)
class EngineCommand:
    """An engine's argv and what it reads on stdin (the echo's key; never on the argv)."""

    argv: tuple[str, ...]
    stdin: bytes


@dataclass(frozen=True, kw_only=True)
class HostSupport:
    """What the host was observed to enforce (see `probe_argv`)."""

    ip_firewall: bool
    socket_bind: bool


def unit_name(test_id: str) -> str:
    """The scope's unit name; the protocol has restricted test_id to [A-Za-z0-9_-]{1,64}."""
    return f"{UNIT_PREFIX}{test_id}.scope"


def runtime_max_s(duration_s: int, grace_s: int) -> int:
    """RuntimeMaxSec=: the test's duration plus the grace for start-up and the final report."""
    return duration_s + grace_s


def engine_command(
    req: StartEngine, *, iperf3: Iperf3Config, python: str, max_udp_echo_pps: int
) -> EngineCommand:
    """The fixed command line of `req.kind`; raise ValueError if a field does not fit it."""
    if req.kind == "iperf3":
        return EngineCommand(
            argv=tuple(server_argv(iperf3, req.port, req.bind, req.duration_s)), stdin=b""
        )
    if req.echo_key is None:
        raise ValueError("udp_echo needs an echo key")
    host = f"[{req.bind}]" if ":" in req.bind else req.bind
    argv = (
        python,
        "-m",
        "reflector.engines.udp_echo",
        "--bind",
        f"{host}:{req.port}",
        "--peer",
        req.peer,
        "--duration",
        str(req.duration_s),
        "--max-pps",
        str(max_udp_echo_pps),
    )
    return EngineCommand(argv=argv, stdin=req.echo_key.hex().encode() + b"\n")


def _bind_allow(req: StartEngine) -> str:
    # iperf3 listens on TCP and, for UDP tests, binds a UDP socket on the same port.
    return f"udp:{req.port}" if req.kind == "udp_echo" else str(req.port)


def scope_properties(req: StartEngine, *, grace_s: int, support: HostSupport) -> list[str]:
    """The unit properties of a test's scope, in a stable order."""
    limits = req.limits
    props = [
        f"MemoryMax={limits.memory_max_bytes}",
        f"CPUQuota={limits.cpu_quota_percent}%",
        f"TasksMax={limits.tasks_max}",
        f"RuntimeMaxSec={runtime_max_s(req.duration_s, grace_s)}",
        f"TimeoutStopSec={STOP_TIMEOUT_S}",
        "IPAccounting=yes",  # harmless where unsupported; the helper checks for counters
    ]
    if support.ip_firewall:
        props += [f"IPAddressAllow={req.peer}", "IPAddressAllow=localhost", "IPAddressDeny=any"]
    if support.socket_bind:
        props += [f"SocketBindAllow={_bind_allow(req)}", "SocketBindDeny=any"]
    return props


def scope_argv(
    req: StartEngine,
    command: EngineCommand,
    *,
    engine_user: str,
    grace_s: int,
    support: HostSupport,
    systemd_run: str = SYSTEMD_RUN,
) -> list[str]:
    """`systemd-run --scope ... -- <engine argv>` for one test."""
    argv = [
        systemd_run,
        "--scope",
        "--quiet",
        "--collect",  # a failed (timed-out) scope is unloaded too, so its name is free again
        f"--unit={unit_name(req.test_id).removesuffix('.scope')}",
        f"--description=Reflector test {req.test_id} ({req.kind})",
        f"--uid={engine_user}",
        f"--gid={engine_user}",
    ]
    for prop in scope_properties(req, grace_s=grace_s, support=support):
        argv += ["-p", prop]
    return [*argv, "--", *command.argv]


def scope_protections(support: HostSupport, *, limits_enforced: Mapping[str, bool]) -> list[str]:
    """Names of what a test's scope enforces, for the audit trail and `reflector status`.

    `limits_enforced` says, per cgroup limit, whether its control file exists for the scope
    (on a hybrid host the v1 controllers may belong to someone else: set but not enforced).
    """
    names = ["scope", "engine_user", "runtime_max"]
    names += [name for name in ("memory_max", "cpu_quota", "tasks_max") if limits_enforced[name]]
    if support.ip_firewall:
        names.append("ip_address_allow")
    if support.socket_bind:
        names.append("socket_bind_allow")
    return names


def cgroup_limit_files(
    control_group: str, root: PurePosixPath = PurePosixPath("/sys/fs/cgroup")
) -> dict[str, list[PurePosixPath]]:
    """Where each limit's control file lives for a unit's cgroup (v2, hybrid v2, or v1).

    If any listed file exists the limit is in force; `control_group` is `systemctl show -p
    ControlGroup`'s value, e.g. "/system.slice/reflector-test-x.scope".
    """
    rel = PurePosixPath(control_group).relative_to("/")
    unified = [root / rel, root / "unified" / rel]
    return {
        "memory_max": [d / "memory.max" for d in unified]
        + [root / "memory" / rel / "memory.limit_in_bytes"],
        "cpu_quota": [d / "cpu.max" for d in unified] + [root / "cpu" / rel / "cpu.cfs_quota_us"],
        "tasks_max": [d / "pids.max" for d in unified] + [root / "pids" / rel / "pids.max"],
    }


# The probe runs as the engine user in a scope that denies all IP traffic and all binds. Each
# attempt touches loopback only: a bind of a data port on 127.0.0.1 and one datagram to the
# discard port. EPERM means systemd's BPF programs are in force.
PROBE_SCRIPT: Final = """\
import socket, sys
def attempt(fn):
    try:
        fn()
    except PermissionError:
        return "denied"
    except OSError:
        return "error"
    return "allowed"
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    bind = attempt(lambda: s.bind(("127.0.0.1", int(sys.argv[1]))))
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    send = attempt(lambda: s.sendto(b"probe", ("127.0.0.1", 9)))
print(f"bind={bind} send={send}")
"""


def probe_argv(
    *, unit: str, engine_user: str, python: str, port: int, systemd_run: str = SYSTEMD_RUN
) -> list[str]:
    """A throwaway scope that shows whether IPAddressDeny= and SocketBindDeny= are enforced."""
    return [
        systemd_run,
        "--scope",
        "--quiet",
        "--collect",
        f"--unit={unit}",
        f"--uid={engine_user}",
        f"--gid={engine_user}",
        "-p",
        "IPAddressDeny=any",
        "-p",
        "SocketBindDeny=any",
        "-p",
        "RuntimeMaxSec=10",
        "--",
        python,
        "-I",
        "-c",
        PROBE_SCRIPT,
        str(port),
    ]


def parse_probe_output(text: str) -> HostSupport:
    """The probe's "bind=... send=..." line; anything unexpected counts as not enforced."""
    fields = dict(item.partition("=")[::2] for item in text.split())
    return HostSupport(
        ip_firewall=fields.get("send") == "denied",
        socket_bind=fields.get("bind") == "denied",
    )


# systemctl prints this for a counter it does not have (no BPF, or the unit is gone).
_NO_DATA: Final = "[no data]"


def parse_show(text: str) -> dict[str, str]:
    """`systemctl show -p A,B unit` output as a dict."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _counter(value: str | None) -> int | None:
    if value is None or value == _NO_DATA or not value.isdigit():
        return None
    number = int(value)
    return None if number >= 2**64 - 1 else number  # UINT64_MAX: "not set"


def ip_counters_from_show(text: str) -> tuple[int | None, int | None]:
    """(ingress, egress) bytes from `systemctl show -p IPIngressBytes,IPEgressBytes`."""
    fields = parse_show(text)
    return _counter(fields.get("IPIngressBytes")), _counter(fields.get("IPEgressBytes"))


def ip_counters_from_journal(
    records: Sequence[Mapping[str, object]],
) -> tuple[int | None, int | None]:
    """The same counts from the "Consumed ..." record systemd logs when the unit stops.

    Needed when the engine exited by itself: the empty scope is unloaded at once, and with it
    its live counters.
    """
    for record in reversed(records):
        ingress = record.get("IP_METRIC_INGRESS_BYTES")
        egress = record.get("IP_METRIC_EGRESS_BYTES")
        if isinstance(ingress, str) and isinstance(egress, str):
            return _counter(ingress), _counter(egress)
    return None, None
