"""`QuantizedCache`: a transformers `Cache` that stores K/V quantized in KIVI's layout.

    cache = QuantizedCache(model.config.num_hidden_layers, KVQuantSpec(bits=4))
    kvlab.generate(model, ids, 64, cache=cache)          # or kvlab.generate(..., kv_quant="int4")

Per layer, following KIVI (Liu et al. 2024, arXiv 2402.02750, Sec. 3.3 and Algorithm 1):
- keys per channel: a group is one channel over G consecutive tokens. Per-channel statistics need
  the tokens of a group together, so new keys wait in a full-precision residual until R of them
  have accumulated, then the whole R tokens are quantized (R / G groups per channel).
- values per token: a group is G channels of one token, so a value can be quantized on its own;
  the R most recent stay in full precision (a sliding window) and each is quantized as it leaves.
The residual window matters for quality: the newest tokens get most of the attention, and KIVI
keeps them exact.

Attention in a forward sees the stored past (dequantized) followed by the forward's own new K/V in
full precision (KIVI computes the prefill's attention before quantizing, too); from the next
forward on, everything outside the residual is read back from codes. `kv_bytes()` is the exact
size of what is held: codes, float16 scales and zeros, and the full-precision residuals.
"""

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from kvlab.errors import ConfigError
from kvlab.quant.kv_quant import KVQuantSpec, dequantize, pack, quantize, unpack


class QuantizedKVLayer(CacheLayerMixin):
    """One layer. Quantized keys: codes (batch, kv_heads, Tk, D * bits / 8), scale/zero
    (batch, kv_heads, Tk / G, D); quantized values: codes (batch, kv_heads, Tv, D * bits / 8),
    scale/zero (batch, kv_heads, Tv, D / Gc); residuals (batch, kv_heads, r, D) in the model dtype."""

    is_sliding = False
    is_croppable = False

    def __init__(self, spec: KVQuantSpec):
        super().__init__()
        self.spec = spec
        self.length = 0
        self.key_codes = self.key_scale = self.key_zero = None
        self.value_codes = self.value_scale = self.value_zero = None
        self.key_residual = self.value_residual = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.channel_group = self.spec.channel_group(head_dim)
        self.key_residual = key_states.new_empty(batch, heads, 0, head_dim)
        self.value_residual = value_states.new_empty(batch, heads, 0, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys = torch.cat((*self._stored_keys(), key_states), dim=-2)
        values = torch.cat((*self._stored_values(), value_states), dim=-2)
        self._store_keys(key_states)
        self._store_values(value_states)
        self.length += key_states.shape[-2]
        return keys, values

    def _stored_keys(self) -> list[Tensor]:
        if self.key_codes is None:
            return [self.key_residual]
        codes = unpack(self.key_codes, self.spec.bits).transpose(-1, -2)  # (B, H, D, Tk): tokens last
        scale, zero = self.key_scale.transpose(-1, -2), self.key_zero.transpose(-1, -2)
        keys = dequantize(codes, scale, zero, self.dtype).transpose(-1, -2)
        return [keys, self.key_residual]

    def _stored_values(self) -> list[Tensor]:
        if self.value_codes is None:
            return [self.value_residual]
        codes = unpack(self.value_codes, self.spec.bits)
        return [dequantize(codes, self.value_scale, self.value_zero, self.dtype), self.value_residual]

    def _store_keys(self, key_states: Tensor) -> None:
        residual = torch.cat((self.key_residual, key_states), dim=-2)
        window = self.spec.residual_length
        ready = residual.shape[-2] // window * window
        if ready:
            bits, group = self.spec.bits, self.spec.group_size
            codes, scale, zero = quantize(residual[..., :ready, :].transpose(-1, -2), bits, group)
            codes = pack(codes.transpose(-1, -2), bits)
            self.key_codes = _append(self.key_codes, codes)
            self.key_scale = _append(self.key_scale, scale.transpose(-1, -2))
            self.key_zero = _append(self.key_zero, zero.transpose(-1, -2))
            residual = residual[..., ready:, :].clone()  # its own storage: kv_bytes counts it exactly
        self.key_residual = residual

    def _store_values(self, value_states: Tensor) -> None:
        residual = torch.cat((self.value_residual, value_states), dim=-2)
        leaving = residual.shape[-2] - self.spec.residual_length
        if leaving > 0:
            codes, scale, zero = quantize(residual[..., :leaving, :], self.spec.bits, self.channel_group)
            self.value_codes = _append(self.value_codes, pack(codes, self.spec.bits))
            self.value_scale = _append(self.value_scale, scale)
            self.value_zero = _append(self.value_zero, zero)
            residual = residual[..., leaving:, :].clone()
        self.value_residual = residual

    def kv_bytes(self) -> int:
        """Exact bytes held: codes, scales, zeros and the full-precision residuals."""
        tensors = (
            self.key_codes,
            self.key_scale,
            self.key_zero,
            self.value_codes,
            self.value_scale,
            self.value_zero,
            self.key_residual,
            self.value_residual,
        )
        return sum(t.untyped_storage().nbytes() for t in tensors if t is not None)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.spec)


def _append(stored: Tensor | None, new: Tensor) -> Tensor:
    """Grow along the token dim (-2). A new tensor each time, so its storage is exactly its data;
    keys grow once per R tokens, values once per token past the window."""
    return new if stored is None else torch.cat((stored, new), dim=-2)


class QuantizedCache(Cache):
    """A transformers `Cache` of `QuantizedKVLayer`s (batches without left padding get the best
    statistics: padded positions share the key groups of real ones)."""

    def __init__(self, num_layers: int, spec: KVQuantSpec | str = "int8"):
        self.spec = KVQuantSpec.parse(spec)
        if self.spec is None:
            raise ConfigError("QuantizedCache needs a KV quantization spec (int8, int4), not 'auto'")
        super().__init__(layers=[QuantizedKVLayer(self.spec) for _ in range(num_layers)])

    def kv_bytes(self) -> int:
        return sum(layer.kv_bytes() for layer in self.layers)
