"""`reflector self-update`: verify a signed release and replace this binary (spec §9.3).

Off unless `[updates] enabled = true`: a locked-down host refuses before fetching anything. The
command never restarts the service or runs the new binary; the operator (or the Ansible role)
restarts `reflector.service` afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from reflector import __version__
from reflector.config import Config
from reflector.errors import ConfigError

if TYPE_CHECKING:
    from reflector.update.selfupdate import Offer

# Where the Ansible role puts the release public key when the config names none.
DEFAULT_PUBLIC_KEY_PATH = Path("/etc/reflector/update.pub")

update_app = typer.Typer(
    help="Verify a signed release manifest and replace this binary with it.",
    invoke_without_command=True,
)


def _resolve_config(config_path: Path | None) -> Config:
    # Imported here: reflector.cli imports this module to register the command.
    from reflector.cli import resolve_config

    return resolve_config(config_path, None)


def _manifest_source(cfg: Config, manifest: str | None) -> str:
    source = manifest or str(getattr(cfg.updates, "manifest_url", "") or "")
    if not source:
        raise ConfigError("no manifest: pass --manifest URL|FILE or set updates.manifest_url")
    return source


def _public_key_path(cfg: Config, public_key: Path | None) -> Path:
    if public_key is not None:
        return public_key
    configured = str(getattr(cfg.updates, "public_key_path", "") or "")
    return Path(configured) if configured else DEFAULT_PUBLIC_KEY_PATH


def _describe(offer: Offer) -> str:
    art = offer.artifact
    return (
        f"manifest {offer.source}: signed by key {offer.signed_by.key_id_hex};"
        f" release {offer.manifest.version} ({art.name}, {art.size} bytes, sha256 {art.sha256});"
        f" running {__version__}: {offer.decision.action.value}: {offer.decision.reason}"
    )


@update_app.callback(invoke_without_command=True)
def self_update(
    check_only: Annotated[
        bool, typer.Option("--check", help="Verify the manifest and report; change nothing.")
    ] = False,
    manifest: Annotated[
        str | None,
        typer.Option(
            "--manifest",
            help="Manifest URL (http/https) or file (default: config).",
            show_default=False,
        ),
    ] = None,
    public_key: Annotated[
        Path | None,
        typer.Option(
            "--public-key",
            help=f"minisign public key (default: config, else {DEFAULT_PUBLIC_KEY_PATH}).",
            show_default=False,
            readable=False,
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Install even an older or the same release.")
    ] = False,
    do_rollback: Annotated[
        bool, typer.Option("--rollback", help="Swap the binary with <binary>.previous.")
    ] = False,
    binary: Annotated[
        Path | None,
        typer.Option(
            "--binary",
            help="The binary to replace (default: the running one).",
            show_default=False,
            readable=False,
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Config file.", show_default=False, readable=False),
    ] = None,
) -> None:
    """Verify the signed manifest, then the artifact's SHA-256 and size; replace atomically."""
    # Imported here, not at the top: every `reflector` command loads this module to register
    # the sub-command, and only self-update needs urllib, hashing and minisign.
    from reflector.update.selfupdate import (
        check,
        host_arch,
        install,
        load_public_key,
        rollback,
        running_binary,
    )

    cfg = _resolve_config(config)
    if not cfg.updates.enabled:
        raise ConfigError(
            "self-update is disabled on this host ([updates] enabled = false); enable it in the"
            " config to allow it"
        )
    if do_rollback and (check_only or force or manifest is not None):
        raise ConfigError("--rollback takes no --check, --force or --manifest")
    if do_rollback:
        target = binary or running_binary()
        previous = rollback(target)
        typer.echo(f"rolled back {target}; the replaced binary is now {previous}")
        return
    key = load_public_key(_public_key_path(cfg, public_key))
    offer = check(
        _manifest_source(cfg, manifest),
        key,
        current_version=__version__,
        arch=host_arch(),
        force=force,
    )
    typer.echo(_describe(offer))
    if check_only:
        return
    target = binary or running_binary()
    done = install(offer, target)
    typer.echo(
        f"installed {done.artifact.name} as {done.target} (previous binary kept as"
        f" {done.previous}); restart reflector to run it"
    )
