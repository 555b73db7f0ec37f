"""Error types shared by every layer.

Two kinds, as h11 does it: `ReflectorError` is an expected failure that the CLI prints as one
clear line (exit 1, or 2 for usage/config errors); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class ReflectorError(Exception):
    """An expected runtime failure with a message meant for the operator (exit code 1)."""

    exit_code = 1


class ConfigError(ReflectorError):
    """The configuration or the command line is wrong (exit code 2)."""

    exit_code = 2


class IdentityError(ReflectorError):
    """The identity key is missing, unreadable, corrupt or too widely readable."""


class EndpointIdError(ValueError):
    """A textual Endpoint/peer ID is malformed or fails its check characters."""
