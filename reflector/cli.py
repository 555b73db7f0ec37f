"""The `reflector` command line (typer).

Exit codes: 0 success, 1 runtime error, 2 usage or config error. Expected errors (`ReflectorError`)
print one line on stderr, never a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from reflector import __version__
from reflector.config import DEFAULT_CONFIG_PATH, Config, config_to_toml, load_config
from reflector.errors import ConfigError, ReflectorError
from reflector.fsutil import ensure_private_dir
from reflector.identity import Identity, load_identity, load_or_create_identity, rotate_identity

app = typer.Typer(
    name="reflector",
    help="Reflector: a key-authenticated measurement endpoint for PacketParamedic appliances.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Validate or show the configuration.", no_args_is_help=True)
trace_app = typer.Typer(help="Decode captured Paramedic Link frames.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(trace_app, name="trace")

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help=f"Config file (default: $REFLECTOR_CONFIG, else {DEFAULT_CONFIG_PATH} if present).",
        show_default=False,
    ),
]
StateDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir", help="State directory (overrides service.state_dir).", show_default=False
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


def build_info() -> dict[str, str]:
    """Version and build facts, shared by `--version`, GetPathMeta and /health."""
    return {
        "version": __version__,
        "python": platform.python_version(),
        "platform": f"{platform.system().lower()}-{platform.machine()}",
        "frozen": "yes" if getattr(sys, "frozen", False) else "no",
    }


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
    typer.echo(config_to_toml(resolve_config(config, state_dir)), nl=False)


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
