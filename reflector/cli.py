"""The `reflector` command line (typer).

Exit codes: 0 success, 1 runtime error, 2 usage or config error. Expected errors (`ReflectorError`)
print one line on stderr, never a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from reflector.buildinfo import build_info
from reflector.client.cli import client_app
from reflector.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    config_to_toml,
    effective_config,
    load_config,
)
from reflector.errors import ConfigError, ReflectorError
from reflector.fsutil import ensure_private_dir
from reflector.identity import Identity, load_identity, load_or_create_identity, rotate_identity
from reflector.update.cli import update_app

if TYPE_CHECKING:
    from reflector.access.peers import PeerStore
    from reflector.audit import AuditLog

app = typer.Typer(
    name="reflector",
    help="Reflector: a key-authenticated measurement endpoint for PacketParamedic appliances.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Validate or show the configuration.", no_args_is_help=True)
trace_app = typer.Typer(help="Decode captured Paramedic Link frames.", no_args_is_help=True)
peers_app = typer.Typer(help="Manage the authorized appliances.", no_args_is_help=True)
audit_app = typer.Typer(help="Query and verify the audit trail.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(trace_app, name="trace")
app.add_typer(peers_app, name="peers")
app.add_typer(audit_app, name="audit")
app.add_typer(client_app, name="client")
app.add_typer(update_app, name="self-update")

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        readable=False,
        help=f"Config file (default: $REFLECTOR_CONFIG, else {DEFAULT_CONFIG_PATH} if present).",
        show_default=False,
    ),
]
StateDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="State directory (overrides service.state_dir).",
        show_default=False,
        readable=False,  # our own check reports it in one line
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def resolve_config(config_path: Path | None, state_dir: Path | None) -> Config:
    """The effective config: explicit file, else $REFLECTOR_CONFIG, else the system file if any."""
    if config_path is None:
        env = os.environ.get("REFLECTOR_CONFIG")
        if env:
            config_path = Path(env)
        elif DEFAULT_CONFIG_PATH.exists():
            config_path = DEFAULT_CONFIG_PATH
    return load_config(config_path, state_dir=state_dir)


def _version_callback(value: bool) -> None:
    if value:
        info = build_info()
        typer.echo(
            f"reflector {info['version']} (python {info['python']}, {info['platform']},"
            f" single-binary: {info['frozen']})"
        )
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Show version."),
    ] = False,
) -> None:
    """Reflector command line."""


def _open_identity(config: Config, *, create: bool) -> tuple[Identity, bool]:
    ensure_private_dir(config.key_path.parent)
    if create:
        return load_or_create_identity(config.key_path)
    return load_identity(config.key_path), False


@app.command()
def init(config: ConfigOpt = None, state_dir: StateDirOpt = None) -> None:
    """Create the identity key (if missing) and print the Endpoint ID."""
    cfg = resolve_config(config, state_dir)
    ident, created = _open_identity(cfg, create=True)
    verb = "created" if created else "already present"
    typer.echo(f"identity {verb}: {ident.key_path}")
    typer.echo(f"Endpoint ID: {ident.endpoint_id}")


@app.command("id")
def show_id(
    config: ConfigOpt = None, state_dir: StateDirOpt = None, as_json: JsonOpt = False
) -> None:
    """Print this host's Endpoint ID."""
    cfg = resolve_config(config, state_dir)
    ident, _ = _open_identity(cfg, create=False)
    if as_json:
        doc = {
            "endpoint_id": ident.endpoint_id,
            "public_key_sha256": ident.fingerprint,
            "key_path": str(ident.key_path),
        }
        typer.echo(json.dumps(doc, indent=2))
    else:
        typer.echo(ident.endpoint_id)


