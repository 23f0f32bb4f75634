"""Engine-native models: lean forward passes over a paged KV cache, with weights from an HF model.

    model = build_engine_model(hf_model)
    kv_caches = model.allocate_kv_caches(num_blocks=64, block_size=16)
    hidden = model(input_ids, positions, kv_caches, metadata, backend)     # (T,) ints -> (T, hidden)
    logits = model.compute_logits(hidden[selected_indices])

One module per architecture (llama.py, gpt_neox.py); this file holds what they share (the base class,
norms, the linear dispatch) and the dispatch by `config.model_type`; RoPE lives in kvlab/rope.py.
"""

import dataclasses
import importlib

import torch
import torch.nn.functional as F
from torch import Tensor

from kvlab.attention.backends.base import AttentionBackend
from kvlab.attention.metadata import AttentionMetadata
from kvlab.errors import ConfigError
from kvlab.hardware import emulated_half
from kvlab.kernels import cpu as cpu_kernels
from kvlab.models import huge_pages
from kvlab.quant import paged_kv
from kvlab.quant.formats import QuantizedWeight
from kvlab.quant.kv_quant import KVQuantSpec
from kvlab.quant.linear import quantized_embedding, quantized_linear

# model_type -> "module:Class"; a new architecture is one module and one line here.
ARCHITECTURES = {
    "llama": "kvlab.models.llama:LlamaEngineModel",
    "gpt_neox": "kvlab.models.gpt_neox:GPTNeoXEngineModel",
}


def build_engine_model(hf_model, fuse_projections: bool = True) -> "EngineModel":
    """The engine-native twin of `hf_model` (same device and dtype; fused weights are copies,
    the rest, including tied embeddings, share the HF model's storage). `fuse_projections=False`
    shares every weight it can, for a twin that lives beside the HF model (see kvlab.generate)."""
    model_type = hf_model.config.model_type
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"no engine-native module for model_type {model_type!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    module, _, cls = ARCHITECTURES[model_type].partition(":")
    if hf_model.device.type == "cpu":
        cpu_kernels.available()  # compile now (once, ~20 s) rather than inside the first timed step
    return getattr(importlib.import_module(module), cls)(hf_model, fuse_projections)


# From this many rows on, a half-precision matmul on a CPU that emulates half arithmetic runs in
# float32: emulated bf16 costs grow with every row, the weight's conversion is paid once. Measured
# on an AVX2 EPYC over SmolLM2's 30 layers of matrices: 1 row 20 ms in bf16 (200 ms upcast),
# 16 rows 234 -> 154 ms, 64 rows 861 -> 236 ms; a 512-token prefill's matmuls 131 -> 27 ms per
# matrix. Below it (decode), the matmul stays in half precision and reads half the bytes. Where the
# kvlab CPU kernels built, matmuls of up to SKINNY_MAX_ROWS rows take the skinny GEMM first.
UPCAST_MIN_ROWS = 16


def linear(x: Tensor, weight: Tensor | QuantizedWeight, bias: Tensor | None = None) -> Tensor:
    """F.linear, with the skinny GEMM for decode-sized CPU batches (kvlab.kernels.cpu) and in float32
    for many-row half inputs on CPUs without native half math; a quantized weight (kvlab.quant) takes
    its own kernels."""
    if isinstance(weight, QuantizedWeight):
        return quantized_linear(x, weight, bias)
    variant = cpu_kernels.skinny_choice(x, weight)
    if variant is not None:
        return cpu_kernels.skinny_linear(x, weight, bias, variant)
    if x.shape[0] >= UPCAST_MIN_ROWS and emulated_half(x):
        bias = None if bias is None else bias.float()
        return F.linear(x.float(), weight.float(), bias).to(x.dtype)
    return F.linear(x, weight, bias)


def embedding(input_ids: Tensor, weight: Tensor | QuantizedWeight, dtype: torch.dtype) -> Tensor:
    """The embedding rows of input_ids (dequantized rows of a quantized table)."""
    if isinstance(weight, QuantizedWeight):
        return quantized_embedding(input_ids, weight, dtype)
    return F.embedding(input_ids, weight)


def join_rows(weights: list[Tensor | QuantizedWeight]) -> Tensor | QuantizedWeight:
    """Stack weight matrices along their output rows (a fused q|k|v or gate|up), quantized or not."""
    if all(isinstance(w, QuantizedWeight) for w in weights):
        try:
            return QuantizedWeight.cat(weights)
        except ValueError:
            pass  # quantized differently (e.g. a GGUF's mixed types): the caller keeps them apart
    if any(isinstance(w, QuantizedWeight) for w in weights):
        return tuple(weights)
    return torch.cat(weights)


