"""A press on the native path: budget-sized static K/V buffers, compressed inside the prefill forward.

`NativePressCache` is the cache `NativeForward` (kvlab/forward_paths.py) runs when `kvlab.generate`
gets a press the native path supports (`native_press_support`):

- Prefill-time presses (snapkv, pyramidkv, knorm, random): the prefill forward runs with
  `CompressingPrefill` as its attention backend. Each layer writes its K/V into a one-layer scratch
  buffer, attends over all of them (as `PressCache` does: the eviction applies after the forward),
  then asks the press which slots to keep -- with the `Observations` the engine and `PressCache`
  build for a prompt: true positions 0..n-1, all n tokens new, the layer's post-RoPE queries -- and
  copies the kept K/V into the layer's own buffer of `budget + max_new - 1` slots. The scratch is
  reused by every layer, so the full cache never exists: the peak holds one layer's full K/V on top
  of the compressed cache. Layers with different budgets (PyramidKV) get buffers of their own size.
- Presses that evict by position (StreamingLLM): the same compaction after prefill, then a ring of
  `budget` slots per layer: once a row holds its budget, each decode token overwrites the slot
  `press.ring_slot` names (the oldest window token), as `PressCache` does.

Slot != position: a kept token keeps its true RoPE position, and the next token's position is the
prompt length, whatever slot it lands in. `KeyRerotationPress` (positions inside the cache,
StreamingLLM, Xiao et al. 2023, Sec. 3.2) is supported around these presses. Around a prefill-time
press, kept keys are re-rotated once after compression, in their order, to the k positions that end
at the newest kept one (per head).
On the ring, the window is contiguous in true positions and ends at the newest token, so re-rotated
positions equal the true ones for every window key; only the `n_sink` sink keys move: sink i sits at
newest - (budget - 1) + i. So their keys as first computed (at true position i) are kept aside and
rotated by newest - (budget - 1) before each step's attention -- one exact rotation, never an
accumulation of per-step ones.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from kvlab.attention.backends.base import AttentionBackend
from kvlab.attention.metadata import AttentionMetadata
from kvlab.errors import ConfigError
from kvlab.press.base import Observations, Press
from kvlab.press.budget import Budget
from kvlab.press.streaming_llm import StreamingLLMPress
from kvlab.press.wrappers import KeyRerotationPress, Wrapper
from kvlab.rope import delta_tables, rotate_by_


def native_press_support(press: Press) -> str | None:
    """None when the native path runs `press`; otherwise why not (the HF path, `PressCache`, runs it)."""
    inner = press.press if isinstance(press, KeyRerotationPress) else press
    name = press.describe()
    if isinstance(inner, Wrapper) or type(inner).reposition is not Press.reposition:
        return f"{name}: the native path runs plain presses, optionally under key re-rotation"
    if inner.evicts_during_decode and not inner.evicts_by_position:
        return f"{name} picks each decode eviction from attention scores (the native path runs rings)"
    if inner is not press and inner.evicts_by_position and not isinstance(inner, StreamingLLMPress):
        return f"{name}: re-rotation on a ring assumes StreamingLLM's layout (sinks + recent window)"
    return None


@dataclass(slots=True)
class LayerGroup:
    """Layers that keep the same number of slots in every row: one buffer pair, one metadata per step."""

    keys: Tensor  # (layers in the group, batch, capacity, kv_heads, head_dim)
    values: Tensor
    index: dict[int, int]  # model layer -> its index in the group
    budgets: list[int]  # per row: slots the press keeps (the ring's size)
    counts: list[int]  # per row: slots filled
    evicted: list[int]  # per row: ring overwrites since the compaction (`Press.ring_slot`)

    @property
    def nbytes(self) -> int:
        return self.keys.untyped_storage().nbytes() + self.values.untyped_storage().nbytes()

    def layer_kv(self, layer: int) -> tuple[Tensor, Tensor]:
        return self.keys[self.index[layer]], self.values[self.index[layer]]

    def step(
        self, press: Press, is_ring: bool, query_start_loc: Tensor, block_tables: Tensor
    ) -> AttentionMetadata:
        """Decode metadata for one new token per row: append, or overwrite a full ring's slot."""
        capacity = self.keys.shape[2]
        slots = []
        for row, (count, budget) in enumerate(zip(self.counts, self.budgets, strict=True)):
            if is_ring and count >= budget:
                slots.append(row * capacity + press.ring_slot(self.evicted[row], budget))
                self.evicted[row] += 1
            else:
                slots.append(row * capacity + count)
                self.counts[row] = count + 1
        device = self.keys.device
        return AttentionMetadata(
            query_start_loc=query_start_loc,
            seq_lens=torch.tensor(self.counts, dtype=torch.int32, device=device),
            block_tables=block_tables,
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            max_query_len=1,
            max_seq_len=max(self.counts),
            block_size=capacity,
        )


