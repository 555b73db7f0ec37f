"""reflector.toml: defaults from the spec, strict validation with file/key/reason errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from reflector.config import (
    Config,
    config_to_toml,
    effective_config,
    load_config,
    parse_address,
    parse_config_text,
)
from reflector.endpoint_id import endpoint_id_from_public_key
from reflector.errors import ConfigError

SPEC_EXAMPLE = """
[identity]
private_key_path = "/var/lib/reflector/identity.ed25519"

[network]
listen_address = "0.0.0.0:4000"
alpn = "pp-link/1"
mode = "tunneled"
data_port_range_start = 5201
data_port_range_end = 5299

[access]
pairing_enabled = false
authorized_peers = [PEER]

[quotas]
max_test_duration_sec = 60
max_concurrent_tests = 1
max_tests_per_hour_per_peer = 10
max_bytes_per_day_per_peer = 5000000000
allow_udp_echo = true
allow_throughput = true

[iperf3]
path = "/usr/bin/iperf3"
default_streams = 4
max_streams = 8
"""

PEER = endpoint_id_from_public_key(bytes(range(32)))


def test_defaults_are_the_spec_defaults() -> None:
    cfg = load_config(None)
    assert cfg.network.listen_address == ["0.0.0.0:4000", "[::]:4000"]
    assert cfg.network.mode == "tunneled"
    assert (cfg.network.data_port_range_start, cfg.network.data_port_range_end) == (5201, 5299)
    assert cfg.quotas.max_test_duration_sec == 60
    assert cfg.quotas.max_concurrent_tests == 1
    assert cfg.quotas.max_tests_per_hour_per_peer == 10
    assert cfg.quotas.max_bytes_per_day_per_peer == 5_000_000_000
    assert cfg.access.pairing_enabled is False
    assert cfg.iperf3.max_streams == 8
    assert cfg.key_path == Path("/var/lib/reflector/identity.ed25519")


def test_the_spec_example_is_accepted() -> None:
    cfg = parse_config_text(SPEC_EXAMPLE.replace("PEER", f'"{PEER}"'))
    assert cfg.network.listen_address == ["0.0.0.0:4000"]
    assert cfg.access.authorized_peers == [PEER]


def test_peer_ids_are_canonicalized() -> None:
    sloppy = PEER.lower().replace("-", " ")
    cfg = parse_config_text(f'[access]\nauthorized_peers = ["{sloppy}"]')
    assert cfg.access.authorized_peers == [PEER]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[quotas]\nmax_test_duration_sec = -5",
            "quotas.max_test_duration_sec: must be between 1 and 3600, got -5",
        ),
        (
            "[quotas]\nmax_concurrent_tests = true",
            "quotas.max_concurrent_tests: must be an integer",
        ),
        ("[quotas]\nallow_udp_echo = 1", "quotas.allow_udp_echo: must be true or false"),
        ("[network]\nmode = 'open_relay'", "network.mode: must be one of 'tunneled'"),
        ("[network]\nlisten_address = '4000'", "network.listen_address: must look like"),
        ("[network]\nlisten_address = ':::4000'", "network.listen_address"),
        ("[network]\nbogus = 1", "network.bogus: unknown key"),
        ("[nonsense]\nx = 1", "nonsense: unknown key"),
        ("network = 5", "network: must be a table"),
        (
            "[access]\nauthorized_peers = ['PP12']",
            "access.authorized_peers[0]: not a valid peer ID",
        ),
        ("[quotas]\nheavy_tests_window = '1-6'", "quotas.heavy_tests_window: must look like"),
        ("[quotas]\ntimezone = 'Mars/Olympus'", "quotas.timezone: unknown time zone"),
        ("[limits]\nmemory_max = 'lots'", "limits.memory_max: must be a byte count"),
        (
            "[network]\ndata_port_range_start = 6000\ndata_port_range_end = 5999",
            "network.data_port_range_end: must not be below",
        ),
        (
            "[iperf3]\ndefault_streams = 9\nmax_streams = 8",
            "iperf3.default_streams: must not exceed max_streams",
        ),
        (
            "[network]\nlisten_address = '0.0.0.0:5201'",
            "overlaps the control port 5201",
        ),
        ("[quotas.peers.PPXX]\nmax_tests_per_hour = 3", "quotas.peers.PPXX: not a valid peer ID"),
        ("x = ", "not valid TOML"),
        ("[identity]\nprivate_key_path = 'k.key'", "private_key_path: must be an absolute path"),
        ("[identity]\nprivate_key_path = '/etc/k.key'", "must be in a directory of its own"),
        ("[service]\nstate_dir = ''", "service.state_dir: must be an absolute path, got ''"),
        ("[service]\nstate_dir = 'state'", "service.state_dir: must be an absolute path"),
        ("[service]\nstate_dir = '/var/lib'", "service.state_dir: must be a directory of its own"),
        ("[iperf3]\npath = ''", "iperf3.path: must be an absolute path, got ''"),
        ("[iperf3]\npath = 'iperf3'", "iperf3.path: must be an absolute path, got 'iperf3'"),
    ],
)
def test_bad_config_names_the_key_and_the_reason(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config_text(text, label="reflector.toml")
    assert str(err.value).startswith("reflector.toml: ")
    assert message in str(err.value)


def test_per_peer_overrides() -> None:
    cfg = parse_config_text(
        f'[quotas.peers."{PEER}"]\nmax_tests_per_hour = 3\nheavy_tests_window = "01:00-06:00"'
    )
    assert cfg.quotas.peers[PEER].max_tests_per_hour == 3
    assert cfg.quotas.peers[PEER].heavy_tests_window == "01:00-06:00"


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope.toml: cannot read config"):
        load_config(missing)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary)
    huge = tmp_path / "huge.toml"
    huge.write_text("# " + "x" * (1024 * 1024 + 10))
    with pytest.raises(ConfigError, match="larger than"):
        load_config(huge)


def test_state_dir_override_moves_the_key(tmp_path: Path) -> None:
    cfg = load_config(None, state_dir=tmp_path)
    assert cfg.key_path == tmp_path / "identity.ed25519"


def test_a_relative_state_dir_override_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, state_dir=Path("state"))
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.key_path == tmp_path / "state" / "identity.ed25519"


def test_a_shared_system_directory_is_refused_as_state_dir_override() -> None:
    with pytest.raises(ConfigError, match=r"^--state-dir: must be a directory of its own"):
        load_config(None, state_dir=Path("/etc"))


def test_the_effective_config_names_the_key_path_instead_of_an_empty_string() -> None:
    derived = effective_config(parse_config_text('[service]\nstate_dir = "/srv/reflector"'))
    assert derived.identity.private_key_path == "/srv/reflector/identity.ed25519"
    assert 'private_key_path = "/srv/reflector/identity.ed25519"' in config_to_toml(derived)
    explicit = parse_config_text('[identity]\nprivate_key_path = "/etc/reflector/keys/id.key"')
    assert effective_config(explicit) == explicit
    # Writing the derived path out changes nothing about what Reflector uses.
    assert parse_config_text(config_to_toml(derived)).key_path == derived.key_path


def test_show_round_trips_through_the_parser() -> None:
    cfg = parse_config_text(f'[access]\nauthorized_peers = ["{PEER}"]\n[quotas.peers."{PEER}"]\n')
    assert parse_config_text(config_to_toml(cfg)) == cfg
    assert parse_config_text(config_to_toml(Config())) == Config()


def test_parse_address_both_families() -> None:
    assert parse_address("0.0.0.0:4000") == ("0.0.0.0", 4000)
    assert parse_address("[::]:4000") == ("::", 4000)
    with pytest.raises(ValueError, match="brackets"):
        parse_address("::1:4000")
    with pytest.raises(ValueError, match="between 1 and 65535"):
        parse_address("127.0.0.1:70000")
