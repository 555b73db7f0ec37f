"""A test's transient scope and engine command line, as the helper builds them (pure)."""

from __future__ import annotations

from pathlib import PurePosixPath

from reflector.config import Iperf3Config
from reflector.privsep.protocol import StartEngine, decode_request
from reflector.privsep.scope import (
    PROBE_SCRIPT,
    HostSupport,
    cgroup_limit_files,
    engine_command,
    ip_counters_from_journal,
    ip_counters_from_show,
    parse_probe_output,
    probe_argv,
    scope_argv,
    scope_protections,
    unit_name,
)

KEY = bytes(range(32))
IPERF3 = Iperf3Config(path="/usr/bin/iperf3")
PYTHON = "/opt/reflector/bin/python"
FULL = HostSupport(ip_firewall=True, socket_bind=True)
NONE = HostSupport(ip_firewall=False, socket_bind=False)


def request(kind: str = "iperf3", **changes: object) -> StartEngine:
    """Decoded from the wire, as the helper sees it."""
    doc: dict[str, object] = {
        "type": "start_engine",
        "test_id": "Zq9_-abc",
        "kind": kind,
        "port": 5201 if kind == "iperf3" else 4000,
        "duration_s": 30,
        "bind": "127.0.0.1",
        "peer": "::ffff:198.51.100.20",
        "limits": {"memory_max_bytes": 268435456, "cpu_quota_percent": 50, "tasks_max": 16},
        "echo_key": KEY.hex() if kind == "udp_echo" else None,
    }
    doc.update(changes)
    req = decode_request(doc)
    assert isinstance(req, StartEngine)
    return req


def build(req: StartEngine, support: HostSupport = FULL) -> list[str]:
    command = engine_command(req, iperf3=IPERF3, python=PYTHON, max_udp_echo_pps=2000)
    return scope_argv(req, command, engine_user="reflector-engine", grace_s=10, support=support)


def properties(argv: list[str]) -> list[str]:
    head = argv[: argv.index("--")]
    return [head[i + 1] for i, arg in enumerate(head) if arg == "-p"]


def test_the_scope_is_named_after_the_test() -> None:
    assert unit_name("Zq9_-abc") == "reflector-test-Zq9_-abc.scope"
    argv = build(request())
    assert argv[:2] == ["/usr/bin/systemd-run", "--scope"]
    assert "--unit=reflector-test-Zq9_-abc" in argv
    assert "--collect" in argv  # a timed-out (failed) scope does not keep its name


def test_the_engine_runs_as_the_engine_user() -> None:
    argv = build(request())
    assert "--uid=reflector-engine" in argv
    assert "--gid=reflector-engine" in argv


def test_the_caps_come_from_the_request_and_the_runtime_adds_the_grace() -> None:
    props = properties(build(request(), NONE))
    assert props == [
        "MemoryMax=268435456",
        "CPUQuota=50%",
        "TasksMax=16",
        "RuntimeMaxSec=40",  # 30 s test + 10 s grace
        "TimeoutStopSec=2",
        "IPAccounting=yes",
    ]


def test_where_the_host_enforces_them_the_peer_and_port_are_allowlisted() -> None:
    props = properties(build(request()))
    assert props[6:] == [
        "IPAddressAllow=198.51.100.20",
        "IPAddressAllow=localhost",
        "IPAddressDeny=any",
        "SocketBindAllow=5201",  # iperf3: TCP, and UDP for UDP tests
        "SocketBindDeny=any",
    ]
    echo = properties(build(request("udp_echo")))
    assert "SocketBindAllow=udp:4000" in echo


def test_the_iperf3_command_line_is_the_fixed_one_shot_server() -> None:
    argv = build(request())
    engine = argv[argv.index("--") + 1 :]
    assert engine[:8] == [
        "/usr/bin/iperf3",
        "-s",
        "-p",
        "5201",
        "--one-off",
        "-J",
        "-B",
        "127.0.0.1",
    ]


def test_the_echo_gets_its_key_on_stdin_never_on_the_command_line() -> None:
    req = request("udp_echo", bind="::1")
    command = engine_command(req, iperf3=IPERF3, python=PYTHON, max_udp_echo_pps=2000)
    assert command.argv == (
        PYTHON,
        "-m",
        "reflector.engines.udp_echo",
        "--bind",
        "[::1]:4000",
        "--peer",
        "198.51.100.20",
        "--duration",
        "30",
        "--max-pps",
        "2000",
    )
    assert command.stdin == KEY.hex().encode() + b"\n"
    argv = build(req)
    assert not any(KEY.hex() in arg for arg in argv)


