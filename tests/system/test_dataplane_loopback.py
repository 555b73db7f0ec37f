"""Sessions and engines end to end on loopback: real TLS, real iperf3, the real STAMP echo.

Reads as §7/§8 of the spec: a grant runs exactly the engine it names, through the tunnel
unless the endpoint is in direct mode; only the granted peer with a live token gets through;
quotas refuse with their reason (and survive a restart); expiry and disconnects stop engines;
every grant and deny is audited with the bytes the data plane counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from reflector.client import measure
from reflector.client.link_client import ApplianceIdentity, LinkClient, RemoteError
from reflector.config import parse_config_text
from reflector.errors import ReflectorError
from reflector.link.messages import (
    GetResult,
    GetStatus,
    Ok,
    Result,
    SessionClose,
    SessionGrant,
    SessionRequest,
    StatusSnapshot,
    ThroughputParams,
    UdpEchoParams,
)
from reflector.server import dataplane as dataplane_module
from reflector.server.run import Running, start
from reflector.sessions import manager as manager_module
from reflector.tls import ALPN_TUNNEL
from reflector.tunnel.client_end import TunnelClient

pytestmark = pytest.mark.slow

BASE = """
[audit]
journald = "off"
[quotas]
max_tests_per_hour_per_peer = 50
"""


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 120))  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def endpoint(state: Path, extra: str = "") -> AsyncIterator[Running]:
    config = parse_config_text(BASE + extra)
    config = dataclasses.replace(
        config, service=dataclasses.replace(config.service, state_dir=str(state))
    )
    running = await start(config, addresses=["127.0.0.1:0"])
    try:
        yield running
    finally:
        await running.stop("test over")


async def paired_client(ep: Running, tmp_path: Path, name: str = "app") -> LinkClient:
    app = ApplianceIdentity.open(tmp_path / name)
    ep.service.peers.add(app.identity.endpoint_id, via="cli")
    return await LinkClient.connect(("127.0.0.1", ep.addresses[0][1]), app, ep.identity.endpoint_id)


def audit(ep: Running) -> list[dict[str, Any]]:
    path = ep.config.state_dir / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def events(ep: Running, kind: str) -> list[dict[str, Any]]:
    return [r for r in audit(ep) if r["reflector_event"] == kind]


async def soon(condition: Callable[[], object], within: float, what: str) -> None:
    """Wait until `condition()` holds; fail naming `what` if it does not within `within` s."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {within} s"
        await asyncio.sleep(0.1)


async def result_when_kept(client: LinkClient, session_id: str, within: float) -> Result:
    """Ask for the session's result every 50 ms until it is there; only result_pending may
    come meanwhile."""
    deadline = time.monotonic() + within
    while True:
        response = await client.request(GetResult(session_id=session_id), 30)
        if isinstance(response, Result):
            return response
        assert getattr(response, "code", None) == "result_pending", response
        assert time.monotonic() < deadline, f"no result within {within} s"
        await asyncio.sleep(0.05)


def tcp(duration: int = 2, streams: int = 1, reverse: bool = False) -> ThroughputParams:
    return ThroughputParams(duration_sec=duration, protocol="tcp", streams=streams, reverse=reverse)


def echo(duration: int = 2) -> UdpEchoParams:
    return UdpEchoParams(duration_sec=duration)


# --- throughput through the tunnel


