"""The thin shell that applies `ruleset` batches to the kernel through libnftables.

Fail closed (spec §9.1): every request is validated completely before nftables is touched
(ValueError), and any failure of nftables itself raises FirewallError, on which callers refuse
the direct-mode session: a hole is either in the kernel with its timeout or not opened at all.

Needs CAP_NET_ADMIN in the network namespace whose firewall it changes, but only for the calls
that change or list the table: importing this module and constructing `NftFirewall` need
neither root nor a kernel round trip, so the unprivileged parent can import the types and the
privileged helper alone does the work.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from reflector.errors import ReflectorError
from reflector.firewall.ruleset import (
    ElementState,
    Hole,
    HoleCounters,
    NftBatch,
    add_holes_batch,
    delete_holes_batch,
    flush_holes_batch,
    list_set_batch,
    make_hole,
    owned_holes,
    parse_set_elements,
    remove_table_batch,
    replace_table_batch,
    sum_counters,
    validate_port_range,
    validate_test_id,
    validate_ttl,
)

__all__ = ["Firewall", "FirewallError", "NftFirewall"]

_log = logging.getLogger(__name__)

_ElementKey = tuple[str, str, int]


class FirewallError(ReflectorError):
    """nftables is unavailable or refused a change: the direct-mode session must be refused."""


class Firewall(Protocol):
    """What the data plane (through the privileged helper) asks of the host firewall."""

    def ensure_table(self, port_range: tuple[int, int]) -> None:
        """Install Reflector's table afresh for this data port range, dropping stale holes."""
        ...

    def open_hole(self, test_id: str, peer: str, proto: str, port: int, ttl_s: int) -> None:
        """Let `peer` reach `proto`/`port` for `ttl_s` seconds (the kernel enforces the end)."""
        ...

    def hole_counters(self, test_id: str) -> HoleCounters | None:
        """The bytes the test's holes carried so far; None if the test opened none."""
        ...

    def close_hole(self, test_id: str) -> HoleCounters | None:
        """Close the test's holes; their final counters, or None if it opened none."""
        ...

    def close_all(self) -> None:
        """Close every hole, keeping the table (and so the closed data port range)."""
        ...

    def remove_table(self) -> None:
        """Delete Reflector's table (clean stop); other tables are never touched."""
        ...


# The library the nftables bindings load (Debian: libnftables1).
LIBNFTABLES = "libnftables.so.1"


def _load_nftables() -> Any:
    """A libnftables context with JSON output, or FirewallError if the library is missing.

    Imported here, not at module level, so this module imports on a machine without
    libnftables (a developer laptop in tunneled mode) and fails only when direct mode is used.
    """
    try:
        import ctypes

        import nftables

        # Load the library first: when it is missing, Nftables() fails half-built and its
        # __del__ prints a traceback on stderr ("Exception ignored ... nft_ctx_free").
        ctypes.CDLL(LIBNFTABLES)
        nft = nftables.Nftables(LIBNFTABLES)
    except (ImportError, OSError) as exc:
        raise FirewallError(f"nftables is unavailable: {exc}") from exc
    nft.set_json_output(True)
    return nft


