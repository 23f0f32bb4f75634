"""The module swap: nn.Linear / nn.Embedding -> modules that hold a QuantizedWeight.

As in gpt-fast's quantize.py: quantizers are pure functions of a weight; this file only walks the
model and replaces modules, so HF's forward, `model.generate()`, kvlab.generate and the engine's
native twin all run the quantized weights. A tied LM head stays tied: head and embedding share one
QuantizedWeight. The codes, scales and offsets are buffers, so `state_dict()` holds them.
"""

from collections.abc import Callable

import torch
from torch import Tensor, nn

from kvlab.errors import ConfigError
from kvlab.models import huge_pages
from kvlab.quant.formats import QuantizedWeight, QuantSpec
from kvlab.quant.linear import quantized_embedding, quantized_linear
from kvlab.quant.rtn import quantize_weight


class _QuantizedModule(nn.Module):
    """Holds the parts of a QuantizedWeight as buffers and rebuilds it after .to()."""

    def _hold(self, qweight: QuantizedWeight) -> None:
        self.register_buffer("qdata", qweight.data)
        self.register_buffer("scales", qweight.scales)
        self.register_buffer("offsets", qweight.offsets)
        self.bits, self.group_size, self.in_features_ = qweight.bits, qweight.group_size, qweight.in_features
        self._qweight = qweight

    def _apply(self, fn, recurse=True):
        """`.to(dtype)` must not cast the float16 scales and offsets with the model's float weights."""
        super()._apply(fn, recurse)
        for name in ("scales", "offsets"):
            tensor = getattr(self, name)
            if tensor is not None and tensor.dtype != torch.float16:
                setattr(self, name, tensor.to(torch.float16))
        return self

    @property
    def qweight(self) -> QuantizedWeight:
        if self._qweight.data is not self.qdata or self._qweight.scales is not self.scales:
            # moved or reloaded: rebuild from the buffers
            self._qweight = QuantizedWeight(
                self.qdata, self.scales, self.offsets, self.bits, self.group_size, self.in_features_
            )
        return self._qweight


class QuantizedLinear(_QuantizedModule):
    def __init__(self, qweight: QuantizedWeight, bias: Tensor | None = None):
        super().__init__()
        self._hold(qweight)
        self.in_features, self.out_features = qweight.in_features, qweight.out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return quantized_linear(x, self.qweight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}"


class QuantizedEmbedding(_QuantizedModule):
    def __init__(self, qweight: QuantizedWeight, dtype: torch.dtype):
        super().__init__()
        self._hold(qweight)
        self.num_embeddings, self.embedding_dim, self.dtype = qweight.out_features, qweight.in_features, dtype

    def _apply(self, fn, recurse=True):
        """The rows come out in the dtype the model was moved to (`.to(torch.bfloat16)`), as an
        nn.Embedding's would: every layer after it computes in that dtype."""
        super()._apply(fn, recurse)
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        return self

    def forward(self, input_ids: Tensor) -> Tensor:
        return quantized_embedding(input_ids, self.qweight, self.dtype)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, _QuantizedModule) for m in model.modules())


def quantized_tensors(model: nn.Module) -> list[Tensor]:
    """The codes, scales and offsets of every quantized module in `model` (itself included)."""
    return [t for m in model.modules() if isinstance(m, _QuantizedModule) for t in m.qweight.tensors()]


def quantized_weight_of(module: nn.Module) -> QuantizedWeight | Tensor:
    """A linear or embedding module's weight: its QuantizedWeight, or the float tensor (detached)."""
    return module.qweight if isinstance(module, _QuantizedModule) else module.weight.detach()


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model(
    model: nn.Module,
    spec: QuantSpec,
    quantize: Callable[[str, Tensor], QuantizedWeight] | None = None,
    include_embeddings: bool = True,
    embedding_spec: QuantSpec | None = None,
) -> nn.Module:
    """Replace, in place, every nn.Linear of the decoder (and, with include_embeddings, the input
    embedding and the LM head) by its quantized twin. `quantize(name, weight)` produces each decoder
    weight (round-to-nearest under `spec` by default; GPTQ / AWQ pass their own). The embedding and
    the head take round-to-nearest under `embedding_spec` (default: default_embedding_spec(spec))."""
    existing = getattr(model.config, "kvlab_quantization", None)
    if existing is not None:  # its quantized layers would be skipped and the label overwritten
        raise ConfigError(f"the model is already quantized ({existing}); quantize the float model instead")
    quantize = quantize or (lambda _name, weight: quantize_weight(weight, spec))
    table_spec = embedding_spec or default_embedding_spec(spec)
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    skip = set() if include_embeddings else {id(head), id(embedding)}
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and id(module) not in skip
    ]
    with torch.no_grad():
        shared = None
        if include_embeddings and embedding is not None:
            shared = quantize_weight(embedding.weight, table_spec)
            replace_module(
                model, _name_of(model, embedding), QuantizedEmbedding(shared, embedding.weight.dtype)
            )
        for name, module in targets:
            if module is head:
                qweight = (
                    shared if tied and shared is not None else quantize_weight(module.weight, table_spec)
                )
            else:
                qweight = quantize(name, module.weight)
            replace_module(model, name, QuantizedLinear(qweight, module.bias))
    model.config.kvlab_quantization = spec.name
    place_weights(model)  # the new codes, and no longer the float weights they replace
    return model


def place_weights(model: nn.Module) -> None:
    """kvlab.models.huge_pages.place_module, after which a tied head and embedding still hold one
    QuantizedWeight (each module rebuilds its own from the moved buffers; the first is kept)."""
    huge_pages.place_module(model)
    shared: dict[int, QuantizedWeight] = {}
    for module in model.modules():
        if isinstance(module, _QuantizedModule):
            module._qweight = shared.setdefault(id(module.qdata), module.qweight)


def default_embedding_spec(spec: QuantSpec) -> QuantSpec:
    """int8 per channel for the embedding and the LM head when the decoder is int4, else `spec`. The
    head's error lands on every logit of every token, and a tied table is both: llama.cpp's Q4 files
    keep `token_embd` at Q8_0 for the same reason (the embedded SmolLM2 GGUF does). At int8 the table
    adds 28 MiB to SmolLM2's int4-g128 weights: 0.16x float32's bytes in all."""
    return QuantSpec(8) if spec.bits == 4 else spec


def _name_of(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def dense_weight_of(module: nn.Module, dtype: torch.dtype) -> Tensor:
    """The float weight a module multiplies by (dequantized if quantized): for references and tests."""
    if isinstance(module, _QuantizedModule):
        return module.qweight.dequantize(dtype)
    return module.weight.detach().to(dtype)


__all__ = [
    "QuantizedEmbedding",
    "QuantizedLinear",
    "dense_weight_of",
    "is_quantized",
    "quantize_model",
    "quantized_weight_of",
    "replace_module",
]
