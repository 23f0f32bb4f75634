"""Admission: a bound on the engine requests in flight, and the drain a shutdown runs.

Every admitted HTTP request holds a `Ticket` for its engine requests (one per choice) until its
response ends, however it ends. While `max_queue` engine requests are in flight (waiting or running),
a new request is refused at once with 429 and a Retry-After, instead of queueing without bound: a
client (or a load balancer) can then try another replica. While draining, every new request is
refused with 503, and `drain` waits for the tickets out to come back.
"""

import asyncio
import logging
from collections.abc import Callable

from kvlab.server.errors import ApiError

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a 429 suggests: requests on a busy engine finish within seconds
ABORT_GRACE_S = 5.0  # after the drain timeout, how long aborted requests get to send their last bytes


class Ticket:
    """The engine request ids an HTTP request runs; `release` (idempotent) hands them back."""

    __slots__ = ("admission", "request_ids")

    def __init__(self, admission: "Admission", request_ids: list[str]):
        self.admission = admission
        self.request_ids = request_ids

    def release(self) -> None:
        if self.request_ids:
            self.admission._release(self.request_ids)
            self.request_ids = []


class Admission:
    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.draining = False
        self._in_flight: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    def check_open(self) -> None:
        if self.draining:
            raise ApiError(503, "the server is shutting down", type="service_unavailable", code="draining")

    def check_size(self, n: int) -> None:
        """ApiError 400 for a request of `n` choices, more than the queue could ever hold: checked
        before the request's choices are built (a body with n = 10^9 would otherwise take the
        server's memory and event loop first)."""
        if n > self.max_queue:
            raise ApiError(400, f"n={n} exceeds the server's max_queue ({self.max_queue})", param="n")

    def admit(self, request_ids: list[str]) -> Ticket:
        """Take room for `request_ids`, or raise ApiError 503 (draining) / 429 (full) / 400 (more than
        the queue could ever hold)."""
        self.check_open()
        self.check_size(len(request_ids))
        if len(self._in_flight) + len(request_ids) > self.max_queue:
            raise ApiError(
                429,
                f"the server is at capacity ({self.max_queue} requests in flight); retry after {RETRY_AFTER_S} s",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self._in_flight.update(request_ids)
        self._idle.clear()
        return Ticket(self, list(request_ids))

    def _release(self, request_ids: list[str]) -> None:
        self._in_flight.difference_update(request_ids)
        if not self._in_flight:
            self._idle.set()

    async def drain(self, timeout_s: float, abort: Callable[[str], None]) -> bool:
        """Refuse new requests, wait up to `timeout_s` for those in flight, then `abort` the rest (their
        responses end) and give them ABORT_GRACE_S to finish. True when everything finished in time."""
        self.draining = True
        logger.info(
            "draining: %d request(s) in flight, waiting up to %.0f s", len(self._in_flight), timeout_s
        )
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            pass
        logger.warning("drain timeout: aborting %d request(s)", len(self._in_flight))
        for request_id in list(self._in_flight):
            abort(request_id)
        try:
            await asyncio.wait_for(self._idle.wait(), ABORT_GRACE_S)
        except TimeoutError:
            logger.warning("%d request(s) still open after the abort", len(self._in_flight))
        return False