@pytest.mark.parametrize(("streams", "reverse"), [(1, False), (2, False), (1, True)])
def test_tunneled_throughput_matches_iperf3_and_is_accounted(
    tmp_path: Path, streams: int, reverse: bool
) -> None:
    async def body() -> None:
        async with endpoint(tmp_path / "ep") as ep:
            client = await paired_client(ep, tmp_path)
            app = ApplianceIdentity.open(tmp_path / "app")
            opts = measure.ThroughputOptions(duration_sec=2, streams=streams, reverse=reverse)
            doc = await measure.throughput(client, app, opts)
            await client.close()
            mine, theirs = doc["appliance"], doc["endpoint"]
            assert doc["mode"] == "tunneled"
            assert "error" not in theirs, theirs
            assert mine["streams"] == streams and mine["reverse"] is reverse
            assert theirs["direction"] == ("download" if reverse else "upload")
            # The endpoint's view is iperf3's own server JSON, normalized: same bytes.
            assert theirs["bytes_transferred"] > 0
            assert theirs["endpoint"]["role"] == ("sender" if reverse else "receiver")
            assert theirs["grant_mismatches"] == []  # the client ran what was granted
            # Its rate is iperf3's own: the receiver's figure, which the client's JSON also
            # carries (the server sends its stats to the client at the end).
            rate = theirs["download_bps"] if reverse else theirs["upload_bps"]
            assert rate == pytest.approx(mine["received_bps"], rel=0.05)
            assert len(theirs["streams"]) == streams and theirs["intervals"]
            # Bytes counted by the relay, not claimed by the peer, reach the ledger.
            counted = theirs["tunnel_bytes"]
            payload = counted["downstream"] if reverse else counted["upstream"]
            # Equal up to what sat in socket buffers when the test ended (and TLS-free framing).
            assert abs(payload - theirs["bytes_transferred"]) < theirs["bytes_transferred"] * 0.02

            acct = events(ep, "accounting")[-1]
            assert acct["bytes_rx"] + acct["bytes_tx"] >= payload
            exits = events(ep, "engine_exit")[-1]
            assert exits["exit_code"] == 0 and exits["pid"] > 0

    run(body())


def test_udp_throughput_is_refused_in_tunneled_mode_before_any_quota(tmp_path: Path) -> None:
    async def body() -> None:
        async with endpoint(tmp_path / "ep") as ep:
            client = await paired_client(ep, tmp_path)
            params = ThroughputParams(duration_sec=2, protocol="udp", streams=1, reverse=False)
            with pytest.raises(RemoteError) as err:
                await client.call(
                    SessionRequest(test_type="throughput", params=params), SessionGrant
                )
            assert err.value.code == "udp_not_tunneled"
            status = await client.call(GetStatus(), StatusSnapshot)
            assert status.quota["tests_left_this_hour"] == 50
            await client.close()
            assert events(ep, "session_deny")[-1]["reason"] == "udp_not_tunneled"

    run(body())


# --- who may use a tunnel


async def tunnel_attempt(ep: Running, app: ApplianceIdentity, session_id: str, token: str) -> str:
    """Open a tunnel and push one byte; return how it ended."""
    tunnel = TunnelClient(
        ("127.0.0.1", ep.addresses[0][1]),
        app.context(ALPN_TUNNEL),
        ep.identity.endpoint_id,
        session_id,
        token,
        open_timeout=5,
    )
    host, port = await tunnel.start()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"x")
    with contextlib.suppress(ConnectionError):
        await asyncio.wait_for(reader.read(1), 5)
    writer.close()
    await asyncio.sleep(0.2)
    await tunnel.close()
    return tunnel.failures[0].code if tunnel.failures else "opened"


def test_only_the_granted_peer_with_a_live_token_opens_a_tunnel(tmp_path: Path) -> None:
    async def body() -> None:
        async with endpoint(tmp_path / "ep", "[access]\npairing_enabled = false\n") as ep:
            client = await paired_client(ep, tmp_path, "owner")
            grant = await client.call(
                SessionRequest(test_type="throughput", params=tcp(5)), SessionGrant
            )
            owner = ApplianceIdentity.open(tmp_path / "owner")
            other = ApplianceIdentity.open(tmp_path / "other")
            ep.service.peers.add(other.identity.endpoint_id, via="cli")
            stranger = ApplianceIdentity.open(tmp_path / "stranger")
            sid = grant.session_id
            assert await tunnel_attempt(ep, owner, sid, "wrong-token") == "bad_token"
            assert await tunnel_attempt(ep, other, sid, grant.token) == "bad_token"
            assert await tunnel_attempt(ep, stranger, sid, grant.token) == "unknown_peer"
            await client.call(SessionClose(session_id=sid), Ok)
            # Revoked at close: the right token no longer works either.
            assert await tunnel_attempt(ep, owner, sid, grant.token) == "bad_token"
            await client.close()
            reasons = {r.get("reason") for r in events(ep, "connection_deny")}
            assert {"bad_token", "unknown_peer"} <= reasons

    run(body())


# --- quotas and refusals


