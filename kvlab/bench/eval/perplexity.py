"""Sliding-window perplexity, the protocol of the Hugging Face guide "Perplexity of fixed-length models".

The whole text is tokenized once (the tokenizer's default special tokens, so a BOS only at the very
start when the tokenizer adds one). Windows of at most `max_length` tokens start every `stride`
tokens; each window scores only the tokens that no earlier window scored, so each token is scored
at most once (every token but the first when stride < max_length; with stride == max_length the
windows are disjoint chunks whose first tokens go unscored), with at least `max_length - stride`
tokens of context when available:

    window k:  begin = k * stride,  end = min(begin + max_length, n)
    scores     x_t  for  max(end_{k-1}, begin + 1) <= t < end        (end_{-1} = 0)
    PPL = exp( sum_t -log p(x_t | x_begin..x_{t-1}) / number of scored tokens )

The guide's snippet weights each window's mean loss by (unmasked labels - 1), subtracting one for
the label shift. That is exact for the first window only: in later windows the label dropped by the
shift is already masked context, so the loss averaged `trg_len` tokens, not `trg_len - 1`. `ppl`
divides the summed token NLL by the true count; `guide_ppl` repeats the snippet's weighting so a
number can be compared with one printed by the guide's code (they differ by ~1/stride relative).
"""

import inspect
import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from kvlab.bench.core.datasets import Text
from kvlab.errors import ConfigError
from kvlab.models.loader import LoadedModel

# A CPU-friendly cap on the default window: cost per window grows with its length, and 1024 tokens
# of context already gives a stable estimate for small models.
DEFAULT_MAX_LENGTH = 1024


@dataclass(frozen=True, slots=True)
class Window:
    """Tokens [begin, end) go through the model; targets [score_from, end) are scored."""

    begin: int
    end: int
    score_from: int

    @property
    def num_scored(self) -> int:
        return self.end - self.score_from