def plan_groups(
    engine_model, budgets: list[tuple[int, ...]], lengths: list[int], max_new: int, is_ring: bool
) -> tuple[list[LayerGroup], list[int]]:
    """Group layers by their per-row budgets and allocate each group's buffers at the size it can
    ever fill: a ring holds at most its budget; a prefill-time press min(n, budget) + max_new - 1
    (the last sampled token is never fed back). -> (groups, group index of each layer)."""
    layers_of: dict[tuple[int, ...], list[int]] = {}
    for layer in range(engine_model.num_layers):
        layers_of.setdefault(tuple(row[layer] for row in budgets), []).append(layer)
    groups, group_of = [], [0] * engine_model.num_layers
    for row_budgets, layers in layers_of.items():
        if is_ring:
            capacity = max(min(n + max_new - 1, b) for n, b in zip(lengths, row_budgets, strict=True))
        else:
            capacity = max(min(n, b) + max_new - 1 for n, b in zip(lengths, row_budgets, strict=True))
        shape = (len(layers), len(lengths), capacity, engine_model.num_kv_heads, engine_model.head_dim)
        options = dict(dtype=engine_model.dtype, device=engine_model.device)
        for layer in layers:
            group_of[layer] = len(groups)
        groups.append(
            LayerGroup(
                keys=torch.zeros(shape, **options),
                values=torch.zeros(shape, **options),
                index={layer: i for i, layer in enumerate(layers)},
                budgets=list(row_budgets),
                counts=[0] * len(lengths),
                evicted=[0] * len(lengths),
            )
        )
    return groups, group_of


