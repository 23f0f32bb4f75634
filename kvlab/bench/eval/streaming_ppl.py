"""Perplexity under a compressed KV cache: streaming (token by token) and compressed-context.

Streaming protocol (StreamingLLM, Xiao et al. 2023, Sec. 4.1, Fig. 3): the text (e.g. one PG-19 book,
20k+ tokens, far past a 2,048-token context) is fed one token at a time at its true position t;
the logits after token t score token t+1, so N tokens give N-1 NLLs. The press evicts at every step,
so the cache holds at most `max_cache_tokens`. Configurations (`STREAMING_CONFIGS`):

    full           dense cache, no eviction; stops at the model's context (positions past it are untrained)
    window         recent tokens only (StreamingLLM without sinks), re-rotated
    streaming_llm  4 sinks + recent window, re-rotated (positions assigned inside the cache, Sec. 3.2)
    h2o, tova      the same budget chosen by H2O / TOVA scores, re-rotated
    recompute      the oracle: token t+1 scored from a fresh forward over the last `max_cache_tokens`
                   tokens (sliding window with re-computation, Fig. 1b); O(N * window) compute

Results keep every per-token NLL, so a caller plots cumulative PPL, exp(mean NLL of tokens <= t), vs t.

A StreamingLLM ring (streaming_llm, window) is scored a chunk at a time where the model has an
engine-native twin: the tokens each query sees depend only on its position, so a chunk's attention is
a band of the causal mask plus the sink columns, the same NLLs at C-row matmul speed
(kvlab/bench/eval/banded_ring.py; `path="native"` runs it token by token instead).

Token by token runs on `kvlab.generate`'s forward paths (kvlab/forward_paths.py): the engine-native
twin and its kernels for full, window and streaming_llm (a ring of `max_cache_tokens` slots per
layer, re-rotation by moving only the sink keys; kvlab/native_press.py), the HF modules through a
`PressCache` for h2o and tova (they score every eviction); `PPLResult.path` says which ran.

Compressed-context protocol (kvpress-style): prefill `context_len` tokens through a `PressCache`
(compressed right after prefill at `compression_ratio` or to `max_cache_tokens`), then score the
continuation in one forward over the compressed cache; the NLL covers tokens context_len..N-1.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvlab.bench.eval.banded_ring import banded_ring_logprobs, ring_layout
from kvlab.cache import PreallocatedCache, kv_cache_bytes
from kvlab.errors import ConfigError
from kvlab.forward_paths import select_forward
from kvlab.models.native import ARCHITECTURES
from kvlab.press.base import Press
from kvlab.press.budget import Budget
from kvlab.press.h2o import H2OPress
from kvlab.press.hf import PressCache
from kvlab.press.registry import PRESSES, get_press
from kvlab.press.streaming_llm import StreamingLLMPress
from kvlab.press.tova import TOVAPress
from kvlab.press.wrappers import KeyRerotationPress

FULL, RECOMPUTE = "full", "recompute"
BANDED = "banded"
STREAMING_CONFIGS: dict[str, Callable[[], Press | None]] = {
    FULL: lambda: None,
    "window": lambda: KeyRerotationPress(StreamingLLMPress(n_sink=0)),
    "streaming_llm": lambda: KeyRerotationPress(StreamingLLMPress(n_sink=4)),
    "h2o": lambda: KeyRerotationPress(H2OPress()),
    "tova": lambda: KeyRerotationPress(TOVAPress()),
    RECOMPUTE: lambda: None,
}


@dataclass(slots=True)
class PPLResult:
    """nll[i]: NLL (nats) of scored token i, in text order; kv_bytes: cache storage (streaming: at the end;
    compressed-context: right after compression)."""

    name: str
    nll: torch.Tensor
    first_scored: int  # index in the text of the token nll[0] scores
    kv_bytes: int = 0
    path: str = "hf"  # which forward ran: "native" (engine twin) or "hf" (the HF modules)

    @property
    def ppl(self) -> float:
        return math.exp(float(self.nll.mean())) if self.nll.numel() else float("nan")

    def tail(self, first: int) -> torch.Tensor:
        """NLLs of the scored tokens at text index >= first."""
        return self.nll[max(0, first - self.first_scored) :]

    def cumulative_nll(self) -> torch.Tensor:
        """Mean NLL of the first i+1 scored tokens, for i in range(len(nll))."""
        return self.nll.cumsum(0) / torch.arange(1, self.nll.numel() + 1, dtype=self.nll.dtype)

    def cumulative_ppl(self) -> torch.Tensor:
        return self.cumulative_nll().exp()


def _as_row(input_ids: torch.Tensor) -> torch.Tensor:
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 2:
        raise ConfigError(
            f"input_ids must be (num_tokens>=2,) or (1, num_tokens>=2), got {tuple(input_ids.shape)}"
        )
    return ids


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    ).double()


@torch.inference_mode()
def streaming_ppl(
    model: nn.Module,
    input_ids: torch.Tensor,
    config: str = "streaming_llm",
    *,
    max_cache_tokens: int = 1024,
    press: Press | None = None,
    max_tokens: int | None = None,
    on_step: Callable[[int], None] | None = None,
    score_from: int = 1,
    path: str = "auto",
) -> PPLResult:
    """Streaming PPL of `input_ids` (num_tokens,) under one configuration of `STREAMING_CONFIGS`.

    Any registered press name is also accepted (wrapped in `KeyRerotationPress`). `press` overrides
    the configuration's press (any press; wrap it in `KeyRerotationPress` to go past the context).
    `max_tokens` truncates the text; `on_step(t)` is called after each token (progress).
    `score_from`: the recompute oracle scores only tokens from this index on (each of its predictions
    depends on the preceding window alone, so earlier tokens need no compute); the cache-based
    configurations must feed every token anyway and score them all (see `PPLResult.tail`).
    path: "auto" (banded chunks for a StreamingLLM ring on a model with an engine-native twin, else
    native token by token where the model and press allow it), "banded", "native" or "hf".
    """
    if config not in STREAMING_CONFIGS and config not in PRESSES:
        raise ConfigError(
            f"unknown streaming configuration {config!r}; choose one of {', '.join(STREAMING_CONFIGS)} "
            f"or a press ({', '.join(PRESSES)})"
        )
    if max_cache_tokens < 2:
        raise ConfigError(f"max_cache_tokens must be >= 2, got {max_cache_tokens}")
    ids = _as_row(input_ids)[:, :max_tokens].to(model.device)
    if not 1 <= score_from < ids.shape[1]:
        raise ConfigError(f"score_from must be in [1, {ids.shape[1] - 1}], got {score_from}")
    if config == RECOMPUTE:
        return _recompute_ppl(model, ids, max_cache_tokens, on_step, score_from)
    if press is None:
        press = (
            STREAMING_CONFIGS[config]() if config in STREAMING_CONFIGS else get_press(config, rerotate=True)
        )
    if press is not None and not press.evicts_during_decode:
        raise ConfigError(
            f"{press.describe()} compresses only after prefill; streaming needs a press that evicts "
            "during decode (streaming_llm, h2o, tova) -- use compressed_context_ppl for the others"
        )
    num_tokens = ids.shape[1]
    budget = None
    if press is None:
        num_tokens = min(num_tokens, int(model.config.max_position_embeddings))
    else:
        budget = Budget(max_cache_tokens=max_cache_tokens)
    layout = ring_layout(press)
    banded_runs = layout is not None and model.config.model_type in ARCHITECTURES
    if path == BANDED and not banded_runs:
        raise ConfigError(
            "path 'banded' needs a StreamingLLM ring (streaming_llm, window) on a model with an "
            f"engine-native twin ({', '.join(ARCHITECTURES)})"
        )
    if path == BANDED or (path == "auto" and banded_runs):
        budget.layers(press, model.config.num_hidden_layers, 1)  # the ring needs budget >= n_sink + 1
        n_sink, rerotate = layout
        nll, cache_bytes = banded_ring_logprobs(
            model, ids[:, :num_tokens], max_cache_tokens, n_sink, rerotate, on_step
        )
        return PPLResult(name=config, nll=nll, first_scored=1, kv_bytes=cache_bytes, path="native-banded")
    return _token_by_token(model, ids[:, :num_tokens], config, press, budget, on_step, path)


def _token_by_token(model, ids, name, press, budget, on_step, path) -> PPLResult:
    """Feed token 0 as a one-token prefill, then every next token as a decode step at its true
    position; the logits after token t score token t + 1."""
    num_tokens = ids.shape[1]
    forward = select_forward(
        model,
        ids[:, :1],
        num_tokens - 1,
        cache=None,
        attention_mask=None,
        path=path,
        press=press,
        budget=budget,
    )
    nll = torch.empty(num_tokens - 1, dtype=torch.float64)
    with forward.hooks():
        logits = forward.prefill(ids[:, :1])
        for t in range(num_tokens - 1):
            if t:
                logits = forward.decode(ids[:, t])
            nll[t] = _nll(logits, ids[:, t + 1])[0]
            if on_step is not None:
                on_step(t)
    return PPLResult(name=name, nll=nll, first_scored=1, kv_bytes=forward.cache_bytes, path=forward.name)


def _recompute_ppl(model, ids, window: int, on_step, score_from: int = 1) -> PPLResult:
    num_tokens = ids.shape[1]
    nll = torch.empty(num_tokens - score_from, dtype=torch.float64)
    for i, t in enumerate(range(score_from - 1, num_tokens - 1)):
        start = max(0, t + 1 - window)
        logits = model(input_ids=ids[:, start : t + 1], use_cache=False, logits_to_keep=1).logits[:, -1]
        nll[i] = _nll(logits, ids[:, t + 1])[0]
        if on_step is not None:
            on_step(t)
    return PPLResult(name=RECOMPUTE, nll=nll, first_scored=score_from)


@torch.inference_mode()
def compressed_context_ppl(
    model: nn.Module,
    input_ids: torch.Tensor,
    press: Press | None,
    *,
    context_len: int,
    compression_ratio: float | None = None,
    max_cache_tokens: int | None = None,
    name: str = "",
) -> PPLResult:
    """PPL of input_ids[context_len:] after the first `context_len` tokens are prefilled and compressed.

    press=None is the uncompressed baseline. The whole text must fit the model's context.
    """
    ids = _as_row(input_ids).to(model.device)
    num_tokens = ids.shape[1]
    if not 0 < context_len < num_tokens:
        raise ConfigError(f"context_len must be in [1, {num_tokens - 1}], got {context_len}")
    if num_tokens > int(model.config.max_position_embeddings):
        raise ConfigError(
            f"{num_tokens} tokens exceed the model's context ({model.config.max_position_embeddings})"
        )
    if press is None:
        cache = PreallocatedCache(model.config.num_hidden_layers, num_tokens)
        return _score_after_context(model, ids, context_len, cache, name or FULL)
    cache = PressCache(press, model, max_cache_tokens=max_cache_tokens, compression_ratio=compression_ratio)
    with cache.hooks(model):
        return _score_after_context(model, ids, context_len, cache, name or press.describe())


def _score_after_context(model, ids, context_len, cache, name) -> PPLResult:
    positions = torch.arange(ids.shape[1], device=ids.device)[None]
    first = model(
        input_ids=ids[:, :context_len],
        position_ids=positions[:, :context_len],
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1:]
    kv_bytes = kv_cache_bytes(cache)  # after compression, before the continuation grows the cache
    logits = [first]
    if ids.shape[1] - 1 > context_len:
        rest = model(
            input_ids=ids[:, context_len:-1],
            position_ids=positions[:, context_len:-1],
            cache=cache,
            use_cache=True,
        ).logits
        logits.append(rest)
    nll = _nll(torch.cat(logits, dim=1), ids[:, context_len:])
    return PPLResult(name=name, nll=nll, first_scored=context_len, kv_bytes=kv_bytes)
