"""An explicit prefill + decode loop over any Hugging Face causal LM (in the spirit of gpt-fast).

The cache is a boundary: a KV-compression cache (any transformers `Cache`) can be passed and the
HF model runs with it. Without one, Llama and GPT-NeoX models run their engine-native twin (same
weights, no copies) over a static K/V buffer sized for the request; other architectures run the HF
model over a `PreallocatedCache` (see kvlab/forward_paths.py). A press (`press=`, with a `Budget`)
runs on the twin where it can -- compressed per layer inside the prefill, StreamingLLM as a ring
(kvlab/native_press.py) -- and through a `PressCache` on the HF modules otherwise;
`GenerationResult.path` says which ran. `kv_quant="int8" | "int4"` stores K/V quantized (KIVI's
layout, kvlab/quant/kv_cache.py; with a press, the press's kept K/V) and runs on the HF modules. Per step the loop does one forward
of the new token, samples on device, and reads the sampled token to the host (for streaming, stop
tokens and timing) -- nothing else.
"""

import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from kvlab.errors import ConfigError, PromptTooLongError
from kvlab.forward_paths import select_forward
from kvlab.press.base import Press
from kvlab.press.budget import Budget
from kvlab.quant.kv_quant import KVQuantSpec
from kvlab.sampling import SamplingConfig, sample
from kvlab.stopping import eos_ids

GREEDY = SamplingConfig()


@dataclass(slots=True)
class GenerationResult:
    """tokens: (batch, num_generated) new token ids; token_times[i]: seconds from start to token i."""

    tokens: torch.Tensor
    token_times: list[float] = field(default_factory=list)
    cache_bytes: int = 0
    path: str = "hf"  # which forward ran: "native" (engine twin) or "hf" (the HF modules)

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
    eos_token_id: int | list[int] | tuple[int, ...] | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    path: str = "auto",
    press: Press | None = None,
    budget: Budget | None = None,
    kv_quant: KVQuantSpec | str | None = None,
) -> GenerationResult:
    """Generate up to `max_new_tokens` after `input_ids` (batch, prompt_len).

    attention_mask (batch, prompt_len) marks left padding with zeros, as in `model.generate`.
    Generation stops early only when every row has produced one of `eos_token_id` (an id or a list,
    as in `generation_config`; a finished row is padded with the first). path: "auto" (native
    twin when no cache is passed and the architecture has one), "native" or "hf".
    press, budget: a KV press (`kvlab.get_press`) and its `Budget`; kvlab builds the cache (native
    where the press runs natively, else a `PressCache` inside its observation hooks); not with `cache`.
    kv_quant: "int8", "int4" or a `KVQuantSpec`: K/V stored quantized in a `QuantizedCache` (or the
    press's `PressCache`), on the HF modules ("native" refuses it); not with `cache`.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ConfigError(f"input_ids must be (batch, prompt_len>0), got shape {tuple(input_ids.shape)}")
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, numbers.Integral)
        or max_new_tokens <= 0
    ):
        raise ConfigError(f"max_new_tokens must be an integer > 0, got {max_new_tokens!r}")
    if press is not None and not isinstance(press, Press):
        raise ConfigError(f"press must be a Press (kvlab.get_press(name, ...)), got {press!r}")
    if budget is not None and not isinstance(budget, Budget):
        raise ConfigError(
            f"budget must be a Budget (max_cache_tokens= or compression_ratio=), got {budget!r}"
        )
    batch, prompt_len = input_ids.shape
    context = int(model.config.max_position_embeddings)
    total = prompt_len + max_new_tokens
    # A ring press (StreamingLLM) bounds the cache, so it may stream past the context, as through
    # a PressCache; every other request must fit the positions the model was trained on. The last
    # token sampled is never fed back, so positions 0 .. total - 2 are the ones used (as HF's
    # generate allows a prompt of the whole context and one new token).
    bounded = press is not None and press.evicts_during_decode
    if cache is None and not bounded and total - 1 > context:
        raise PromptTooLongError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context ({context})"
        )
    device = input_ids.device
    start = time.perf_counter()  # building the forward path (twin, K/V buffer) counts toward TTFT
    forward = select_forward(
        model,
        input_ids,
        max_new_tokens,
        cache=cache,
        attention_mask=attention_mask,
        path=path,
        press=press,
        budget=budget,
        kv_quant=kv_quant,
    )
    generator = sampling.make_generator(device)

    stop_ids = eos_ids(eos_token_id)
    eos = torch.tensor(stop_ids, dtype=torch.long, device=device) if stop_ids else None
    tokens = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    token_times: list[float] = []
    with forward.hooks():
        logits = forward.prefill(input_ids)
        for step in range(max_new_tokens):
            next_token = sample(logits, sampling, generator)
            if eos is not None:
                next_token = next_token.masked_fill(finished, stop_ids[0])
                finished |= torch.isin(next_token, eos)
            tokens[:, step] = next_token
            host_token = next_token.cpu()
            token_times.append(time.perf_counter() - start)
            if on_token is not None:
                on_token(host_token)
            if step + 1 == max_new_tokens or (eos is not None and bool(finished.all())):
                tokens = tokens[:, : step + 1]
                break
            logits = forward.decode(next_token)
    return GenerationResult(tokens, token_times, forward.cache_bytes, forward.name)
