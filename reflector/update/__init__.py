"""Signed releases and self-update (spec §9.3).

`minisign` and `manifest` are pure (formats and decisions); `selfupdate` is the I/O shell that
fetches, verifies and swaps the binary; `cli` is the `reflector self-update` command.

Nothing is imported here: `reflector serve` registers the command, and must not pay for the
HTTP client and the rest of the update path in its idle footprint.
"""
