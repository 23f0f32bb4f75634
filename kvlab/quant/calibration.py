"""Calibration data for GPTQ and AWQ, and the layer-by-layer pass that feeds them.

Samples are random windows of WikiText-2's *validation* split, never its test split, so the test
perplexity a quantized model reports is not measured on text its quantizer has seen.

Both methods need, for every linear layer of a decoder layer, statistics of that layer's inputs: GPTQ
the Hessian of the layer-wise loss, H = 2 X X^T (Frantar et al. 2022, eq. 1-2), AWQ the mean magnitude
of each input channel and the Gram matrix that turns an output error into a closed form (Lin et al.
2023, eq. 4-5). `layer_by_layer` runs the decoder one layer at a time, as in the GPTQ paper's
sequential scheme (section 4, "Full algorithm"): the inputs of layer i + 1 are the outputs of layer
i *after* the caller quantized it, so each layer's quantizer sees, and compensates for, the errors of
the layers before it.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import Tensor, nn

from kvlab.bench.core.datasets import load_text
from kvlab.errors import ConfigError

CALIBRATION_DATASET = ("wikitext2", "validation")


def calibration_samples(tokenizer, num_samples: int, seq_len: int = 512, seed: int = 0) -> Tensor:
    """`num_samples` windows of `seq_len` tokens, LongTensor (num_samples, seq_len), each starting at
    a random position of the tokenised validation text (a seeded generator: reproducible)."""
    tokens = validation_tokens(tokenizer)
    if num_samples < 1 or seq_len < 2:
        raise ConfigError(f"need at least one sample of >= 2 tokens, got {num_samples} x {seq_len}")
    if seq_len > tokens.numel():
        raise ConfigError(f"seq_len {seq_len} exceeds the {tokens.numel()} calibration tokens")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (num_samples,), generator=generator)
    return torch.stack([tokens[start : start + seq_len] for start in starts.tolist()])


@lru_cache(maxsize=2)
def validation_tokens(tokenizer) -> Tensor:
    """The whole WikiText-2 validation text as token ids (no special tokens: windows are cut from
    the middle of the text, where a BOS would not occur)."""
    text = load_text(*CALIBRATION_DATASET).text
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


@dataclass(slots=True)
class InputStats:
    """Running statistics of one linear layer's inputs x (rows of K features):
    gram = sum x x^T (float64), abs_sum = sum |x| per channel, count = rows seen."""

    gram: Tensor
    abs_sum: Tensor
    count: int = 0

    @classmethod
    def empty(cls, features: int) -> "InputStats":
        return cls(
            torch.zeros(features, features, dtype=torch.float64), torch.zeros(features, dtype=torch.float64)
        )

    def add(self, x: Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        self.gram += (rows.T @ rows).double()
        self.abs_sum += rows.abs().sum(dim=0).double()
        self.count += rows.shape[0]

    @property
    def hessian(self) -> Tensor:
        """GPTQ's H = 2 X X^T / rows (the mean keeps its scale independent of the sample count)."""
        return 2 * self.gram / max(self.count, 1)

    @property
    def mean_abs(self) -> Tensor:
        """AWQ's activation magnitude s_x per input channel."""
        return self.abs_sum / max(self.count, 1)


@dataclass(slots=True)
class LayerInputs:
    """The calibration inputs of one decoder layer: hidden states per batch, plus the keyword
    arguments the model passed to its layers (rotary embeddings, mask, positions) for that batch."""

    hidden: list[Tensor]
    kwargs: list[dict] = field(default_factory=list)

    def run(self, layer: nn.Module) -> list[Tensor]:
        """The layer's outputs, batch by batch."""
        with torch.no_grad():
            return [_hidden_of(layer(h, **kw)) for h, kw in zip(self.hidden, self.kwargs, strict=True)]

    def linear_stats(self, layer: nn.Module) -> dict[str, InputStats]:
        """Run the layer once with a forward hook on each nn.Linear inside it: InputStats by the
        linear's name relative to the layer."""
        linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        stats = {name: InputStats.empty(m.in_features) for name, m in linears.items()}
        handles = [
            module.register_forward_hook(lambda _m, args, _out, name=name: stats[name].add(args[0]))
            for name, module in linears.items()
        ]
        try:
            self.run(layer)
        finally:
            for handle in handles:
                handle.remove()
        return stats


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: the ModuleList with num_hidden_layers entries."""
    count = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ConfigError(f"cannot find the {count} decoder layers of {type(model).__name__}")


def layer_by_layer(
    model: nn.Module, samples: Tensor, batch_size: int = 8
) -> Iterator[tuple[int, nn.Module, LayerInputs]]:
    """Yield (index, layer, its calibration inputs) for each decoder layer in order. The caller
    quantizes the layer in place before asking for the next one; the next layer's inputs are then
    computed by the layer as the caller left it (GPTQ's sequential scheme)."""
    layers = decoder_layers(model)
    inputs = first_layer_inputs(model, samples, layers[0], batch_size)
    for index, layer in enumerate(layers):
        yield index, layer, inputs
        inputs = LayerInputs(inputs.run(layer), inputs.kwargs)


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the first decoder layer needs to run."""


def first_layer_inputs(model: nn.Module, samples: Tensor, first: nn.Module, batch_size: int) -> LayerInputs:
    """Run the model up to its first decoder layer on each batch of samples and keep what that layer
    receives (a pre-hook with kwargs, so model-specific arguments are passed on untouched)."""
    inputs = LayerInputs(hidden=[], kwargs=[])

    def capture(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.hidden.append(hidden.detach())
        inputs.kwargs.append(dict(kwargs))
        raise _StopForward

    handle = first.register_forward_pre_hook(capture, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in samples.split(batch_size):
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return inputs


def _hidden_of(output) -> Tensor:
    # Llama's layers return the hidden states; some architectures return a tuple led by them.
    return output[0] if isinstance(output, tuple) else output