def test_a_second_session_is_refused_while_one_runs(tmp_path: Path) -> None:
    async def body() -> None:
        async with endpoint(tmp_path / "ep") as ep:
            client = await paired_client(ep, tmp_path)
            first = await client.call(
                SessionRequest(test_type="udp_echo", params=echo(5)), SessionGrant
            )
            with pytest.raises(RemoteError) as err:
                await client.call(
                    SessionRequest(test_type="udp_echo", params=echo(2)), SessionGrant
                )
            assert err.value.code == "busy"
            assert err.value.retry_after is not None and err.value.retry_after > 0
            status = await client.call(GetStatus(), StatusSnapshot)
            assert [s["session_id"] for s in status.sessions] == [first.session_id]
            await client.call(SessionClose(session_id=first.session_id), Ok)
            await client.close()
            deny = events(ep, "session_deny")[-1]
            assert (deny["reason"], deny["decision"]) == ("busy", "deny")

    run(body())


def test_the_hourly_quota_survives_a_restart(tmp_path: Path) -> None:
    limit = BASE.replace("max_tests_per_hour_per_peer = 50", "max_tests_per_hour_per_peer = 2")

    async def one_session(ep: Running) -> None:
        client = await paired_client(ep, tmp_path)
        grant = await client.call(
            SessionRequest(test_type="udp_echo", params=echo(1)), SessionGrant
        )
        await client.call(SessionClose(session_id=grant.session_id), Ok)
        await client.close()

    async def body() -> None:
        state = tmp_path / "ep"
        async with endpoint_with(state, limit) as ep:
            await one_session(ep)
            await one_session(ep)
        async with endpoint_with(state, limit) as ep:  # a restart
            client = await paired_client(ep, tmp_path)
            with pytest.raises(RemoteError) as err:
                await client.call(
                    SessionRequest(test_type="udp_echo", params=echo(1)), SessionGrant
                )
            assert err.value.code == "hourly_quota"
            assert err.value.retry_after is not None and 3000 < err.value.retry_after <= 3600
            await client.close()

    run(body())


@contextlib.asynccontextmanager
async def endpoint_with(state: Path, text: str) -> AsyncIterator[Running]:
    config = parse_config_text(text)
    config = dataclasses.replace(
        config, service=dataclasses.replace(config.service, state_dir=str(state))
    )
    running = await start(config, addresses=["127.0.0.1:0"])
    try:
        yield running
    finally:
        await running.stop("test over")


# --- time limits


def iperf_servers() -> list[psutil.Process]:
    """Our iperf3 children; one reaped while we look is simply not among them."""
    return [p for p in psutil.Process().children(recursive=True) if _is_iperf3(p, server=False)]


def iperf3_engines() -> list[psutil.Process]:
    """The endpoint's `iperf3 -s` among them (not an appliance's client)."""
    return [p for p in psutil.Process().children(recursive=True) if _is_iperf3(p, server=True)]


def _is_iperf3(proc: psutil.Process, *, server: bool) -> bool:
    try:
        return proc.name() == "iperf3" and (not server or "-s" in proc.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


def test_expiry_stops_an_engine_nobody_uses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manager_module, "SETUP_SLACK_SEC", 1)

    async def body() -> None:
        async with endpoint(tmp_path / "ep") as ep:
            client = await paired_client(ep, tmp_path)
            grant = await client.call(
                SessionRequest(test_type="throughput", params=tcp(1)), SessionGrant
            )
            assert len(iperf_servers()) == 1
            # Asked for all along, the result is pending (never unknown, not even while the
            # ended session is wound up) until it is kept, after expiry at 1 s test + 1 s slack.
            result = await result_when_kept(client, grant.session_id, within=10)
            assert iperf_servers() == []
            status = await client.call(GetStatus(), StatusSnapshot)
            assert status.sessions == ()
            assert result.result["outcome"] == "expired"
            assert result.result["error"]["code"] == "iperf3_timeout"
            # The token died with the session.
            app = ApplianceIdentity.open(tmp_path / "app")
            assert await tunnel_attempt(ep, app, grant.session_id, grant.token) == "bad_token"
            await client.close()
            assert events(ep, "session_close")[-1]["reason"] == "expired"

    run(body())


def test_a_dropped_control_connection_ends_the_session_after_the_grace(tmp_path: Path) -> None:
    async def body() -> None:
        async with endpoint(tmp_path / "ep", "session_grace_sec = 1\n") as ep:
            client = await paired_client(ep, tmp_path)
            await client.call(SessionRequest(test_type="throughput", params=tcp(30)), SessionGrant)
            await client.close()
            await soon(lambda: events(ep, "session_close"), 10, "the session closed")
            assert events(ep, "session_close")[-1]["reason"] == "peer_gone"
            await soon(lambda: iperf_servers() == [], 10, "the engine stopped")

    run(body())


