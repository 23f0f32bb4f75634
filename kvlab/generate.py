"""An explicit prefill + decode loop over any Hugging Face causal LM (in the spirit of gpt-fast).

The cache is a boundary: by default a `PreallocatedCache` sized for the request; a KV-compression
cache (any transformers `Cache`) can be passed instead. Per step the loop does one forward of the
new token with `logits_to_keep=1`, samples on device, and reads the sampled token to the host
(for streaming, stop tokens and timing) -- nothing else.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from kvlab.cache import PreallocatedCache, kv_cache_bytes
from kvlab.errors import ConfigError, PromptTooLongError
from kvlab.sampling import SamplingConfig, sample

GREEDY = SamplingConfig()


@dataclass(slots=True)
class GenerationResult:
    """tokens: (batch, num_generated) new token ids; token_times[i]: seconds from start to token i."""

    tokens: torch.Tensor
    token_times: list[float] = field(default_factory=list)
    cache_bytes: int = 0

    @property
    def ttft(self) -> float:
        return self.token_times[0]

    @property
    def tpot(self) -> float:
        """Mean seconds per output token after the first."""
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else float("nan")


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    sampling: SamplingConfig = GREEDY,
    cache: Cache | None = None,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> GenerationResult:
    """Generate up to `max_new_tokens` after `input_ids` (batch, prompt_len).

    attention_mask (batch, prompt_len) marks left padding with zeros, as in `model.generate`.
    Generation stops early only when every row has produced `eos_token_id`.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ConfigError(f"input_ids must be (batch, prompt_len>0), got shape {tuple(input_ids.shape)}")
    if max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    batch, prompt_len = input_ids.shape
    context = int(model.config.max_position_embeddings)
    total = prompt_len + max_new_tokens
    if cache is None and total > context:
        raise PromptTooLongError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context ({context})"
        )
    device = input_ids.device
    if cache is None:
        # The last sampled token is never fed back, so the cache holds total - 1 positions.
        cache = PreallocatedCache(model.config.num_hidden_layers, total - 1)
    generator = sampling.make_generator(device)

    # Positions follow model.generate: count only real (unpadded) tokens.
    mask = None
    if attention_mask is not None:
        mask = torch.ones(batch, total, dtype=attention_mask.dtype, device=device)
        mask[:, :prompt_len] = attention_mask
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    else:
        positions = torch.arange(prompt_len, device=device).expand(batch, -1)

    tokens = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    token_times: list[float] = []
    start = time.perf_counter()
    logits = model(
        input_ids=input_ids,
        attention_mask=None if mask is None else mask[:, :prompt_len],
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]
    position = positions[:, -1:] + 1
    for step in range(max_new_tokens):
        next_token = sample(logits, sampling, generator)
        if eos_token_id is not None:
            next_token = next_token.masked_fill(finished, eos_token_id)
            finished |= next_token == eos_token_id
        tokens[:, step] = next_token
        host_token = next_token.cpu()
        token_times.append(time.perf_counter() - start)
        if on_token is not None:
            on_token(host_token)
        if step + 1 == max_new_tokens or (eos_token_id is not None and bool(finished.all())):
            tokens = tokens[:, : step + 1]
            break
        logits = model(
            input_ids=next_token[:, None],
            attention_mask=None if mask is None else mask[:, : prompt_len + step + 1],
            position_ids=position,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        position = position + 1
    return GenerationResult(tokens=tokens, token_times=token_times, cache_bytes=kv_cache_bytes(cache))
