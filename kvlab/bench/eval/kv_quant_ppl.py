"""Perplexity with a quantized KV cache: the text is fed in chunks so later chunks read quantized K/V.

A single forward over a whole window never reads the cache (every token attends to the forward's own
K/V), so it cannot show what KV quantization costs. Here each window of `window` tokens starts from
an empty cache and goes through the model `chunk` tokens at a time; chunk k attends to the K/V of
chunks 0..k-1 as the cache stores them (quantized outside KIVI's residual window) and to its own in
full precision, as decoding with a prefill of `chunk` tokens would. Windows are disjoint; every
token of a window but the first is scored. `kv_quant=None` runs the same chunking over a
full-precision `PreallocatedCache`, the reference to compare against.

Bytes are measured on the cache of the first full window, right after its last chunk: the exact
storage held (codes, float16 scales and zeros, the residual), against the float32 bytes of the same
`window` tokens (2 * layers * kv_heads * head_dim * 4 per token).
"""

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from kvlab.cache import PreallocatedCache, kv_cache_bytes
from kvlab.errors import ConfigError
from kvlab.quant.kv_cache import QuantizedCache
from kvlab.quant.kv_quant import KVQuantSpec


@dataclass(frozen=True, slots=True)
class ChunkedPPLResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token, nats
    num_tokens_scored: int
    num_windows: int
    window: int
    chunk: int
    kv: str  # "float32" or the spec's description
    kv_bytes: int  # held after a full window
    float32_kv_bytes: int  # the same window's K/V in float32
    seconds: float

    @property
    def byte_ratio(self) -> float:
        return self.kv_bytes / self.float32_kv_bytes


@torch.inference_mode()
def chunked_cache_ppl(
    model,
    input_ids: Tensor,
    *,
    kv_quant: KVQuantSpec | str | None = None,
    window: int = 1024,
    chunk: int = 64,
    max_windows: int | None = None,
) -> ChunkedPPLResult:
    """PPL of `model` (an HF causal LM) over `input_ids` (num_tokens,) in disjoint windows.

    kv_quant: a `KVQuantSpec`, "int8" / "int4", or None for the full-precision reference.
    max_windows: evaluate only the first windows (None: every full window of the text).
    """
    spec = KVQuantSpec.parse(kv_quant)
    config = model.config
    if window < 2 or chunk < 1 or window > config.max_position_embeddings:
        raise ConfigError(f"need 2 <= window <= the model context and chunk >= 1, got {window}, {chunk}")
    num_windows = input_ids.numel() // window
    if max_windows is not None:
        num_windows = min(num_windows, max_windows)
    if num_windows < 1:
        raise ConfigError(f"the text has {input_ids.numel()} tokens, fewer than one window of {window}")
    device = next(model.parameters()).device
    num_layers = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    num_kv_heads = config.num_key_value_heads or config.num_attention_heads
    started = time.perf_counter()
    nll_sum, scored, held = 0.0, 0, 0
    for index in range(num_windows):
        ids = input_ids[index * window : (index + 1) * window].to(device)[None]
        cache = PreallocatedCache(num_layers, window) if spec is None else QuantizedCache(num_layers, spec)
        for start in range(0, window, chunk):
            end = min(start + chunk, window)
            logits = model(
                input_ids=ids[:, start:end],
                position_ids=torch.arange(start, end, device=device)[None],
                cache=cache,
                use_cache=True,
            ).logits[0]
            targets = ids[0, start + 1 : end + 1]  # the window's last logit has no target
            log_probs = torch.log_softmax(logits[: targets.numel()].float(), dim=-1)
            nll_sum -= log_probs.gather(-1, targets[:, None]).double().sum().item()
            scored += targets.numel()
        if index == 0:
            held = kv_cache_bytes(cache)
    nll = nll_sum / scored
    return ChunkedPPLResult(
        ppl=math.exp(nll),
        nll=nll,
        num_tokens_scored=scored,
        num_windows=num_windows,
        window=window,
        chunk=chunk,
        kv="float32" if spec is None else spec.describe(),
        kv_bytes=held,
        float32_kv_bytes=2 * num_layers * num_kv_heads * head_dim * window * 4,
        seconds=time.perf_counter() - started,
    )
