"""`reflector client ...`: the appliance side on the command line (spec §5, §6, §7)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from reflector.client.link_client import (
    ApplianceIdentity,
    LinkClient,
    default_appliance_dir,
    parse_endpoint,
)
from reflector.link.messages import (
    GetPathMeta,
    GetStatus,
    Pair,
    PairOk,
    PathMeta,
    StatusSnapshot,
)

client_app = typer.Typer(help="Appliance side: talk to a Reflector endpoint.", no_args_is_help=True)

T = TypeVar("T")

EndpointOpt = Annotated[str, typer.Option("--endpoint", "-e", help="HOST:PORT of the endpoint.")]
ExpectOpt = Annotated[
    str | None, typer.Option("--expect-id", help="The endpoint's ID (reflector id on it).")
]
TofuOpt = Annotated[
    bool, typer.Option("--tofu", help="Trust an unknown endpoint on first use and record its ID.")
]
ApplianceDirOpt = Annotated[
    Path | None,
    typer.Option("--state-dir", help="Appliance state dir.", show_default=False, readable=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def with_client(
    endpoint: str,
    expect_id: str | None,
    tofu: bool,
    state_dir: Path | None,
    body: Callable[[LinkClient], Awaitable[T]],
) -> T:
    """Connect (pinning the endpoint), run `body`, close."""
    appliance = ApplianceIdentity.open(state_dir or default_appliance_dir())
    target = parse_endpoint(endpoint)

    async def run() -> T:
        client = await LinkClient.connect(target, appliance, expect_id, tofu=tofu)
        try:
            return await body(client)
        finally:
            await client.close()

    return asyncio.run(run())


def _print(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    for key, value in doc.items():
        shown = json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else value
        typer.echo(f"{key:>16}: {shown}")


@client_app.command("id")
def client_id(state_dir: ApplianceDirOpt = None, as_json: JsonOpt = False) -> None:
    """Print this appliance's ID (give it to the endpoint's operator, or pair)."""
    appliance = ApplianceIdentity.open(state_dir or default_appliance_dir())
    ident = appliance.identity
    if as_json:
        typer.echo(json.dumps({"peer_id": ident.endpoint_id, "key_path": str(ident.key_path)}))
    else:
        typer.echo(ident.endpoint_id)


@client_app.command()
def hello(
    endpoint: EndpointOpt,
    expect_id: ExpectOpt = None,
    tofu: TofuOpt = False,
    state_dir: ApplianceDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Connect, authenticate both ways, and show the endpoint's capabilities and policy."""

    async def body(client: LinkClient) -> dict[str, Any]:
        sh = client.server_hello
        assert sh is not None
        return {
            "endpoint_id": client.endpoint_id,
            "version": sh.version,
            "features": list(sh.features),
            "policy": sh.policy_summary,
        }

    _print(with_client(endpoint, expect_id, tofu, state_dir, body), as_json)


@client_app.command("pair")
def client_pair(
    endpoint: EndpointOpt,
    token: Annotated[str, typer.Option("--token", help="The token `reflector pair` printed.")],
    expect_id: ExpectOpt = None,
    tofu: TofuOpt = False,
    state_dir: ApplianceDirOpt = None,
) -> None:
    """Enroll this appliance with a one-time pairing token."""

    async def body(client: LinkClient) -> str:
        ok = await client.call(Pair(token=token), PairOk)
        return ok.peer_id

    peer_id = with_client(endpoint, expect_id, tofu, state_dir, body)
    typer.echo(f"paired: this appliance ({peer_id}) is now authorized on {endpoint}")


@client_app.command()
def status(
    endpoint: EndpointOpt,
    expect_id: ExpectOpt = None,
    tofu: TofuOpt = False,
    state_dir: ApplianceDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """This appliance's sessions and remaining quota on the endpoint."""

    async def body(client: LinkClient) -> dict[str, Any]:
        snap = await client.call(GetStatus(), StatusSnapshot)
        return {"sessions": list(snap.sessions), "quota": snap.quota}

    _print(with_client(endpoint, expect_id, tofu, state_dir, body), as_json)


@client_app.command()
def meta(
    endpoint: EndpointOpt,
    expect_id: ExpectOpt = None,
    tofu: TofuOpt = False,
    state_dir: ApplianceDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The endpoint's path facts: CPU, load, memory, interface, MTU, clock sync, build."""

    async def body(client: LinkClient) -> dict[str, Any]:
        return (await client.call(GetPathMeta(), PathMeta)).meta

    _print(with_client(endpoint, expect_id, tofu, state_dir, body), as_json)


def _progress(as_json: bool) -> Callable[[str], None]:
    """Progress lines go to stderr, so `--json` output on stdout stays machine-readable."""

    def show(text: str) -> None:
        typer.echo(f"  … {text}", err=True)

    return show


def _emit(doc: dict[str, Any], as_json: bool, table: Callable[[dict[str, Any]], str]) -> None:
    typer.echo(json.dumps(doc, indent=2, sort_keys=True) if as_json else table(doc))


DurationOpt = Annotated[int, typer.Option("--duration", "-t", min=1, max=3600, help="Seconds.")]


@client_app.command()
def throughput(
    endpoint: EndpointOpt,
    expect_id: ExpectOpt = None,
    tofu: TofuOpt = False,
    state_dir: ApplianceDirOpt = None,
    duration: DurationOpt = 10,
    streams: Annotated[int, typer.Option("--streams", "-P", min=1, max=128)] = 1,
    reverse: Annotated[bool, typer.Option("--reverse", "-R", help="Endpoint sends.")] = False,
    udp: Annotated[bool, typer.Option("--udp", "-u", help="UDP (direct mode only).")] = False,
    bitrate: Annotated[int | None, typer.Option("--bitrate", help="bits/s")] = None,
    iperf3: Annotated[str, typer.Option("--iperf3", help="iperf3 binary.")] = "/usr/bin/iperf3",
    as_json: JsonOpt = False,
) -> None:
    """Run an iperf3 throughput test through the endpoint's tunnel (or data port)."""
    from reflector.client.measure import ThroughputOptions
    from reflector.client.measure import throughput as run_throughput
    from reflector.client.report import throughput_table

    opts = ThroughputOptions(
        duration_sec=duration,
        streams=streams,
        reverse=reverse,
        udp=udp,
        bitrate_bps=bitrate,
        iperf3_path=iperf3,
    )
    appliance = ApplianceIdentity.open(state_dir or default_appliance_dir())

    async def body(client: LinkClient) -> dict[str, Any]:
        return await run_throughput(client, appliance, opts, _progress(as_json))

    _emit(with_client(endpoint, expect_id, tofu, state_dir, body), as_json, throughput_table)


@client_app.command()
def latency(
    endpoint: EndpointOpt,
    expect_id: ExpectOpt = None,
    tofu: TofuOpt = False,
    state_dir: ApplianceDirOpt = None,
    duration: DurationOpt = 10,
    interval: Annotated[int, typer.Option("--interval", help="ms between probes", min=1)] = 20,
    size: Annotated[int, typer.Option("--size", help="probe bytes", min=112, max=1472)] = 112,
    as_json: JsonOpt = False,
) -> None:
    """Measure RTT, jitter, loss and reordering with authenticated STAMP probes."""
    from reflector.client.measure import latency as run_latency
    from reflector.client.report import latency_table

    async def body(client: LinkClient) -> dict[str, Any]:
        return await run_latency(
            client,
            duration_sec=duration,
            interval_ms=interval,
            packet_size=size,
            progress=_progress(as_json),
        )

    _emit(with_client(endpoint, expect_id, tofu, state_dir, body), as_json, latency_table)


@client_app.command()
def bufferbloat(
    endpoint: EndpointOpt,
    expect_id: ExpectOpt = None,
    tofu: TofuOpt = False,
    state_dir: ApplianceDirOpt = None,
    duration: DurationOpt = 10,
    idle: Annotated[int, typer.Option("--idle", help="Idle baseline seconds.", min=1)] = 5,
    streams: Annotated[int, typer.Option("--streams", "-P", min=1, max=128)] = 4,
    reverse: Annotated[bool, typer.Option("--reverse", "-R", help="Load downstream.")] = False,
    iperf3: Annotated[str, typer.Option("--iperf3", help="iperf3 binary.")] = "/usr/bin/iperf3",
    as_json: JsonOpt = False,
) -> None:
    """Latency idle, then under an iperf3 load, in one grant; report the increase."""
    from reflector.client.measure import ThroughputOptions
    from reflector.client.measure import bufferbloat as run_bufferbloat
    from reflector.client.report import bufferbloat_table

    opts = ThroughputOptions(
        duration_sec=duration, streams=streams, reverse=reverse, iperf3_path=iperf3
    )
    appliance = ApplianceIdentity.open(state_dir or default_appliance_dir())

    async def body(client: LinkClient) -> dict[str, Any]:
        return await run_bufferbloat(
            client, appliance, opts, idle_sec=idle, progress=_progress(as_json)
        )

    _emit(with_client(endpoint, expect_id, tofu, state_dir, body), as_json, bufferbloat_table)