class NftFirewall:
    """`Firewall` on the kernel's nftables, through the libnftables JSON API.

    Keeps test_id -> {hole: monotonic deadline} for the holes it added, to close them by test
    and to refuse granting one (peer, proto, port) to two live tests. Each element also carries
    its test ID as its comment, so a hole is only ever deleted or counted by the test that
    opened it, and operators can see in `nft list table inet reflector` which test owns what.
    Thread-safe: one lock serialises all calls.
    """

    def __init__(
        self, port_range: tuple[int, int], *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._port_range = validate_port_range(port_range)
        self._clock = clock
        self._nft = _load_nftables()
        self._lock = threading.Lock()
        self._installed = False
        self._holes: dict[str, dict[Hole, float]] = {}

    # -- table ---------------------------------------------------------------------------------

    def ensure_table(self, port_range: tuple[int, int]) -> None:
        first_last = validate_port_range(port_range)
        with self._lock:
            self._run(replace_table_batch(first_last), "install table inet reflector")
            self._port_range = first_last
            self._installed = True
            self._holes.clear()
        _log.info("nftables table inet reflector installed; data ports %d-%d closed", *first_last)

    def remove_table(self) -> None:
        with self._lock:
            self._run(remove_table_batch(), "delete table inet reflector")
            self._installed = False
            self._holes.clear()
        _log.info("nftables table inet reflector removed")

    # -- holes ---------------------------------------------------------------------------------

    def open_hole(self, test_id: str, peer: str, proto: str, port: int, ttl_s: int) -> None:
        validate_test_id(test_id)
        validate_ttl(ttl_s)
        with self._lock:
            hole = make_hole(peer, proto, port, self._port_range)
            self._check_free(test_id, hole)
            if not self._installed:
                raise FirewallError("nftables table inet reflector is not installed")
            self._run(add_holes_batch([hole], ttl_s=ttl_s, test_id=test_id), "open a hole")
            # Taken after the kernel accepted the element, so the kernel's timeout always
            # ends before this deadline: a hole we think expired really is gone.
            self._holes.setdefault(test_id, {})[hole] = self._clock() + ttl_s
        _log.info(
            "hole opened for test %s: %s %s/%d for %d s", test_id, hole.peer, proto, port, ttl_s
        )

    def hole_counters(self, test_id: str) -> HoleCounters | None:
        validate_test_id(test_id)
        with self._lock:
            holes = self._holes.get(test_id)
            if holes is None:
                return None
            return sum_counters(holes, self._list(holes), test_id)

    def close_hole(self, test_id: str) -> HoleCounters | None:
        validate_test_id(test_id)
        with self._lock:
            holes = self._holes.get(test_id)
            if holes is None:
                return None
            present = self._list(holes)
            counters = sum_counters(holes, present, test_id)
            try:
                self._delete(owned_holes(holes, present, test_id))
            except FirewallError:
                # An element may have expired between listing and deleting, which fails the
                # whole batch: list again and delete what is still there.
                self._delete(owned_holes(holes, self._list(holes), test_id))
            del self._holes[test_id]
        _log.info(
            "holes closed for test %s: %d bytes, %d expired earlier",
            test_id,
            counters.bytes,
            counters.expired,
        )
        return counters

    def close_all(self) -> None:
        with self._lock:
            if self._installed:
                self._run(flush_holes_batch(), "close all holes")
            self._holes.clear()

    # -- internals -----------------------------------------------------------------------------

    def _check_free(self, test_id: str, hole: Hole) -> None:
        """Refuse a hole that a live test (this one or another) already holds: closing one
        test must never close another's, and re-adding would not refresh the timeout."""
        now = self._clock()
        for owner, holes in self._holes.items():
            deadline = holes.get(hole)
            if deadline is not None and deadline > now:
                raise ValueError(
                    f"{hole.proto}/{hole.port} for {hole.peer} is already open for test {owner}"
                )

    def _list(self, holes: dict[Hole, float]) -> dict[_ElementKey, ElementState]:
        present: dict[_ElementKey, ElementState] = {}
        for set_name in sorted({hole.set_name for hole in holes}):
            output = self._run(list_set_batch(set_name), f"list set {set_name}")
            try:
                present.update(parse_set_elements(output))
            except ValueError as exc:
                raise FirewallError(f"unexpected nftables listing of {set_name}: {exc}") from exc
        return present

    def _delete(self, holes: list[Hole]) -> None:
        if holes:
            self._run(delete_holes_batch(holes), "close a hole")

    def _run(self, batch: NftBatch, what: str) -> dict[str, Any]:
        """Send one batch (one kernel transaction); FirewallError with nft's reason on failure."""
        try:
            rc, output, error = self._nft.json_cmd(batch)
        except (OSError, ValueError) as exc:
            raise FirewallError(f"nftables failed to {what}: {exc}") from exc
        if rc != 0:
            reason = " ".join(str(error).split()) or f"exit status {rc}"
            raise FirewallError(f"nftables failed to {what}: {reason}")
        return output if isinstance(output, dict) else {}