# --- latency and bufferbloat


def test_latency_through_the_granted_echo(tmp_path: Path) -> None:
    async def body() -> None:
        async with endpoint(tmp_path / "ep") as ep:
            client = await paired_client(ep, tmp_path)
            doc = await measure.latency(client, duration_sec=1, interval_ms=10)
            await client.close()
            lat = doc["latency"]
            assert lat["sent"] == 100 and lat["received"] == 100 and lat["lost"] == 0
            assert 0 < lat["rtt"]["min_ms"] <= lat["rtt"]["p50_ms"] <= lat["rtt"]["max_ms"]
            assert lat["reflector_processing"]["p50_ms"] >= 0
            reflector = doc["endpoint"]["reflector"]
            assert reflector["rx_packets"] == 100 and reflector["tx_packets"] == 100
            assert reflector["tx_bytes"] <= reflector["rx_bytes"]  # never amplifies
            assert events(ep, "accounting")[-1]["bytes_rx"] == reflector["rx_bytes"]

    run(body())


def test_bufferbloat_measures_idle_and_loaded_latency_in_one_grant(tmp_path: Path) -> None:
    async def body() -> None:
        async with endpoint(tmp_path / "ep") as ep:
            client = await paired_client(ep, tmp_path)
            app = ApplianceIdentity.open(tmp_path / "app")
            opts = measure.ThroughputOptions(duration_sec=3, streams=2)
            doc = await measure.bufferbloat(client, app, opts, idle_sec=1, interval_ms=20)
            await client.close()
            assert doc["idle"]["received"] > 0 and doc["loaded"]["received"] > 0
            assert doc["throughput"]["sent_bps"] > 0
            assert set(doc["increase_ms"]) == {"p50_ms", "p90_ms", "p99_ms"}
            assert len(events(ep, "session_grant")) == 1

    run(body())


def test_bufferbloat_fits_its_load_phase_into_the_endpoints_maximum_duration(
    tmp_path: Path,
) -> None:
    """Asking for as long a load as the endpoint allows is shortened to fit, not refused."""

    async def body() -> None:
        text = BASE.replace("[quotas]\n", "[quotas]\nmax_test_duration_sec = 6\n")
        async with endpoint_with(tmp_path / "ep", text) as ep:
            client = await paired_client(ep, tmp_path)
            app = ApplianceIdentity.open(tmp_path / "app")
            opts = measure.ThroughputOptions(duration_sec=6)
            doc = await measure.bufferbloat(client, app, opts, idle_sec=1, interval_ms=50)
            assert doc["throughput"]["duration_sec"] == 6 - 1 - measure.BUFFERBLOAT_SLACK_SEC
            (grant,) = events(ep, "session_grant")
            assert grant["params"]["duration_sec"] == 6
            with pytest.raises(ReflectorError, match="at most 6 s"):
                await measure.bufferbloat(client, app, opts, idle_sec=5)
            await client.close()

    run(body())


# --- direct mode


