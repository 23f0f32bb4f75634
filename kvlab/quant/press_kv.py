"""`QuantizedPressLayer`: a `PressCache` layer whose kept K/V rest quantized between forwards.

    cache = PressCache(get_press("snapkv"), model, max_cache_tokens=256, kv_quant="int8")

The press logic of `PressLayer` (kvlab/press/hf.py) is unchanged and runs on full-precision working
tensors: before a forward the stored rows are dequantized into the layer's buffer, the press
appends, scores, evicts and gathers as usual, and afterwards every kept slot is stored as codes and
the buffer is dropped. KV bytes are then compressed (only the press's kept tokens) *and* quantized.

Keys and values are both quantized per token (groups of channels, float16 scale and zero, as in
kvlab/quant/paged_kv.py), not keys per channel as KIVI (Liu et al. 2024, arXiv 2402.02750) does: a
press evicts single tokens, and a per-channel group spanning tokens would lose members and need
requantizing. No slot is ever quantized twice: a slot whose position was already stored keeps its
codes bit for bit (matched by position), so K/V do not drift as a ring buffer or a re-selection
moves them; only tokens new in this forward are quantized. The new tokens are attended in full
precision by the forward that produced them, quantized from the next one on. Presses that rewrite
kept keys (key re-rotation) would need requantizing every step and are refused.
"""

import torch
from torch import Tensor

from kvlab.press.hf import PressLayer
from kvlab.quant.kv_quant import KVQuantSpec
from kvlab.quant.paged_kv import decode, encode


class QuantizedPressLayer(PressLayer):
    def __init__(self, cache, layer_idx: int, spec: KVQuantSpec):
        super().__init__(cache, layer_idx)
        self.spec = spec
        # Between forwards: key/value rows (batch, kv_heads, length, row_bytes) uint8, the positions
        # they hold (batch, kv_heads, length) and the token capacity of the press's buffer.
        self.key_rows: Tensor | None = None
        self.value_rows: Tensor | None = None
        self.stored_positions: Tensor | None = None
        self.capacity = 0

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        if self.key_rows is not None:
            self.keys = self._buffer(self.key_rows, key_states)
            self.values = self._buffer(self.value_rows, value_states)
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self._store_quantized()
        self.keys = self.values = None  # the full-precision buffer lives only for this forward
        return keys, values

    def _buffer(self, rows: Tensor, like: Tensor) -> Tensor:
        batch, heads, length, _ = rows.shape
        buffer = like.new_zeros(batch, heads, self.capacity, like.shape[-1])
        buffer[:, :, :length] = decode(rows, self.spec, like.shape[-1], like.dtype)
        return buffer

    def _store_quantized(self) -> None:
        n = self.length
        positions = self.positions[..., :n]
        key_rows = encode(self.keys[:, :, :n], self.spec)
        value_rows = encode(self.values[:, :, :n], self.spec)
        if self.key_rows is not None:
            source, found = _match(self.stored_positions, positions)
            index = source[..., None].expand(-1, -1, -1, key_rows.shape[-1])
            found = found[..., None]
            key_rows = torch.where(found, self.key_rows.gather(2, index), key_rows)
            value_rows = torch.where(found, self.value_rows.gather(2, index), value_rows)
        self.key_rows, self.value_rows = key_rows, value_rows
        self.stored_positions = positions.clone()
        self.capacity = self.keys.shape[-2]

    def kv_bytes(self) -> int:
        """Exact bytes of the stored K/V rows (codes, scales and zeros)."""
        return sum(t.untyped_storage().nbytes() for t in (self.key_rows, self.value_rows) if t is not None)

    def reset(self) -> None:
        super().reset()
        self.key_rows = self.value_rows = self.stored_positions = None
        self.capacity = 0


def _match(stored: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """For each of `positions` (batch, kv_heads, n), the slot of `stored` (batch, kv_heads, m) that
    holds the same position, and whether one does (positions are distinct within a head)."""
    order = stored.argsort(dim=-1)
    ordered = stored.gather(-1, order)
    index = torch.searchsorted(ordered, positions.contiguous()).clamp_(max=stored.shape[-1] - 1)
    source = order.gather(-1, index)
    return source, stored.gather(-1, source) == positions
