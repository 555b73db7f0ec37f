"""`make demo`: the main job end to end on loopback, with temporary state and the embedded config.

It grows with the project: today it creates an endpoint identity and an appliance identity in
temporary state directories, shows both IDs and the effective embedded config, and removes
everything it made.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from reflector.config import config_to_toml, load_config
from reflector.fsutil import ensure_private_dir
from reflector.identity import load_or_create_identity


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="reflector-demo-"))
    try:
        endpoint_dir, appliance_dir = root / "endpoint", root / "appliance"
        for d in (endpoint_dir, appliance_dir):
            ensure_private_dir(d)
        endpoint, _ = load_or_create_identity(endpoint_dir / "identity.ed25519")
        appliance, _ = load_or_create_identity(appliance_dir / "identity.ed25519")
        print(f"[demo] endpoint  ID: {endpoint.endpoint_id}")
        print(f"[demo] appliance ID: {appliance.endpoint_id}")
        print("[demo] effective embedded config:")
        print(config_to_toml(load_config(None, state_dir=endpoint_dir)))
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
