"""A request's life in the engine: its tokens, its status and how much of it the KV cache holds.

Two counts matter and differ once a press has compacted the cache:
  num_computed_tokens  tokens whose K/V were computed; the next token's true (RoPE) position
  num_cached_tokens    slots the request occupies in its blocks (computed minus evicted by a press)

A press that evicts by position during decode (StreamingLLM) turns the request's slots into a ring
once they reach the press budget: each decode token overwrites the slot `ring_slot()` names, so
the request's blocks stop growing (see compression.py).
"""

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvlab.errors import ConfigError
from kvlab.sampling import SamplingConfig

if TYPE_CHECKING:
    import torch

    from kvlab.engine.compression import RequestPress


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # blocks released; waits to be recomputed from its tokens
    FINISHED_STOPPED = "stop"  # EOS, a stop token id or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or the model's context reached
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )

    @property
    def finish_reason(self) -> str | None:
        """OpenAI-style reason ("stop", "length", "abort"), None while the request lives."""
        return self.value if self.is_finished else None


MAX_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's top_logprobs limit)


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """A sampled token's log-probability and the most likely tokens' at its position, under the model's
    own distribution (log-softmax of the logits, before temperature, top-k and top-p reshape it)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) pairs, most likely first


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request generation settings: how to pick tokens (`SamplingConfig`) and when to stop.

    logprobs: None for none; k >= 0 to get each sampled token's log-probability and the k most likely
    tokens' (`RequestOutput.logprobs`), k at most MAX_LOGPROBS."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self):
        _ = self.sampling_config  # validates temperature / top_k / top_p with SamplingConfig's messages
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        # Accept lists from YAML/JSON callers, store tuples so the params stay hashable and immutable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if any(s == "" for s in self.stop):
            raise ConfigError("stop strings must be non-empty")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int)
            or isinstance(self.logprobs, bool)
            or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise ConfigError(
                f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}"
            )

    @property
    def sampling_config(self) -> SamplingConfig:
        return SamplingConfig(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed
        )


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: tuple[int, ...] = ()  # any of them ends the request (unless ignore_eos)
    prompt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per output token if asked
    num_computed_tokens: int = 0
    num_evicted_tokens: int = 0
    # Hashes of this request's full blocks, chained (block i's hash covers tokens[: (i+1) * block_size]).
    # They depend only on token ids, so they survive preemption.
    block_hashes: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    press: "RequestPress | None" = None  # compresses the request's K/V once its prefill completes
    press_budget: int | None = None  # slots the press keeps (set with `press`, from the prompt length)
    num_ring_evictions: int = 0  # ring overwrites since the kept slots were last stored in position order
    # The press has run on the prompt since the request was last (re)computed from scratch: until it
    # has, no later token is computed and no ring slot is overwritten (see compression.py).
    press_applied: bool = False
    # (num_layers, kv_heads, budget) prompt positions the first compression kept; a recompute after
    # preemption keeps exactly these, so the output does not depend on memory pressure.
    press_kept: "torch.Tensor | None" = None

    def __post_init__(self):
        if not self.prompt_token_ids:
            raise ConfigError(f"request {self.request_id!r} has an empty prompt")
        self.prompt_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building the whole list."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]

    @property
    def num_cached_tokens(self) -> int:
        return self.num_computed_tokens - self.num_evicted_tokens

    @property
    def num_pending_tokens(self) -> int:
        """Known tokens whose K/V are not computed yet (prompt chunks, or the last sampled token)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """True until every prompt token (and, after preemption, every earlier output) is computed
        except the newest sampled token, which a decode step feeds."""
        return self.num_pending_tokens > 1 or self.num_computed_tokens < self.num_prompt_tokens

    @property
    def is_compacted(self) -> bool:
        """A press dropped tokens: the blocks no longer hold the plain prefix, so they are never shared."""
        return self.num_evicted_tokens > 0

    @property
    def shares_blocks(self) -> bool:
        """Whether its blocks may be published to or served from the prefix cache: never with a press,
        which compacts (and a ring overwrites) the request's blocks in place."""
        return self.press is None

    def ring_slot(self) -> int | None:
        """The slot the next decode token overwrites, or None when it is appended. A ring runs only on
        a cache the press has compacted (never on a prompt it has not seen yet)."""
        if self.press is None or not self.press.evicts_during_decode or not self.press_applied:
            return None
        if self.num_cached_tokens < self.press_budget:
            return None
        return self.press.press.ring_slot(self.num_ring_evictions, self.press_budget)

    @property
    def observes_prefill_queries(self) -> bool:
        """Its press scores tokens by the prompt's queries, which the next chunk of the prompt computes.
        A recompute after preemption keeps the remembered positions (`press_kept`): no queries needed."""
        return (
            self.press is not None
            and self.press.needs_queries
            and self.press_kept is None
            and self.num_computed_tokens < self.num_prompt_tokens
        )

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished
