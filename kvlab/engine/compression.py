"""KV compression inside the engine: a request may carry a press (`kvlab.press`), run once on its prompt.

    press = RequestPress(get_press("snapkv", window=8), compression_ratio=0.5)
    engine.add_request(prompt, params, press=press)

The budget is resolved at add_request by the one budget object (`kvlab.press.budget.Budget`, as
`PressCache` resolves it), so a budget the press cannot run (below `press.min_budget()`, e.g.
SnapKV's window + 1) is a ConfigError there, never an error inside `step()`.

After the step that computes a request's last prompt token, `run_presses` calls `compress_request`:
it gathers the request's K/V per layer from its blocks, builds the `Observations` the HF path builds
for the prompt forward -- true positions 0..n-1, all n tokens new, and the prompt's post-RoPE
queries when the press declares `needs_queries` -- asks the press which slots to keep, and
`KVCacheManager.compact` moves them to the request's first slots in place and frees the blocks past
them, so the saving shows in `get_stats()`. In place needs no free block: compaction cannot fail.

Queries are recorded by `QueryRecorder`, a backend that wraps the real one for the steps that prefill
such a request; the model is not touched. A press stays a pure tensor function.

Presses that evict by position during decode (StreamingLLM) are compacted the same way, then run as
a ring: once the request holds its budget, each decode token's K/V overwrite the slot
`press.ring_slot` names (the oldest window token), exactly as `PressCache` does, so the request's
blocks never grow past the budget and no K/V is copied. The ring runs only on a compacted cache
(`Request.press_applied`).

Preemption (recompute) must not change the output, which the compressed cache shaped: tokens
generated after the compression attended to the kept prompt tokens only. So the recompute
(`press_step_limit`) stops at the prompt's end; the press keeps exactly the positions the first
compression kept (`Request.press_kept`, so no new selection over a different token set); then the
generated tokens are computed over the compressed prompt -- in one chunk for a prefill-time press
(decode only appends), one token per step for a ring (each token saw the ring as it was then).

Supported: prefill-time presses whose layers all keep the same number of tokens and whose heads all
keep the same count (one block table serves every layer, see kv_cache_manager.py): snapkv, knorm,
random, ...; and streaming_llm. Not supported (ConfigError at add_request): presses that pick the
decode victim from attention scores (h2o, tova), per-layer budgets (pyramidkv), per-head budgets and
key re-rotation (`reposition`).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from kvlab.attention.backends.base import AttentionBackend, gather_context
from kvlab.attention.metadata import AttentionMetadata
from kvlab.engine.kv_cache_manager import KVCacheManager
from kvlab.engine.request import Request
from kvlab.errors import ConfigError
from kvlab.press.base import Observations, Press
from kvlab.press.budget import Budget


@dataclass(frozen=True, slots=True, eq=False)
class RequestPress:
    """A press and its budget for one request: `max_cache_tokens` per layer, or `compression_ratio`
    (the fraction of the prompt's tokens removed); exactly one, as for `PressCache`."""

    press: Press
    max_cache_tokens: int | None = None
    compression_ratio: float | None = None

    def __post_init__(self):
        if not isinstance(self.press, Press):
            raise ConfigError(f"press must be a Press (kvlab.get_press(name, ...)), got {self.press!r}")
        _ = self.spec  # ConfigError for a missing, doubled or out-of-range budget
        name = self.press.describe()
        if self.press.needs_mask_hook and self.press.layer_weights(2) is None:
            raise ConfigError(
                f"{name} keeps different counts per kv-head; the engine keeps one count per request"
            )
        if type(self.press).reposition is not Press.reposition:
            raise ConfigError(
                f"{name} moves kept keys (re-rotation or a wrapper); the engine keeps true positions"
            )
        if self.press.evicts_during_decode and not self.press.evicts_by_position:
            raise ConfigError(
                f"{name} picks each decode eviction from attention scores; the engine runs prefill-time "
                "presses and position-evicting ones (streaming_llm)"
            )

    @property
    def needs_queries(self) -> bool:
        return self.press.needs_queries

    @property
    def evicts_during_decode(self) -> bool:
        return self.press.evicts_during_decode

    @property
    def spec(self) -> Budget:
        """The budget as the one object PressCache and the bench resolve it with."""
        return Budget(self.max_cache_tokens, self.compression_ratio)

    def budget(self, num_prompt_tokens: int, num_layers: int) -> int:
        """Tokens every layer keeps (the HF path's budget for a first forward of the prompt). ConfigError,
        at add_request, when the press cannot run it (below `press.min_budget()`) or layers differ."""
        budgets = set(self.spec.layers(self.press, num_layers, num_prompt_tokens))
        if len(budgets) > 1:
            raise ConfigError(
                f"{self.press.describe()} gives layers different budgets; the engine needs one per request"
            )
        return budgets.pop()


class QueryRecorder(AttentionBackend):
    """Attends with `inner` and records, per layer, the post-RoPE queries of chosen token rows.

    rows: request id -> (first, last + 1) row of the step's flattened queries.
    recorded: request id -> per layer a list of (q_len, num_heads, head_dim) chunks, appended to.
    """

    def __init__(
        self,
        inner: AttentionBackend,
        kv_caches: list[tuple[Tensor, Tensor]],
        rows: dict[str, tuple[int, int]],
        recorded: dict[str, list[list[Tensor]]],
    ):
        self.inner = inner
        self.name = inner.name
        self.layer_of = {key_cache.data_ptr(): layer for layer, (key_cache, _) in enumerate(kv_caches)}
        self.rows = rows
        self.recorded = recorded
        self.num_layers = len(kv_caches)

    def write_kv(
        self, key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor, slot_mapping: Tensor
    ) -> None:
        self.inner.write_kv(key, value, key_cache, value_cache, slot_mapping)

    def forward(
        self, query: Tensor, key_cache: Tensor, value_cache: Tensor, metadata: AttentionMetadata, scale: float
    ) -> Tensor:
        layer = self.layer_of[key_cache.data_ptr()]
        for request_id, (start, end) in self.rows.items():
            chunks = self.recorded.setdefault(request_id, [[] for _ in range(self.num_layers)])
            chunks[layer].append(query[start:end].clone())
        return self.inner.forward(query, key_cache, value_cache, metadata, scale)


def press_step_limit(request: Request, num_tokens: int) -> int:
    """The most of `num_tokens` pending tokens the next step may compute for `request`.

    With a press: a step never crosses the prompt's end (the press runs on exactly the prompt, also
    when a recompute after preemption covers prompt + outputs). Past the prompt a ring press
    computes tokens one per step once it holds its budget (each overwrites the ring slot its decode
    step overwrote); until then they only append, so they may share a step up to the budget."""
    if request.press is None:
        return num_tokens
    if request.num_computed_tokens < request.num_prompt_tokens:
        return min(num_tokens, request.num_prompt_tokens - request.num_computed_tokens)
    if request.press.evicts_during_decode:
        return min(num_tokens, max(1, request.press_budget - request.num_cached_tokens))
    return num_tokens


def run_presses(
    requests: list[Request],
    kv: KVCacheManager,
    kv_caches: list[tuple[Tensor, Tensor]],
    recorded_queries: dict[str, list[list[Tensor]]],
) -> int:
    """After a step: compress every running request whose prompt is now computed and not yet pressed.
    Returns the tokens evicted."""
    evicted = 0
    for request in requests:
        if (
            request.press is None
            or request.press_applied
            or request.is_finished
            or request.num_computed_tokens < request.num_prompt_tokens
        ):
            continue
        queries = recorded_queries.pop(request.request_id, None)
        evicted += compress_request(request, kv, kv_caches, queries)
    return evicted


def compress_request(
    request: Request,
    kv: KVCacheManager,
    kv_caches: list[tuple[Tensor, Tensor]],
    queries: list[list[Tensor]] | None,
) -> int:
    """Run the request's press on its just-computed prompt and compact its blocks in place; returns
    the tokens evicted (0 when the prompt is within budget). The first compression's kept positions
    are remembered and reused after a recompute.

    queries: per layer, the recorded (q_len, num_heads, head_dim) chunks of the prompt's forward.
    """
    spec = request.press
    n = request.num_cached_tokens
    if n != request.num_prompt_tokens or request.num_computed_tokens != n:
        raise RuntimeError(f"request {request.request_id!r}: the press runs on exactly its computed prompt")
    budget = request.press_budget
    request.press_applied = True
    if n <= budget:
        return 0
    if request.press_kept is None:
        request.press_kept = _select(
            spec.press, kv.block_ids(request.request_id), n, budget, kv_caches, queries
        )
    kv.compact(request, request.press_kept, kv_caches)
    return n - budget


def _select(
    press: Press,
    block_ids: list[int],
    n: int,
    budget: int,
    kv_caches: list[tuple[Tensor, Tensor]],
    queries: list[list[Tensor]] | None,
) -> Tensor:
    """The press's kept slots (num_layers, kv_heads, budget), ascending; slot i holds position i."""
    num_kv_heads, head_dim = kv_caches[0][0].shape[-2:]
    positions = torch.arange(n, device=kv_caches[0][0].device).expand(1, num_kv_heads, n)
    kept = []
    for layer, (key_cache, value_cache) in enumerate(kv_caches):
        # (n, kv_heads, D) -> (1, kv_heads, n, D), the press's layout
        keys = gather_context(key_cache, block_ids, n).transpose(0, 1).unsqueeze(0)
        values = gather_context(value_cache, block_ids, n).transpose(0, 1).unsqueeze(0)
        layer_queries = None
        if queries is not None:
            layer_queries = torch.cat(queries[layer]).transpose(0, 1).unsqueeze(0)  # (1, heads, q_len, D)
        obs = Observations(positions=positions, num_new=n, queries=layer_queries, scaling=head_dim**-0.5)
        selection = press.keep(layer, keys, values, obs, budget)
        if selection.valid is not None:  # refused by RequestPress; a press that pads must say so
            raise RuntimeError(f"{press.describe()} kept different counts per head")
        kept.append(selection.indices[0])  # (kv_heads, budget), ascending
    # int32: a remembered selection costs half the memory; positions stay far below 2**31
    return torch.stack(kept).to(torch.int32)
