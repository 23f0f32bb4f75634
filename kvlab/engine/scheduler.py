"""Continuous batching: which requests run this step, and how many tokens each, within a token budget.

Every step `schedule()` picks work under `max_num_batched_tokens` and `max_num_seqs`, reserving KV
slots as it goes; the runner executes the step; `update()` commits the results (appends sampled
tokens, publishes newly full blocks to the prefix cache, applies stop conditions, frees finished
requests). A running request that cannot get slots makes the newest unscheduled running request
give its blocks back (preemption by recompute: its tokens are kept, its K/V recomputed later).

How prefill and decode share a step is the `pd_policy` (see EngineConfig).
"""

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from kvlab.engine.block_pool import HashFn, hash_block_tokens
from kvlab.engine.compression import press_step_limit
from kvlab.engine.config import EngineConfig
from kvlab.engine.kv_cache_manager import KVCacheManager, PrefixHit
from kvlab.engine.request import Request, RequestStatus
from kvlab.errors import PromptTooLongError


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step: tokens [start, start + num_new_tokens) of its token ids."""

    request: Request
    num_new_tokens: int
    start: int  # num_computed_tokens before the step: the true position of the first new token
    start_slot: int  # the cache slot of the first new token (num_cached_tokens, or the ring slot)
    seq_len: int  # cache slots attention reads after this step's K/V are written
    block_ids: list[int]  # the request's block table after allocation (live list of the manager)
    samples: bool  # the step reaches the request's last known token, so its logits give the next one
    is_prefill: bool
    overwrites_slot: bool = False  # a ring step: the new token replaces the token in start_slot

    @property
    def token_ids(self) -> list[int]:
        return self.request.token_ids_slice(self.start, self.start + self.num_new_tokens)


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_request_ids: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_prefill_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled if s.is_prefill)

    @property
    def num_decode_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled if not s.is_prefill)


class Scheduler:
    def __init__(self, config: EngineConfig, num_blocks: int, hash_fn: HashFn = hash_block_tokens):
        self.config = config
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching, hash_fn)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # oldest admission first; the last is preempted first
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._last_step_was_prefill = False

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.check_fits(request)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def check_fits(self, request: Request) -> None:
        """Raise PromptTooLongError if the request could not fit the KV pool even alone."""
        max_tokens = request.num_prompt_tokens + request.sampling_params.max_tokens
        if self.config.max_model_len is not None:
            max_tokens = min(max_tokens, self.config.max_model_len)
        if self.kv.num_blocks_for(max_tokens) > self.kv.num_blocks:
            # It could never fit, even alone: preempting everything else would not help.
            raise PromptTooLongError(
                f"prompt ({request.num_prompt_tokens} tokens) + max_tokens "
                f"({request.sampling_params.max_tokens}) needs more than the KV pool's "
                f"{self.kv.num_blocks} blocks of {self.config.block_size} tokens"
            )

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = [self.config.max_num_batched_tokens]  # a cell, shared by the phase helpers
        policy = self.config.pd_policy
        if policy == "hybrid":
            self._schedule_running(out, budget, prefill=False)
            self._schedule_prefills(out, budget)
        else:
            # strict: prefill has priority; time_share: the other kind than last step's goes first.
            prefill_first = policy == "strict" or not self._last_step_was_prefill
            if prefill_first:
                self._schedule_prefills(out, budget)
            else:
                self._schedule_running(out, budget, prefill=False)
            if out.is_empty:  # the preferred kind had nothing runnable: never waste a step
                if prefill_first:
                    self._schedule_running(out, budget, prefill=False)
                else:
                    self._schedule_prefills(out, budget)
        if not out.is_empty:
            self._last_step_was_prefill = out.num_prefill_tokens > 0
        return out

    def _schedule_prefills(self, out: SchedulerOutput, budget: list[int]) -> None:
        self._schedule_running(out, budget, prefill=True)
        if not out.preempted_request_ids:  # admitting now would only undo this step's preemptions
            self._schedule_waiting(out, budget)

    def _chunk(self, num_pending: int, budget: int) -> int:
        if num_pending <= budget:
            return num_pending
        return budget if self.config.enable_chunked_prefill else 0

    def _schedule_running(self, out: SchedulerOutput, budget: list[int], prefill: bool) -> None:
        scheduled_ids = {s.request.request_id for s in out.scheduled}
        for request in list(self.running):
            if budget[0] == 0:
                return
            if request.status is not RequestStatus.RUNNING or request.is_prefilling != prefill:
                continue
            if request.request_id in scheduled_ids:
                continue
            num_new = self._chunk(press_step_limit(request, request.num_pending_tokens), budget[0])
            if num_new == 0:
                continue
            while self.kv.allocate_slots(request, num_new) is None:
                victim = next(r for r in reversed(self.running) if r.request_id not in scheduled_ids)
                self._preempt(victim)
                out.preempted_request_ids.append(victim.request_id)
                if victim is request:
                    break
            else:
                self._add_scheduled(out, request, num_new, prefill)
                scheduled_ids.add(request.request_id)
                budget[0] -= num_new

    def _schedule_waiting(self, out: SchedulerOutput, budget: list[int]) -> None:
        while self.waiting and budget[0] > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            hit: PrefixHit = self.kv.get_computed_blocks(request)
            num_new = self._chunk(press_step_limit(request, request.num_tokens - hit.num_tokens), budget[0])
            if num_new == 0 or self.kv.allocate_slots(request, num_new, hit) is None:
                return  # first come first served: a later request does not overtake a stuck one
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = hit.num_tokens
            self.running.append(request)
            self._add_scheduled(out, request, num_new, prefill=True)
            budget[0] -= num_new

    def _add_scheduled(self, out: SchedulerOutput, request: Request, num_new: int, prefill: bool) -> None:
        start, cached, ring_slot = request.num_computed_tokens, request.num_cached_tokens, request.ring_slot()
        out.scheduled.append(
            ScheduledRequest(
                request=request,
                num_new_tokens=num_new,
                start=start,
                start_slot=cached if ring_slot is None else ring_slot,
                seq_len=cached + num_new if ring_slot is None else cached,
                overwrites_slot=ring_slot is not None,
                block_ids=self.kv.block_ids(request.request_id),
                samples=start + num_new == request.num_tokens,
                is_prefill=prefill,
            )
        )

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        self.running.remove(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_evicted_tokens = 0  # recomputation rebuilds the full, uncompressed cache
        request.num_ring_evictions = 0
        request.press_applied = False  # the recompute stops at the prompt's end for the press to run again
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update(self, output: SchedulerOutput, sampled_token_ids: dict[str, int]) -> list[Request]:
        """Commit a step: `sampled_token_ids` maps each request whose `samples` was set to its new token.
        Returns the requests that finished in this step (their blocks are already freed)."""
        finished = []
        for scheduled in output.scheduled:
            request = scheduled.request
            if request.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran
            request.num_computed_tokens += scheduled.num_new_tokens
            if scheduled.overwrites_slot:
                request.num_evicted_tokens += 1
                request.num_ring_evictions += 1
            self.kv.cache_full_blocks(request)
            if not scheduled.samples:
                continue
            token_id = sampled_token_ids[request.request_id]
            request.output_token_ids.append(token_id)
            status = self._stop_status(request, token_id)
            if status is not None:
                self._finish(request, status)
                finished.append(request)
        return finished

    def _stop_status(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        if token_id in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if not params.ignore_eos and token_id in request.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if len(request.output_token_ids) >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if self.config.max_model_len is not None and request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """End requests from outside (abort, stop string); unknown or finished ids are ignored."""
        finished = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request in self.waiting:
                self.waiting.remove(request)
            self._finish(request, status)
            finished.append(request)
        return finished

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request in self.running:
            self.running.remove(request)
        self.kv.free(request)
        request.status = status
        del self.requests[request.request_id]