class NativePressCache:
    """Per-layer K/V buffers for one batch of rows under `press` and `budget`.

    lengths: real prompt tokens per row; max_new: tokens to generate (the last is never fed back).
    kv_caches: per layer (keys, values), each (batch, capacity, kv_heads, head_dim) -- row r is
    "block" r, so the engine's attention backends and kernels read it unchanged.
    """

    def __init__(self, engine_model, press: Press, budget: Budget, lengths: list[int], max_new: int):
        reason = native_press_support(press)
        if reason is not None:
            raise ConfigError(reason)
        self.press, self.lengths = press, lengths
        self.inner = press.press if isinstance(press, KeyRerotationPress) else press
        self.is_ring = self.inner.evicts_by_position
        self.rerotate = isinstance(press, KeyRerotationPress)
        self.n_sink = getattr(self.inner, "n_sink", 0) if self.is_ring and self.rerotate else 0
        self.device, self.scale = engine_model.device, engine_model.scale
        self.rotary = engine_model.rotary.spec
        num_layers = engine_model.num_layers
        # budgets[r][layer]: the Budget object resolves them exactly as PressCache and the engine do.
        budgets = [budget.layers(press, num_layers, n) for n in lengths]
        self.groups, self.group_of = plan_groups(engine_model, budgets, lengths, max_new, self.is_ring)
        self.kv_caches = [self.groups[g].layer_kv(layer) for layer, g in enumerate(self.group_of)]
        self.layer_of = {key.data_ptr(): layer for layer, (key, _) in enumerate(self.kv_caches)}
        self.kept_positions: list[list[Tensor]] = [
            [] for _ in range(num_layers)
        ]  # [layer][row] (kv_heads, k)
        self.sink_keys: dict[int, Tensor] = {}  # row -> its sinks' keys at their true positions, float32
        batch = len(lengths)
        self.query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=self.device)
        self.block_tables = torch.arange(batch, dtype=torch.int32, device=self.device)[:, None]

    @property
    def cache_bytes(self) -> int:
        return sum(group.nbytes for group in self.groups)

    # -- prefill ---------------------------------------------------------------------------------

    def prefill(self, inner: AttentionBackend) -> tuple[AttentionMetadata, AttentionBackend]:
        """Metadata over a one-layer scratch buffer and the backend that compresses into kv_caches."""
        max_len = max(self.lengths)
        batch = len(self.lengths)
        key = self.kv_caches[0][0]
        shape = (batch, max_len, *key.shape[2:])
        scratch = (key.new_empty(shape), key.new_empty(shape))
        metadata = AttentionMetadata.from_lists(
            self.lengths, self.lengths, [[row] for row in range(batch)], max_len, self.device
        )
        return metadata, CompressingPrefill(inner, self, scratch)

    def compress_layer(self, layer: int, query: Tensor, scratch: tuple[Tensor, Tensor]) -> None:
        """Keep each row's chosen K/V of `layer` from the scratch buffer; query (T, heads, D) post-RoPE."""
        group = self.groups[self.group_of[layer]]
        dest_k, dest_v = self.kv_caches[layer]
        start = 0
        for row, n in enumerate(self.lengths):
            keys, values = scratch[0][row, :n], scratch[1][row, :n]  # (n, kv_heads, D)
            budget = group.budgets[row]
            kv_heads = keys.shape[1]
            if n <= budget:
                dest_k[row, :n], dest_v[row, :n] = keys, values
                kept = torch.arange(n, device=self.device).expand(kv_heads, n)
            else:
                kept = self._select(layer, keys, values, query[start : start + n], budget)
                index = kept.T[..., None].expand(-1, -1, keys.shape[-1])  # (k, kv_heads, D)
                dest_k[row, :budget] = keys.gather(0, index)
                dest_v[row, :budget] = values.gather(0, index)
                if self.rerotate and not self.is_ring:
                    # Positions inside the cache (`KeyRerotationPress`): the i-th kept token moves to
                    # p_max - (k - 1) + i, p_max the newest kept position of its head.
                    target = kept[:, -1:] - (budget - 1) + torch.arange(budget, device=self.device)
                    cos, sin = delta_tables((target - kept).T, self.rotary)  # (k, kv_heads, rot/2)
                    rotate_by_(dest_k[row, :budget], dest_k[row, :budget], cos, sin, self.rotary.rotary_dim)
            group.counts[row] = kept.shape[1]
            self.kept_positions[layer].append(kept)
            start += n

    def _select(self, layer: int, keys: Tensor, values: Tensor, query: Tensor, budget: int) -> Tensor:
        """(kv_heads, budget) kept slots, ascending (= position order: slot i holds position i here)."""
        n, kv_heads = keys.shape[:2]
        obs = Observations(
            positions=torch.arange(n, device=self.device).expand(1, kv_heads, n),
            num_new=n,
            queries=query.transpose(0, 1)[None] if self.press.needs_queries else None,
            scaling=self.scale,
            rotary=self.rotary,
        )
        selection = self.press.keep(
            layer, keys.transpose(0, 1)[None], values.transpose(0, 1)[None], obs, budget
        )
        if selection.valid is not None:
            raise ConfigError(
                f"{self.press.describe()} keeps different counts per head; the native path needs one"
            )
        return selection.indices[0]

    # -- decode ----------------------------------------------------------------------------------

    def decode(
        self, positions: list[int], inner: AttentionBackend
    ) -> tuple[AttentionMetadata, AttentionBackend]:
        """Assign this step's slot per row and layer group; positions: each row's new token's true position."""
        metadata = [
            group.step(self.press, self.is_ring, self.query_start_loc, self.block_tables)
            for group in self.groups
        ]
        if self.n_sink:
            self._rerotate_sinks(positions)
        if len(self.groups) == 1:
            return metadata[0], inner
        return metadata[0], PerLayerMetadata(inner, self.layer_of, self.group_of, metadata)

    def _rerotate_sinks(self, positions: list[int]) -> None:
        """Sink i of a full ring row attends at position newest - (count - 1) + i (see the module doc)."""
        group = self.groups[0]  # a ring press gives every layer the same budget: one group
        for row, position in enumerate(positions):
            delta = position - (group.counts[row] - 1)
            if delta <= 0:
                continue  # never compressed and not yet full: positions are still 0..newest
            sinks = group.keys[:, row, : self.n_sink]  # (layers, n_sink, kv_heads, D), a view
            if row not in self.sink_keys:
                self.sink_keys[row] = sinks.float().clone()  # still at their true positions 0..n_sink-1
            cos, sin = delta_tables(torch.tensor(float(delta), device=self.device), self.rotary)
            rotate_by_(sinks, self.sink_keys[row], cos, sin, self.rotary.rotary_dim)