def test_the_argv_holds_only_fixed_text_numbers_and_canonical_addresses() -> None:
    """Whatever a caller sends, only values the helper rendered itself reach the argv."""
    fixed = {"/usr/bin/systemd-run", "/usr/bin/iperf3", PYTHON, "reflector.engines.udp_echo"}
    properties_: tuple[str, ...] = ("MemoryMax=", "CPUQuota=", "TasksMax=", "RuntimeMaxSec=")
    properties_ += ("TimeoutStopSec=", "IPAccounting=", "IPAddress", "SocketBind")
    for req in (request(), request("udp_echo"), request(bind="0::1", peer="2001:DB8::0:1")):
        host = f"[{req.bind}]" if ":" in req.bind else req.bind
        rendered = {str(req.port), str(req.duration_s), req.peer, req.bind, f"{host}:{req.port}"}
        for arg in build(req):
            assert (
                arg.startswith("-")  # an option the builder chose (values after "=" checked above)
                or arg.startswith(properties_)
                or arg in fixed
                or arg in rendered
                or arg.isdigit()  # the iperf3 intervals and timeouts it computes
            ), arg
        assert "2001:DB8" not in " ".join(build(req))  # re-rendered, not passed through


def test_protections_list_only_what_is_enforced() -> None:
    enforced = {"memory_max": True, "cpu_quota": False, "tasks_max": True}
    assert scope_protections(NONE, limits_enforced=enforced) == [
        "scope",
        "engine_user",
        "runtime_max",
        "memory_max",
        "tasks_max",
    ]
    everything = dict.fromkeys(enforced, True)
    assert scope_protections(FULL, limits_enforced=everything)[-2:] == [
        "ip_address_allow",
        "socket_bind_allow",
    ]


def test_limit_files_are_looked_up_in_v2_hybrid_and_v1_layouts() -> None:
    files = cgroup_limit_files("/system.slice/reflector-test-x.scope", PurePosixPath("/cg"))
    assert files["memory_max"] == [
        PurePosixPath("/cg/system.slice/reflector-test-x.scope/memory.max"),
        PurePosixPath("/cg/unified/system.slice/reflector-test-x.scope/memory.max"),
        PurePosixPath("/cg/memory/system.slice/reflector-test-x.scope/memory.limit_in_bytes"),
    ]
    assert files["tasks_max"][-1] == PurePosixPath(
        "/cg/pids/system.slice/reflector-test-x.scope/pids.max"
    )


def test_the_probe_denies_everything_and_reports_what_happened() -> None:
    argv = probe_argv(unit="reflector-probe-1", engine_user="e", python=PYTHON, port=5201)
    assert argv[7:11] == ["-p", "IPAddressDeny=any", "-p", "SocketBindDeny=any"]
    assert argv[-5:] == [PYTHON, "-I", "-c", PROBE_SCRIPT, "5201"]
    assert parse_probe_output("bind=denied send=denied\n") == FULL
    assert parse_probe_output("bind=allowed send=denied") == HostSupport(
        ip_firewall=True, socket_bind=False
    )
    assert parse_probe_output("Traceback ...") == NONE


def test_ip_counters_without_bpf_are_unknown_not_zero() -> None:
    assert ip_counters_from_show("IPIngressBytes=[no data]\nIPEgressBytes=[no data]\n") == (
        None,
        None,
    )
    assert ip_counters_from_show("IPIngressBytes=1234\nIPEgressBytes=18446744073709551615\n") == (
        1234,
        None,
    )


def test_ip_counters_of_an_unloaded_scope_come_from_its_last_journal_record() -> None:
    records = [
        {"MESSAGE": "Started"},
        {"IP_METRIC_INGRESS_BYTES": "10", "IP_METRIC_EGRESS_BYTES": "20"},
        {"IP_METRIC_INGRESS_BYTES": "1000", "IP_METRIC_EGRESS_BYTES": "2000"},
        {"MESSAGE": "Deactivated"},
    ]
    assert ip_counters_from_journal(records) == (1000, 2000)
    assert ip_counters_from_journal([]) == (None, None)