@app.command("rotate-identity")
def rotate(
    config: ConfigOpt = None,
    state_dir: StateDirOpt = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Replace the identity key (the old one is kept as a backup). Every peer must re-pair."""
    cfg = resolve_config(config, state_dir)
    load_identity(cfg.key_path)  # refuse early on a bad or missing key
    if not yes and not typer.confirm("Every paired appliance will have to re-pair. Rotate?"):
        raise typer.Exit(1)
    rotation = rotate_identity(cfg.key_path, datetime.now(UTC))
    audit = _audit_for(cfg)
    audit.emit(
        "identity_rotated",
        reason="operator",
        params={"old_id": rotation.old_id, "backup": rotation.backup_path.name},
    )
    audit.close()
    typer.echo(f"old Endpoint ID: {rotation.old_id}")
    typer.echo(f"new Endpoint ID: {rotation.new.endpoint_id}")
    typer.echo(f"old key kept as: {rotation.backup_path}")
    typer.echo(
        "WARNING: every paired appliance must now re-pair with the new Endpoint ID.", err=True
    )


@config_app.command("check")
def config_check(path: Annotated[Path, typer.Argument(help="The TOML file to validate.")]) -> None:
    """Validate a config file; print the first problem and exit 2 if it is invalid."""
    load_config(path)
    typer.echo(f"{path}: ok")


@config_app.command("show")
def config_show(config: ConfigOpt = None, state_dir: StateDirOpt = None) -> None:
    """Print the effective config, defaults filled in."""
    typer.echo(config_to_toml(effective_config(resolve_config(config, state_dir))), nl=False)


@trace_app.command("decode")
def trace_decode(
    source: Annotated[str, typer.Argument(help="A file of captured frames, or - for stdin.")],
    as_json: JsonOpt = False,
) -> None:
    """Pretty-print a captured stream of Paramedic Link frames."""
    from reflector.link.trace import decode_trace, format_trace

    if source == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ReflectorError(f"{source}: cannot read: {exc.strerror or exc}") from None
    typer.echo(format_trace(decode_trace(data), as_json=as_json))


@app.command()
def serve(config: ConfigOpt = None, state_dir: StateDirOpt = None) -> None:
    """Run the endpoint: mTLS control port, sessions and test engines, until SIGTERM/SIGINT."""
    from reflector.server.main import run_serve

    run_serve(resolve_config(config, state_dir))


@app.command()
def pair(
    ttl: Annotated[str, typer.Option("--ttl", help="Window length: 30s, 10m, 1h.")] = "10m",
    config: ConfigOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Open a one-time pairing window and print its token (user presence on this host)."""
    import time

    from reflector.access import pairing
    from reflector.audit import open_audit_log

    cfg = resolve_config(config, state_dir)
    if not cfg.access.pairing_enabled:
        raise ReflectorError(
            "pairing is disabled (access.pairing_enabled = false); enable it, or authorize the"
            " appliance with `reflector peers add ID`"
        )
    ident, _ = _open_identity(cfg, create=True)
    token, window = pairing.open_window(cfg.state_dir, parse_duration(ttl), time.time())
    audit = open_audit_log(cfg.state_dir, ident.endpoint_id, cfg.audit.journald, cfg.audit.jsonl)
    audit.emit("pairing_open", params={"ttl_sec": int(window.expires_at - window.opened_at)})
    audit.close()
    expires = datetime.fromtimestamp(window.expires_at, UTC).isoformat(timespec="seconds")
    typer.echo(f"Endpoint ID:   {ident.endpoint_id}")
    typer.echo(f"Pairing token: {token}")
    typer.echo(f"Valid until:   {expires} (one appliance, once)")
    typer.echo(
        "On the appliance: reflector client pair --endpoint HOST:PORT"
        f" --expect-id {ident.endpoint_id} --token {token}"
    )


def parse_duration(text: str) -> int:
    """ "90", "90s", "10m", "1h" → seconds; ConfigError (exit 2) otherwise."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    if not number.isdigit():
        raise ConfigError(f"duration must look like 90s, 10m or 1h, got {text!r}")
    return int(number) * units[unit]


def _peer_store(cfg: Config) -> PeerStore:
    from reflector.access.peers import PeerStore

    ensure_private_dir(cfg.state_dir)
    return PeerStore(cfg.state_dir, cfg.access.authorized_peers)


def _audit_for(cfg: Config) -> AuditLog:
    from reflector.audit import open_audit_log

    ident, _ = _open_identity(cfg, create=True)
    return open_audit_log(cfg.state_dir, ident.endpoint_id, cfg.audit.journald, cfg.audit.jsonl)


@peers_app.command("list")
def peers_list(
    config: ConfigOpt = None, state_dir: StateDirOpt = None, as_json: JsonOpt = False
) -> None:
    """List the authorized appliance IDs and where each comes from."""
    sources = _peer_store(resolve_config(config, state_dir)).sources()
    if as_json:
        typer.echo(json.dumps([{"peer_id": p, "source": s} for p, s in sorted(sources.items())]))
        return
    if not sources:
        typer.echo("no authorized peers")
    for peer_id, source in sorted(sources.items()):
        typer.echo(f"{peer_id}  ({source})")


@peers_app.command("add")
def peers_add(
    peer_id: Annotated[str, typer.Argument(help="The appliance's ID (reflector id on it).")],
    config: ConfigOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Authorize an appliance by its ID (the check characters are verified)."""
    cfg = resolve_config(config, state_dir)
    store = _peer_store(cfg)
    canonical = _canonical_peer(peer_id)
    if store.add(canonical, via="cli"):
        audit = _audit_for(cfg)
        audit.emit("peer_added", peer_id=canonical, reason="cli")
        audit.close()
        typer.echo(f"authorized {canonical}")
    else:
        typer.echo(f"{canonical} was already authorized")


@peers_app.command("remove")
def peers_remove(
    peer_id: Annotated[str, typer.Argument(help="The appliance's ID.")],
    config: ConfigOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Revoke an appliance; a running server closes its open connections within seconds."""
    cfg = resolve_config(config, state_dir)
    store = _peer_store(cfg)
    canonical = _canonical_peer(peer_id)
    if not store.remove(canonical, via="cli"):
        raise ReflectorError(f"{canonical} is not an authorized peer")
    audit = _audit_for(cfg)
    audit.emit("peer_removed", peer_id=canonical, reason="cli")
    audit.close()
    typer.echo(f"revoked {canonical}")


def _canonical_peer(text: str) -> str:
    from reflector.endpoint_id import parse_id
    from reflector.errors import EndpointIdError

    try:
        return parse_id(text)
    except EndpointIdError as exc:
        raise ConfigError(f"not a valid peer ID {text!r}: {exc}") from None


@audit_app.command("verify")
def audit_verify(config: ConfigOpt = None, state_dir: StateDirOpt = None) -> None:
    """Check the hash chain of audit.jsonl; name the first broken record."""
    from reflector.audit import AUDIT_FILE_NAME, verify_chain

    cfg = resolve_config(config, state_dir)
    path = cfg.state_dir / AUDIT_FILE_NAME
    result = verify_chain(path)
    if not result.ok:
        raise ReflectorError(f"{path}: line {result.line}: {result.reason}")
    typer.echo(f"{path}: ok, {result.records} records")


# How --since/--until are read; shared by both options' help.
_TIME_HELP = (
    "ISO 8601 time, e.g. 2026-12-01 or 2026-12-01T08:00; local time (as journalctl --since)"
    " unless it ends in Z or an offset such as +02:00."
)


@audit_app.command("export")
def audit_export(
    since: Annotated[
        str | None,
        typer.Option(metavar="TIME", help=f"Records from this time on (inclusive). {_TIME_HELP}"),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option(metavar="TIME", help=f"Records before this time (exclusive). {_TIME_HELP}"),
    ] = None,
    peer: Annotated[str | None, typer.Option(help="Only this peer ID")] = None,
    event: Annotated[str | None, typer.Option(help="Only this event kind")] = None,
    fmt: Annotated[str, typer.Option("--format", help="jsonl or csv")] = "jsonl",
    source: Annotated[
        str, typer.Option(help="journal, file, or auto (journal when journald runs)")
    ] = "auto",
    config: ConfigOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Export audit records (for support bundles), from journald or audit.jsonl.

    Times without a zone are local time, as journalctl reads them; records carry UTC.
    """
    from reflector.audit import (
        AUDIT_FILE_NAME,
        EXPORT_FORMATS,
        EventKind,
        format_records,
        read_journal,
        read_jsonl,
    )

    cfg = resolve_config(config, state_dir)
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    if event is not None and event not in {k.value for k in EventKind}:
        raise ConfigError(f"--event: unknown event kind {event!r}")
    peer_id = _canonical_peer(peer) if peer else None
    since_at = parse_time(since, "--since")
    until_at = parse_time(until, "--until")
    use_journal = source == "journal" or (
        source == "auto" and Path("/run/systemd/journal/socket").exists()
    )
    if source not in ("auto", "journal", "file"):
        raise ConfigError(f"--source must be auto, journal or file, got {source!r}")
    records = (
        read_journal(since_at, until_at, peer_id, event)
        if use_journal
        else read_jsonl(cfg.state_dir / AUDIT_FILE_NAME, since_at, until_at, peer_id, event)
    )
    for line in format_records(records, fmt):
        sys.stdout.write(line if line.endswith("\n") else line + "\n")


def parse_time(text: str | None, option: str) -> datetime | None:
    """An ISO 8601 time as typed after `option`; ConfigError (exit 2) if it is not one.

    A time without a zone stays naive, which the audit readers take as local time, like
    `journalctl --since` (`reflector.audit.query`); with Z or an offset it is that instant.
    """
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"{option}: not an ISO 8601 time (e.g. 2026-12-01T08:00 or 2026-12-01T08:00Z): {text!r}"
        ) from None


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def privd(ctx: typer.Context) -> None:
    """The privileged helper (root, socket-activated by reflector-privd.socket; see SECURITY.md).

    Arguments pass through: --config FILE, --socket PATH, --parent-user, --engine-user, --help.
    """
    from reflector.privsep.helper import main as helper_main

    helper_main(list(ctx.args))


# Recent refusals shown by `reflector status`: the last day, at most this many.
STATUS_RECENT_DENIES = 10


@app.command()
def status(
    config: ConfigOpt = None, state_dir: StateDirOpt = None, as_json: JsonOpt = False
) -> None:
    """Active sessions, quota used per peer and recent denies of the local endpoint."""
    from reflector.status import collect_status, format_status

    doc = collect_status(resolve_config(config, state_dir), STATUS_RECENT_DENIES)
    typer.echo(json.dumps(doc, indent=2, sort_keys=True) if as_json else format_status(doc))


def main() -> None:
    """Console-script entry point: map expected errors to one line and an exit code.

    Usage errors are typer's own (exit 2, with its usage text); `ReflectorError` is ours.
    """
    try:
        app()
    except ReflectorError as exc:
        kind = "config error" if isinstance(exc, ConfigError) else "error"
        print(f"reflector: {kind}: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