@dataclass(frozen=True, slots=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    num_tokens_scored: int
    num_windows: int
    num_tokens: int  # tokens evaluated (the text's first `max_tokens`)
    num_text_tokens: int  # tokens in the whole text
    max_length: int
    stride: int
    prepends_bos: bool  # the tokenizer put one BOS before the text (never one per window)
    is_meaningful: bool  # False for random-weight models: the number measures nothing
    guide_ppl: float  # same windows, the guide snippet's (trg_len - 1) weighting; see module doc
    seconds: float
    model_name: str
    text_source: str

    @property
    def protocol(self) -> str:
        bos = "one BOS before the text" if self.prepends_bos else "no BOS prepended (tokenizer adds none)"
        return (
            f"sliding window (HF guide): max_length {self.max_length}, stride {self.stride}, "
            f"first {self.num_tokens:,} of {self.num_text_tokens:,} tokens, {self.num_windows} windows, "
            f"{self.num_tokens_scored:,} tokens scored, {bos}"
        )

    @property
    def label(self) -> str:
        """The PPL as a user should read it: flagged when the weights are random."""
        if not self.is_meaningful:
            return f"{self.ppl:.2f} (meaningless: random weights)"
        return f"{self.ppl:.2f}"


def plan_windows(num_tokens: int, max_length: int, stride: int) -> list[Window]:
    """The guide's windows over `num_tokens` tokens; the last one ends at `num_tokens`."""
    _check_lengths(num_tokens, max_length, stride)
    windows: list[Window] = []
    previous_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        # The first token of the text has no context, so it is never a target.
        windows.append(Window(begin=begin, end=end, score_from=max(previous_end, begin + 1)))
        previous_end = end
        if end == num_tokens:
            break
    return windows


def sliding_window_perplexity(
    loaded: LoadedModel,
    text: Text | str,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    show_progress: bool = True,
    tokens: tuple[torch.Tensor, bool] | None = None,
) -> PerplexityResult:
    """PPL of `loaded.model` on `text` by the guide's protocol.

    max_length: window length, default min(model context, 1024); at most the model context.
    stride: default max_length // 2. max_tokens: evaluate only the text's first tokens (None: all).
    tokens: `tokenize(loaded.tokenizer, text)` when the caller already has it (a large text's
    tokenisation takes seconds).
    """
    context_length = loaded.context_length
    max_length = min(context_length, DEFAULT_MAX_LENGTH) if max_length is None else max_length
    stride = max(1, max_length // 2) if stride is None else stride
    if max_length > context_length:
        raise ConfigError(f"max_length {max_length} exceeds the model context of {context_length} tokens")
    if max_tokens is not None and max_tokens < 2:
        raise ConfigError(f"max_tokens must be >= 2 (one context token and one target), got {max_tokens}")
    started = time.perf_counter()
    if tokens is None:
        tokens = tokenize(loaded.tokenizer, text.text if isinstance(text, Text) else text)
    input_ids, prepends_bos = tokens
    num_text_tokens = input_ids.numel()
    input_ids = input_ids[:max_tokens]
    windows = plan_windows(input_ids.numel(), max_length, stride)

    nll_sum = 0.0
    guide_nll_sum = guide_count = 0.0
    previous_end = 0
    for window in tqdm(windows, desc="perplexity", unit="window", disable=not show_progress):
        window_nll = window_nll_sum(loaded.model, input_ids, window)
        nll_sum += window_nll
        # The guide's weight: unmasked labels (end - previous end) minus one for the shift.
        guide_weight = window.end - previous_end - 1
        guide_nll_sum += window_nll / window.num_scored * guide_weight
        guide_count += guide_weight
        previous_end = window.end

    num_scored = sum(window.num_scored for window in windows)
    nll = nll_sum / num_scored
    return PerplexityResult(
        ppl=math.exp(nll),
        nll=nll,
        num_tokens_scored=num_scored,
        num_windows=len(windows),
        num_tokens=input_ids.numel(),
        num_text_tokens=num_text_tokens,
        max_length=max_length,
        stride=stride,
        prepends_bos=prepends_bos,
        is_meaningful=loaded.meaningful_ppl,
        guide_ppl=math.exp(guide_nll_sum / guide_count),
        seconds=time.perf_counter() - started,
        model_name=loaded.name,
        text_source=text.description if isinstance(text, Text) else "string",
    )


def bench_perplexity(loaded: LoadedModel, text: Text | str, ppl, tokens, show_progress: bool = True):
    """sliding_window_perplexity with a bench config's `ppl` section (max_length, stride, max_tokens)."""
    return sliding_window_perplexity(
        loaded,
        text,
        max_length=ppl.max_length,
        stride=ppl.stride,
        max_tokens=ppl.max_tokens,
        tokens=tokens,
        show_progress=show_progress,
    )


def tokenize(tokenizer, text: str) -> tuple[torch.Tensor, bool]:
    """Token ids of the whole text, shape (num_tokens,), and whether the tokenizer prepended a BOS.

    Default special tokens, as the guide does; verbose=False silences the "longer than the model's
    maximum" warning, which does not apply since the text is cut into windows.
    """
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"][0]
    bos_id = getattr(tokenizer, "bos_token_id", None)
    probe_with = tokenizer("a")["input_ids"]
    probe_without = tokenizer("a", add_special_tokens=False)["input_ids"]
    prepends_bos = bos_id is not None and len(probe_with) > len(probe_without) and probe_with[0] == bos_id
    return ids, prepends_bos


@torch.inference_mode()
def window_nll_sum(model, input_ids: torch.Tensor, window: Window) -> float:
    """Summed -log p of the window's scored targets. input_ids: (num_tokens,) on any device."""
    device = next(model.parameters()).device
    ids = input_ids[window.begin : window.end].to(device).unsqueeze(0)
    # Logits at position p predict token p + 1: the targets [score_from, end) need the logits at
    # window positions [score_from - begin - 1, end - begin - 1), i.e. the last num_scored + 1 but one.
    needed = window.num_scored + 1
    kwargs = {"logits_to_keep": needed} if _accepts_logits_to_keep(model) else {}
    logits = model(input_ids=ids, use_cache=False, **kwargs).logits[0, -needed:-1]
    targets = ids[0, window.score_from - window.begin :]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -log_probs.gather(-1, targets.unsqueeze(-1)).double().sum().item()


def _accepts_logits_to_keep(model) -> bool:
    # Skipping the LM head on context positions saves ~half its cost at stride = max_length / 2.
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _check_lengths(num_tokens: int, max_length: int, stride: int) -> None:
    if max_length < 2:
        raise ConfigError(f"max_length must be >= 2, got {max_length}")
    if not 1 <= stride <= max_length:
        raise ConfigError(f"stride must be in [1, max_length={max_length}], got {stride}")
    if num_tokens < 2:
        raise ConfigError(f"the text has {num_tokens} token(s); perplexity needs at least 2")
