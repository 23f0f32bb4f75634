"""KV caches that plug into any Hugging Face causal LM through transformers' public `Cache` API.

`PreallocatedCache` is the static cache of `kvlab.generate`: each layer owns one buffer sized for
the whole request (prompt + output), written in place, and attention sees a view of the filled
part. Unlike transformers' `StaticCache`, attention never runs over the unfilled tail, and unlike
`DynamicCache` no step concatenates (a full copy of the cache per layer per token).
"""

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class PreallocatedLayer(CacheLayerMixin):
    """One layer's K/V: keys, values (batch, kv_heads, max_tokens, head_dim), first `length` slots filled."""

    is_sliding = False
    is_croppable = True

    def __init__(self, max_tokens: int):
        super().__init__()
        self.max_tokens = max_tokens
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        self.device = key_states.device
        self.keys = key_states.new_empty(batch, heads, self.max_tokens, head_dim)
        self.values = value_states.new_empty(batch, heads, self.max_tokens, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self.max_tokens:
            raise RuntimeError(f"cache full: {end} tokens > preallocated {self.max_tokens}")
        self.keys[:, :, start:end] = key_states
        self.values[:, :, start:end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_tokens

    def reset(self) -> None:
        self.length = 0

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` tokens, as Hugging Face's `crop(max_length)`: a negative value
        removes that many from the end (what transformers 5 passes, e.g. to undo speculative tokens),
        0 leaves the layer as it is (transformers 5's `crop(0)` only trims sliding windows), and a
        length at or past the filled part changes nothing. The buffer keeps its size; the slots past
        `length` are overwritten by the next update."""
        if max_length < 0:
            max_length = max(0, self.length + max_length)
        elif max_length == 0:
            return
        self.length = min(self.length, max_length)


class PreallocatedCache(Cache):
    def __init__(self, num_layers: int, max_tokens: int):
        super().__init__(layers=[PreallocatedLayer(max_tokens) for _ in range(num_layers)])


def kv_cache_bytes(cache: Cache) -> int:
    """Exact bytes held by a cache's K/V storage (allocated buffers, not just the filled part); a
    layer that stores K/V in its own format (a quantized one) reports them through `kv_bytes()`."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "kv_bytes"):
            total += layer.kv_bytes()
            continue
        for tensor in (layer.keys, layer.values):
            if isinstance(tensor, torch.Tensor):
                total += tensor.untyped_storage().nbytes()
    return total