def place_layer_weights(layers: list, names: tuple[str, ...]) -> None:
    """Moves the matrices `names` of every layer (dataclasses; copies the engine model made, such as
    fused q|k|v) into one huge-page arena in layer order (kvlab.models.huge_pages), in place. The
    weights it shares with the HF model were placed when that was loaded. A tuple of unfused parts
    stays where it is."""
    fields = [
        (layer, name) for layer in layers for name in names if not isinstance(getattr(layer, name), tuple)
    ]
    weights = [getattr(layer, name) for layer, name in fields]
    flat = [t for w in weights for t in (w.tensors() if isinstance(w, QuantizedWeight) else [w])]
    placed = iter(huge_pages.place_tensors(flat))
    for (layer, name), weight in zip(fields, weights, strict=True):
        if isinstance(weight, QuantizedWeight):
            moved = {"data": next(placed), "scales": next(placed)}
            if weight.offsets is not None:
                moved["offsets"] = next(placed)
            weight = dataclasses.replace(weight, **moved)
        else:
            weight = next(placed)
        setattr(layer, name, weight)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    if cpu_kernels.handles(x):
        return cpu_kernels.rms_norm(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def add_rms_norm_(residual: Tensor, x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """residual += x in place, then RMSNorm(residual): one kernel on CPU (vLLM's fused_add_rms_norm)."""
    if cpu_kernels.handles(x) and residual.is_contiguous():
        return cpu_kernels.add_rms_norm_(residual, x, weight, eps)
    residual.add_(x)
    return F.rms_norm(residual, (residual.shape[-1],), weight, eps)


class EngineModel:
    """Base of engine-native models: forward(input_ids, positions, kv_caches, metadata, backend).

    Subclasses set the cache geometry (num_layers, num_kv_heads, head_dim), `dtype`, `device`,
    `lm_head` and implement `forward`, which returns final-normed hidden states (T, hidden).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    embed: Tensor
    lm_head: Tensor
    final_norm: Tensor | tuple[Tensor, Tensor]
    layers: list
    layer_matmuls: tuple[str, ...] = ()  # each layer's weight matrices, in the order a step applies them

    def matmul_weights(self) -> list[Tensor | QuantizedWeight]:
        """Every weight matrix one decode step multiplies: each layer's as the forward holds them (a
        fused projection is one matrix), then the LM head."""
        weights: list[Tensor | QuantizedWeight] = []
        for layer in self.layers:
            for name in self.layer_matmuls:
                weight = getattr(layer, name)
                weights.extend(weight if isinstance(weight, tuple) else [weight])
        return [*weights, self.lm_head]

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        kv_caches: list[tuple[Tensor, Tensor]],
        metadata: AttentionMetadata,
        backend: AttentionBackend,
    ) -> Tensor:
        raise NotImplementedError

    def __call__(
        self,
        input_ids: Tensor,
        positions: Tensor,
        kv_caches: list[tuple[Tensor, Tensor]],
        metadata: AttentionMetadata,
        backend: AttentionBackend,
    ) -> Tensor:
        self.check_caches(kv_caches)
        with torch.inference_mode():
            return self.forward(input_ids, positions, kv_caches, metadata, backend)

    def check_caches(self, kv_caches: list[tuple[Tensor, Tensor]]) -> None:
        """A step needs one (key_cache, value_cache) per layer."""
        if len(kv_caches) != self.num_layers:
            raise ValueError(
                f"need one (key_cache, value_cache) per layer ({self.num_layers}), got {len(kv_caches)}"
            )

    @torch.inference_mode()
    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden (N, hidden) -> logits (N, vocab), in the model dtype."""
        return linear(hidden, self.lm_head)

    def fused_decode_variant(self, input_ids, kv_caches, metadata, backend) -> str | None:
        """The skinny GEMM variant a step with these inputs runs as one op, or None: op by op."""
        return None

    def decode_logits(
        self,
        input_ids: Tensor,
        positions: Tensor,
        kv_caches: list[tuple[Tensor, Tensor]],
        metadata: AttentionMetadata,
        backend: AttentionBackend,
    ) -> Tensor:
        """Logits (N, vocab) of a decode-only step (one new token per row): one op where the model has
        one for these inputs (decode_logits_variant), else the forward, then the LM head on every row."""
        variant = self.decode_logits_variant(input_ids, kv_caches, metadata, backend)
        if variant is None:
            return self.compute_logits(self(input_ids, positions, kv_caches, metadata, backend))
        self.check_caches(kv_caches)
        with torch.inference_mode():
            return self.fused_decode_logits(input_ids, positions, kv_caches, metadata, backend, variant)

    def decode_logits_variant(self, input_ids, kv_caches, metadata, backend) -> str | None:
        """The skinny GEMM variant a decode_logits call with these inputs runs as one op, LM head
        included, or None. Its checks run cold on every token (each step streams the weights through
        the caches, ~0.1 ms in all): a loop of same-shaped steps decides once and calls
        fused_decode_logits with the answer."""
        return None

    def fused_decode_logits(self, input_ids, positions, kv_caches, metadata, backend, variant: str) -> Tensor:
        """decode_logits as one op with `variant`, from decode_logits_variant for steps of this shape
        (one query per row, these caches); the caller runs in inference mode."""
        raise NotImplementedError(f"{type(self).__name__} has no one-op decode step")

    def allocate_kv_caches(
        self,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        kv_quant: KVQuantSpec | None = None,
    ) -> list[tuple[Tensor, Tensor]]:
        """Zeroed per-layer caches, each (num_blocks, block_size, num_kv_heads, head_dim); with
        `kv_quant`, uint8 rows of codes and scales (kvlab/quant/paged_kv.py; attend through its
        QuantizedPagedBackend)."""
        if kv_quant is not None:
            return paged_kv.allocate(
                kv_quant,
                self.num_layers,
                num_blocks,
                block_size,
                self.num_kv_heads,
                self.head_dim,
                device or self.device,
            )
        shape = (num_blocks, block_size, self.num_kv_heads, self.head_dim)
        dtype, device = dtype or self.dtype, torch.device(device or self.device)
        if device.type != "cpu":
            return [
                (
                    torch.zeros(shape, dtype=dtype, device=device),
                    torch.zeros(shape, dtype=dtype, device=device),
                )
                for _ in range(self.num_layers)
            ]
        # In 2 MiB pages, as the weights (kvlab.models.huge_pages): a decode step reads each request's
        # blocks, scattered over the pool, and on 4 KiB pages nearly every block is a TLB miss. Paged
        # attention over 16 requests x 1,024 tokens from memory (8 pools in turn, alternated with 4 KiB
        # ones in one process, 2-core Zen 4 EPYC): float32 6-14% and bf16 7-15% faster.
        tensors = huge_pages.zeros([shape] * (2 * self.num_layers), dtype)
        return list(zip(tensors[0::2], tensors[1::2], strict=True))

    @property
    def weight_bytes(self) -> int:
        """Bytes of distinct weight storage the forward pass reads (tied embeddings counted once):
        the numerator of the bs-1 decode memory-bandwidth floor."""
        seen, total = set(), 0
        final_norm = self.final_norm if isinstance(self.final_norm, tuple) else (self.final_norm,)
        tensors = _flatten([self.embed, self.lm_head, *final_norm, *self._layer_tensors()])
        for tensor in tensors:
            key = (tensor.untyped_storage().data_ptr(), tensor.data_ptr())
            if key not in seen:
                seen.add(key)
                total += tensor.numel() * tensor.element_size()
        return total

    def _layer_tensors(self) -> list[Tensor]:
        found = []
        for layer in self.layers:
            for name in layer.__slots__:
                value = getattr(layer, name)
                found.extend(value if isinstance(value, tuple) else [value] if value is not None else [])
        return _flatten(found)

    @property
    def is_quantized(self) -> bool:
        return any(isinstance(w, QuantizedWeight) for w in self.matmul_weights()) or isinstance(
            self.embed, QuantizedWeight
        )

    def kv_bytes_per_token(
        self, dtype: torch.dtype | None = None, kv_quant: KVQuantSpec | None = None
    ) -> int:
        """Exact K+V bytes one token occupies across all layers (codes, scales and zeros when quantized)."""
        if kv_quant is not None:
            return paged_kv.bytes_per_token(kv_quant, self.num_layers, self.num_kv_heads, self.head_dim)
        element = torch.empty((), dtype=dtype or self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element


def _flatten(items: list) -> list[Tensor]:
    """Tensors, with each QuantizedWeight replaced by its codes, scales and offsets."""
    out: list[Tensor] = []
    for item in items:
        if isinstance(item, QuantizedWeight):
            out.extend(item.tensors())
        elif isinstance(item, tuple):
            out.extend(_flatten(list(item)))
        else:
            out.append(item)
    return out