def direct_scenario(state: str) -> None:
    """Run inside a private network namespace (see the test): direct mode with real holes."""
    import subprocess as sp

    def holes() -> str:
        return sp.run(
            ["nft", "list", "set", "inet", "reflector", "holes4"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    async def body() -> None:
        tmp = Path(state)
        async with endpoint(tmp / "ep", '[network]\nmode = "direct_ephemeral"\n') as ep:
            client = await paired_client(ep, tmp)
            grant = await client.call(
                SessionRequest(test_type="throughput", params=tcp(5)), SessionGrant
            )
            port = grant.ports["data"]
            assert f"127.0.0.1 . tcp . {port}" in holes()
            await client.call(SessionClose(session_id=grant.session_id), Ok)
            assert f". {port}" not in holes()
            app = ApplianceIdentity.open(tmp / "app")
            doc = await measure.throughput(client, app, measure.ThroughputOptions(duration_sec=1))
            assert doc["mode"] == "direct_ephemeral"
            assert "error" not in doc["endpoint"], doc["endpoint"]
            assert doc["endpoint"]["firewall_bytes"] >= doc["endpoint"]["bytes_transferred"]
            udp = measure.ThroughputOptions(duration_sec=1, udp=True, bitrate_bps=10_000_000)
            doc = await measure.throughput(client, app, udp)
            assert doc["endpoint"]["endpoint"]["udp"] is not None
            kinds = [e["reflector_event"] for e in audit(ep)]
            assert kinds.count("hole_open") == 3 and kinds.count("hole_close") == 3
            await client.close()
        # A clean stop leaves no hole: the table stays and keeps the data range closed.
        assert "elements" not in holes()
        async with endpoint(tmp / "ep", '[network]\nmode = "direct_ephemeral"\n') as ep:
            # The firewall breaks while the endpoint runs (here: someone deletes its table).
            # Firewall first: the refusal comes before any engine binds the public port.
            client = await paired_client(ep, tmp)
            engine_starts: list[str] = []
            start_engine = ep.service._start_engine

            async def watched(link: Any, session: Any) -> Any:
                engine_starts.append(session.session_id)
                return await start_engine(link, session)

            ep.service._start_engine = watched  # type: ignore[method-assign]
            sp.run(["nft", "delete", "table", "inet", "reflector"], check=True)
            for params in (tcp(2), echo(2)):
                kind = "throughput" if isinstance(params, ThroughputParams) else "udp_echo"
                with pytest.raises(RemoteError) as err:
                    await client.call(SessionRequest(test_type=kind, params=params), SessionGrant)
                assert err.value.code == "firewall_unavailable"
            assert engine_starts == [] and iperf_servers() == []
            await client.close()

    run(body())


def in_private_netns(scenario: str, state: Path, *, net_admin: bool = True) -> None:
    """Run `scenario(state)` of this module in a child in a network namespace of its own.

    Direct mode changes nftables; in its own namespace it touches nothing of the host's.
    """
    import subprocess as sp
    import sys

    repo = Path(__file__).resolve().parents[2]
    code = f"import tests.system.test_dataplane_loopback as t; t.{scenario}({str(state)!r})"
    drop = "" if net_admin else "setpriv --inh-caps=-net_admin --bounding-set=-net_admin "
    done = sp.run(
        [
            "unshare",
            "--net",
            "--",
            "sh",
            "-c",
            f'ip link set lo up && exec {drop}{sys.executable} -c "{code}"',
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.system
def test_direct_mode_opens_a_hole_per_session_in_a_private_namespace(tmp_path: Path) -> None:
    in_private_netns("direct_scenario", tmp_path)


def no_firewall_scenario(state: str) -> None:
    """Run without CAP_NET_ADMIN (see the test): nftables refuses us, so direct mode must too.

    The endpoint does not start (so it never tells systemd it is ready): a direct-mode
    endpoint without its drop rule over the data ports would be open wider than configured.
    Nothing is left listening and the audit trail says why it stopped.
    """
    import socket as sock

    async def body() -> None:
        tmp = Path(state)
        ep_dir = tmp / "ep"
        text = BASE + '[network]\nmode = "direct_ephemeral"\nlisten_address = ["127.0.0.1:4711"]\n'
        with pytest.raises(ReflectorError, match="direct mode needs Reflector's nftables table"):
            async with endpoint_with(ep_dir, text):
                pass
        assert iperf_servers() == []
        with pytest.raises(ConnectionRefusedError):
            sock.create_connection(("127.0.0.1", 4711), timeout=2).close()
        stops = [
            json.loads(line)
            for line in (ep_dir / "audit.jsonl").read_text().splitlines()
            if '"service_stop"' in line
        ]
        assert stops and "nftables" in stops[-1]["reason"]

    run(body())


@pytest.mark.system
def test_direct_mode_without_nftables_refuses_and_opens_nothing(tmp_path: Path) -> None:
    """A real failure, not a simulated one: the endpoint starts without CAP_NET_ADMIN."""
    in_private_netns("no_firewall_scenario", tmp_path, net_admin=False)


def test_a_test_left_open_by_a_crash_is_closed_as_interrupted_and_audited(
    tmp_path: Path,
) -> None:
    from reflector.fsutil import ensure_private_dir
    from reflector.sessions import UsageStore, clock

    state = tmp_path / "ep"
    ensure_private_dir(state)
    with UsageStore.open(state) as store:  # what a killed endpoint leaves behind
        store.record_start(
            session_id="crashedSession01",
            peer_id="PPX",
            test_type="throughput",
            started=clock.now(),
        )

    async def body() -> None:
        async with endpoint(state) as ep:
            closes = [e for e in events(ep, "session_close") if e["test_id"] == "crashedSession01"]
            assert [c["reason"] for c in closes] == ["interrupted"]
            assert ep.service.store.unfinished() == []

    run(body())


# --- accounting while a test runs, and across a crash


def ledger_bytes(state: Path, peer_id: str) -> int:
    """What the ledger charges `peer_id` for the last day, read as a restarted endpoint would."""
    from reflector.sessions import UsageStore, clock

    with UsageStore.open(state) as store:
        return store.peer_usage(peer_id, clock.now()).bytes_last_day


async def charged_while_running(
    tmp: Path, extra: str = "", prepare: Callable[[Running], None] | None = None
) -> None:
    """A 3 s throughput test: its bytes reach the ledger before it ends, and none twice."""
    async with endpoint(tmp / "ep", extra) as ep:
        if prepare is not None:
            prepare(ep)
        client = await paired_client(ep, tmp)
        app = ApplianceIdentity.open(tmp / "app")
        test = asyncio.ensure_future(
            measure.throughput(client, app, measure.ThroughputOptions(duration_sec=3))
        )
        # Charged before the end by checkpoints: the load's bytes, not just the latency
        # probes' (kilobytes). Checked and read with no await between, so the end's own
        # charge cannot have happened yet.
        mid_test = 0
        while mid_test <= 1_000_000:
            await asyncio.sleep(0.1)
            assert ep.service.manager.active_sessions, "no checkpoint charged the load in time"
            mid_test = ledger_bytes(ep.config.state_dir, app.identity.endpoint_id)
        doc = await test
        await client.close()
        assert "error" not in doc["endpoint"], doc["endpoint"]
        acct = events(ep, "accounting")[-1]
        total = acct["bytes_rx"] + acct["bytes_tx"]
        assert mid_test < total  # and the end charged only the rest: nothing twice
        assert ledger_bytes(ep.config.state_dir, app.identity.endpoint_id) == total


def test_bytes_reach_the_ledger_while_the_test_runs_and_are_charged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dataplane_module, "ACCOUNTING_CHECKPOINT_SEC", 0.3)
    run(charged_while_running(tmp_path))


def direct_checkpoint_scenario(state: str) -> None:
    """In a private namespace (see the test): the checkpoints read the holes' counters, and a
    reading that fails (here the first: a helper that timed out) costs one checkpoint only."""
    dataplane_module.ACCOUNTING_CHECKPOINT_SEC = 0.3
    failed: list[str] = []

    def first_read_times_out(ep: Running) -> None:
        host = ep.service.engine_host
        read_hole = host.read_hole

        async def flaky(test_id: str) -> Any:
            if not failed:
                failed.append(test_id)
                raise TimeoutError("timed out")
            return await read_hole(test_id)

        host.read_hole = flaky  # type: ignore[method-assign]

    direct = '[network]\nmode = "direct_ephemeral"\n'
    run(charged_while_running(Path(state), direct, first_read_times_out))
    assert failed, "the first reading failed"


@pytest.mark.system
def test_in_direct_mode_the_holes_counters_reach_the_ledger_while_the_test_runs(
    tmp_path: Path,
) -> None:
    """iperf3 reports its bytes only when it ends; the kernel counts them as they pass."""
    in_private_netns("direct_checkpoint_scenario", tmp_path)


def endpoint_until_killed(state: str, peer_id: str) -> None:
    """Run in a child process (see the test): an endpoint that says its port, then serves."""
    dataplane_module.ACCOUNTING_CHECKPOINT_SEC = 0.5

    async def body() -> None:
        async with endpoint(Path(state)) as ep:
            ep.service.peers.add(peer_id, via="cli")
            print(ep.addresses[0][1], ep.identity.endpoint_id, flush=True)
            await asyncio.sleep(120)

    run(body())


def test_kill_9_mid_test_keeps_the_bytes_counted_so_far_and_leaves_no_engine(
    tmp_path: Path,
) -> None:
    import subprocess as sp
    import sys

    app = ApplianceIdentity.open(tmp_path / "app")
    peer = app.identity.endpoint_id
    state = tmp_path / "ep"
    code = (
        "import tests.system.test_dataplane_loopback as t;"
        f" t.endpoint_until_killed({str(state)!r}, {peer!r})"
    )
    child = sp.Popen(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[2],
        stdout=sp.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        port, endpoint_id = child.stdout.readline().split()

        async def body() -> None:
            client = await LinkClient.connect(("127.0.0.1", int(port)), app, endpoint_id)
            opts = measure.ThroughputOptions(duration_sec=6)
            test = asyncio.ensure_future(measure.throughput(client, app, opts))
            await asyncio.sleep(3.0)
            engines = iperf3_engines()
            assert engines, "the test's iperf3 server should be running"
            child.kill()
            child.wait(10)
            _, alive = psutil.wait_procs(engines, timeout=5)
            assert alive == []  # the engine died with its parent
            with contextlib.suppress(Exception):
                await asyncio.wait_for(test, 30)
            with contextlib.suppress(Exception):
                await client.close()

        run(body())
    finally:
        child.kill()
        child.wait(10)
    # At most one checkpoint interval of the test went uncharged.
    assert ledger_bytes(state, peer) > 0

    async def restarted() -> None:
        async with endpoint(state) as ep:
            closes = events(ep, "session_close")
            assert [c["reason"] for c in closes] == ["interrupted"]
        assert ledger_bytes(state, peer) > 0  # closing it kept the bytes

    run(restarted())


def test_an_engine_that_dies_ends_its_session_at_once_and_frees_the_slot(tmp_path: Path) -> None:
    async def body() -> None:
        async with endpoint(tmp_path / "ep") as ep:
            client = await paired_client(ep, tmp_path)
            grant = await client.call(
                SessionRequest(test_type="throughput", params=tcp(30)), SessionGrant
            )
            (server,) = iperf3_engines()
            server.kill()
            # Not at the 30 s deadline: within moments.
            await soon(lambda: not ep.service.manager.active_sessions, 5, "the session ended")
            # The peer's close of a session that already ended is acknowledged, not an error,
            # once its result is kept, as after any close: the result is there at once.
            await client.call(SessionClose(session_id=grant.session_id), Ok)
            result = await client.call(GetResult(session_id=grant.session_id), Result)
            assert result.result["outcome"] == "failed"
            assert result.result["error"]["code"] == "iperf3_failed", result.result
            # One test at a time: the slot is free again.
            again = await client.call(
                SessionRequest(test_type="udp_echo", params=echo(1)), SessionGrant
            )
            await client.call(SessionClose(session_id=again.session_id), Ok)
            await client.close()
            closes = [e for e in events(ep, "session_close") if e["test_id"] == grant.session_id]
            assert [c["reason"] for c in closes] == ["failed"]

    run(body())


# --- every refusal reason, over the wire and in the audit trail


def _window_excluding_now() -> str:
    """A heavy-tests window (UTC) that starts in two hours and lasts one: now is outside it."""
    import datetime as dt

    hour = dt.datetime.now(dt.UTC).hour
    return f"{(hour + 2) % 24:02d}:00-{(hour + 3) % 24:02d}:00"


def throughput(streams: int = 1, bitrate: int | None = None) -> ThroughputParams:
    return ThroughputParams(
        duration_sec=20, protocol="tcp", streams=streams, reverse=False, bitrate_bps=bitrate
    )


# reason: (config sections beyond [audit], what the peer does first, the refused request)
# "first" is a list of requests granted (and, for "then_closed", closed) before the refusal.
REFUSALS: dict[str, tuple[str, list[tuple[str, Any, bool]], tuple[str, Any]]] = {
    "test_type_disabled": ("[quotas]\nallow_throughput = false\n", [], ("throughput", tcp(2))),
    "duration_exceeded": ("[quotas]\nmax_test_duration_sec = 5\n", [], ("udp_echo", echo(10))),
    "streams_exceeded": (
        "[iperf3]\nmax_streams = 2\ndefault_streams = 1\n",
        [],
        ("throughput", throughput(streams=3)),
    ),
    "bitrate_exceeded": (
        "[iperf3]\nmax_bitrate_bps = 1000000\n",
        [],
        ("throughput", throughput(bitrate=2_000_000)),
    ),
    "outside_window": (
        f'[quotas]\nheavy_tests_window = "{_window_excluding_now()}"\ntimezone = "UTC"\n',
        [],
        ("throughput", tcp(2)),
    ),
    "busy": ("", [("udp_echo", echo(30), False)], ("udp_echo", echo(2))),
    "heavy_test_running": (
        "[quotas]\nmax_concurrent_tests = 2\n",
        [("throughput", throughput(), False)],
        ("throughput", tcp(2)),
    ),
    "hourly_quota": (
        "[quotas]\nmax_tests_per_hour_per_peer = 1\n",
        [("udp_echo", echo(2), True)],
        ("udp_echo", echo(2)),
    ),
    "cooldown": (
        "[quotas]\ncooldown_sec = 600\n",
        [("udp_echo", echo(2), True)],
        ("udp_echo", echo(2)),
    ),
    "no_port_available": (
        "[quotas]\nmax_concurrent_tests = 2\n"
        "[network]\ndata_port_range_start = 5301\ndata_port_range_end = 5301\n",
        [("udp_echo", echo(30), False)],
        ("udp_echo", echo(2)),
    ),
}
# Only asking differently helps these, so they carry no retry_after (reflector/sessions/policy).
NO_RETRY = {"test_type_disabled", "duration_exceeded", "streams_exceeded", "bitrate_exceeded"}


@pytest.mark.parametrize("reason", REFUSALS)
def test_every_refusal_reason_reaches_the_peer_and_the_audit_trail(
    tmp_path: Path, reason: str
) -> None:
    sections, first, (kind, params) = REFUSALS[reason]

    async def body() -> None:
        text = '[audit]\njournald = "off"\n' + sections
        async with endpoint_with(tmp_path / "ep", text) as ep:
            client = await paired_client(ep, tmp_path)
            for first_kind, first_params, then_close in first:
                grant = await client.call(
                    SessionRequest(test_type=first_kind, params=first_params), SessionGrant
                )
                if then_close:
                    await client.call(SessionClose(session_id=grant.session_id), Ok)
            with pytest.raises(RemoteError) as err:
                await client.call(SessionRequest(test_type=kind, params=params), SessionGrant)
            await client.close()
            assert err.value.code == reason, err.value
            assert err.value.remote_message  # says what, in words
            if reason in NO_RETRY:
                assert err.value.retry_after is None
            else:
                assert err.value.retry_after is not None and err.value.retry_after > 0
            (audited,) = [e for e in events(ep, "session_deny") if e["reason"] == reason]
            assert audited["test_type"] == kind

    run(body())


def test_a_peer_over_its_daily_bytes_is_refused_until_they_age_out(tmp_path: Path) -> None:
    async def body() -> None:
        text = '[audit]\njournald = "off"\n[quotas]\nmax_bytes_per_day_per_peer = 1000\n'
        async with endpoint_with(tmp_path / "ep", text) as ep:
            client = await paired_client(ep, tmp_path)
            await measure.latency(client, duration_sec=1)  # a few kB of echo, counted
            with pytest.raises(RemoteError) as err:
                await client.call(
                    SessionRequest(test_type="udp_echo", params=echo(2)), SessionGrant
                )
            await client.close()
            assert err.value.code == "daily_bytes_quota"
            assert err.value.retry_after is not None and 0 < err.value.retry_after <= 86400
            assert [e["reason"] for e in events(ep, "session_deny")] == ["daily_bytes_quota"]

    run(body())


def test_a_service_without_its_helper_refuses_throughput_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deployed service (its unit sets REFLECTOR_SERVICE=1) with no helper socket: no
    engines as the service's own children; the latency test (built into the parent) works."""
    monkeypatch.setenv("REFLECTOR_SERVICE", "1")
    missing = tmp_path / "privd.sock"

    async def body() -> None:
        text = BASE + f'[privsep]\nhelper_socket = "{missing}"\n'
        async with endpoint_with(tmp_path / "ep", text) as ep:
            client = await paired_client(ep, tmp_path)
            with pytest.raises(RemoteError) as err:
                await client.call(
                    SessionRequest(test_type="throughput", params=tcp(2)), SessionGrant
                )
            assert err.value.code == "engine_unavailable"
            assert "reflector-privd.socket" in err.value.remote_message
            assert iperf_servers() == []
            doc = await measure.latency(client, duration_sec=1)
            assert doc["latency"]["received"] > 0
            await client.close()
            (denied,) = events(ep, "session_deny")
            assert denied["reason"] == "engine_unavailable"

    run(body())