class CompressingPrefill(AttentionBackend):
    """Prefill attention over a one-layer scratch buffer; after each layer's attention, the press
    keeps that layer's chosen K/V in its own buffer (`NativePressCache.compress_layer`)."""

    def __init__(self, inner: AttentionBackend, cache: NativePressCache, scratch: tuple[Tensor, Tensor]):
        self.inner, self.cache, self.scratch = inner, cache, scratch
        self.name = inner.name

    def write_kv(
        self, key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor, slot_mapping: Tensor
    ) -> None:
        self.inner.write_kv(key, value, self.scratch[0], self.scratch[1], slot_mapping)

    def forward(
        self, query: Tensor, key_cache: Tensor, value_cache: Tensor, metadata: AttentionMetadata, scale: float
    ) -> Tensor:
        output = self.inner.forward(query, self.scratch[0], self.scratch[1], metadata, scale)
        self.cache.compress_layer(self.cache.layer_of[key_cache.data_ptr()], query, self.scratch)
        return output


class PerLayerMetadata(AttentionBackend):
    """Decode attention where layers hold different numbers of slots (PyramidKV): each layer reads
    the metadata of its group instead of the one the model passes to every layer."""

    per_layer_metadata = True

    def __init__(
        self,
        inner: AttentionBackend,
        layer_of: dict[int, int],
        group_of: list[int],
        metadata: list[AttentionMetadata],
    ):
        self.inner, self.layer_of, self.group_of, self.metadata = inner, layer_of, group_of, metadata
        self.name = inner.name
        self.fused_cpu_decode = inner.fused_cpu_decode

    def layer_metadata(
        self, key_cache: Tensor, metadata: AttentionMetadata | None = None
    ) -> AttentionMetadata:
        return self.metadata[self.group_of[self.layer_of[key_cache.data_ptr()]]]

    def write_kv(
        self, key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor, slot_mapping: Tensor
    ) -> None:
        self.inner.write_kv(key, value, key_cache, value_cache, self.layer_metadata(key_cache).slot_mapping)

    def forward(
        self, query: Tensor, key_cache: Tensor, value_cache: Tensor, metadata: AttentionMetadata, scale: float
    ) -> Tensor:
        return self.inner.forward(query, key_cache, value_cache, self.layer_metadata(key_cache), scale)
