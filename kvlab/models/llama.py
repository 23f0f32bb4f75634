"""Engine-native Llama (also SmolLM2, Mistral-style GQA checkpoints saved as Llama).

Per layer: RMSNorm -> fused QKV -> RoPE (in place, q and k together) -> write K/V to the paged
cache -> attention backend -> o_proj -> residual add + RMSNorm (one op) -> fused gate/up ->
SiLU(gate) * up -> down -> residual add + the next RMSNorm. Weights come from the HF model; fused
matrices are concatenated once at build.

With `fuse_projections=False` nothing is copied: the layer keeps the HF q/k/v and gate/up matrices
and concatenates their small outputs instead (the twin `kvlab.generate` builds per call, which must
not double the weights' memory; at batch 1 the extra matmul calls cost well under 1 ms per token).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kvlab.attention.backends.base import AttentionBackend
from kvlab.attention.metadata import AttentionMetadata
from kvlab.errors import ConfigError
from kvlab.kernels import cpu as cpu_kernels
from kvlab.models.native import (
    EngineModel,
    add_rms_norm_,
    embedding,
    join_rows,
    linear,
    place_layer_weights,
    rms_norm,
)
from kvlab.phases import PHASE_ATTENTION, phase
from kvlab.quant.formats import QuantizedWeight
from kvlab.quant.modules import quantized_weight_of
from kvlab.rope import RotaryEmbedding


@dataclass(slots=True)
class LlamaLayer:
    input_norm: Tensor  # (hidden,)
    qkv: Tensor | tuple[Tensor, ...]  # ((H + 2K) * D, hidden): rows q | k | v (or the three matrices)
    qkv_bias: Tensor | tuple[Tensor, ...] | None
    o_proj: Tensor  # (hidden, H * D)
    o_bias: Tensor | None
    post_norm: Tensor
    gate_up: Tensor | tuple[Tensor, ...]  # (2 * intermediate, hidden): rows gate | up (or the two)
    gate_up_bias: Tensor | tuple[Tensor, ...] | None
    down: Tensor  # (hidden, intermediate)
    down_bias: Tensor | None


def _join(weights: list, fuse: bool):
    """One matrix of the given rows (fused), or the parts as they are; None for absent biases."""
    if weights[0] is None:
        return None
    weights = [w.detach() if isinstance(w, Tensor) else w for w in weights]
    return join_rows(weights) if fuse else tuple(weights)


def project(x: Tensor, weight, bias) -> Tensor:
    """x @ weight.T (+ bias) for a fused weight, or the concatenated outputs of its parts."""
    if not isinstance(weight, tuple):
        return linear(x, weight, bias)
    biases = bias if bias is not None else (None,) * len(weight)
    return torch.cat([linear(x, w, b) for w, b in zip(weight, biases, strict=True)], dim=-1)


class LlamaEngineModel(EngineModel):
    layer_matmuls = ("qkv", "o_proj", "gate_up", "down")

    def __init__(self, hf_model, fuse_projections: bool = True) -> None:
        config = hf_model.config
        if config.hidden_act != "silu":
            raise ConfigError(f"engine-native Llama supports hidden_act 'silu', got {config.hidden_act!r}")
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.num_layers = config.num_hidden_layers
        self.eps = config.rms_norm_eps
        self.scale = self.head_dim**-0.5
        self.embed = quantized_weight_of(hf_model.get_input_embeddings())
        self.lm_head = quantized_weight_of(hf_model.get_output_embeddings())  # same storage when tied
        self.dtype, self.device = hf_model.dtype, hf_model.device
        self.final_norm = hf_model.model.norm.weight.detach()
        self.rotary = RotaryEmbedding(config, self.head_dim, self.dtype, self.device)
        self.layers = [self._fuse(layer, fuse_projections) for layer in hf_model.model.layers]
        if fuse_projections:  # the fused matrices are copies made here; the rest are the HF model's
            place_layer_weights(self.layers, ("qkv", "gate_up"))
        # The norm that follows each layer's MLP: the next layer's input norm, then the final norm.
        self.next_norms = [layer.input_norm for layer in self.layers[1:]] + [self.final_norm]
        self.has_bias = any(
            b is not None
            for layer in self.layers
            for b in (layer.qkv_bias, layer.o_bias, layer.gate_up_bias, layer.down_bias)
        )
        self.quantized = self.is_quantized
        self._step_weights: cpu_kernels.StepWeights | None = None
        # The caches the last fused step read, and their one-object form (kept while they are the same list).
        self._step_caches: tuple[list, torch.ScriptObject] | None = None
        self._whole_blocks: bool | None = None  # every quantized matrix has whole 32-column blocks

    @staticmethod
    def _fuse(layer, fuse: bool) -> LlamaLayer:
        attn, mlp = layer.self_attn, layer.mlp
        with torch.no_grad():
            return LlamaLayer(
                input_norm=layer.input_layernorm.weight.detach(),
                qkv=_join(
                    [
                        quantized_weight_of(attn.q_proj),
                        quantized_weight_of(attn.k_proj),
                        quantized_weight_of(attn.v_proj),
                    ],
                    fuse,
                ),
                qkv_bias=_join([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias], fuse),
                o_proj=quantized_weight_of(attn.o_proj),
                o_bias=None if attn.o_proj.bias is None else attn.o_proj.bias.detach(),
                post_norm=layer.post_attention_layernorm.weight.detach(),
                gate_up=_join([quantized_weight_of(mlp.gate_proj), quantized_weight_of(mlp.up_proj)], fuse),
                gate_up_bias=_join([mlp.gate_proj.bias, mlp.up_proj.bias], fuse),
                down=quantized_weight_of(mlp.down_proj),
                down_bias=None if mlp.down_proj.bias is None else mlp.down_proj.bias.detach(),
            )

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        kv_caches: list[tuple[Tensor, Tensor]],
        metadata: AttentionMetadata,
        backend: AttentionBackend,
    ) -> Tensor:
        """input_ids, positions (T,) -> final-normed hidden states (T, hidden)."""
        variant = self.fused_decode_variant(input_ids, kv_caches, metadata, backend)
        if variant is not None:
            return self._fused_decode(input_ids, positions, kv_caches, metadata, backend, variant)
        num_tokens = input_ids.shape[0]
        num_heads, num_kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        cos, sin = self.rotary.tables(positions)
        # Each sublayer's output is added to the residual stream by the norm that follows it.
        residual = embedding(input_ids, self.embed, self.dtype)
        x = rms_norm(residual, self.layers[0].input_norm, self.eps)
        for layer, next_norm, (key_cache, value_cache) in zip(
            self.layers, self.next_norms, kv_caches, strict=True
        ):
            qkv = project(x, layer.qkv, layer.qkv_bias)
            # q and k are adjacent in each row, so one rotation covers both heads sets.
            self.rotary.rotate_(qkv[:, : q_size + kv_size].view(num_tokens, -1, head_dim), cos, sin)
            query = qkv[:, :q_size].view(num_tokens, num_heads, head_dim)
            key = qkv[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
            value = qkv[:, q_size + kv_size :].view(num_tokens, num_kv_heads, head_dim)
            backend.write_kv(key, value, key_cache, value_cache, metadata.slot_mapping)
            with phase(PHASE_ATTENTION):
                attn = backend.forward(query, key_cache, value_cache, metadata, self.scale)
            attn = linear(attn.reshape(num_tokens, q_size), layer.o_proj, layer.o_bias)
            x = add_rms_norm_(residual, attn, layer.post_norm, self.eps)
            x = add_rms_norm_(residual, _mlp(layer, x), next_norm, self.eps)
        return x

    def decode_logits_variant(self, input_ids, kv_caches, metadata, backend) -> str | None:
        """The one-op decode step with the LM head inside it, where the step runs as one op and the
        head is a dense matrix: one op call and one parallel region per token instead of two, and none
        of the head's Python (its calibration lookup, dispatch), which runs cold after the step has
        streamed the weights through the caches."""
        # The head in the step runs the step's skinny variant: only where native.linear would run that
        # one too (a quantized model's step runs even where the calibration gave these rows to torch).
        variant = self.fused_decode_variant(input_ids, kv_caches, metadata, backend)
        head_in_step = (
            variant is not None
            and not isinstance(self.lm_head, QuantizedWeight)
            and self.lm_head.is_contiguous()
            and (
                not self.quantized
                or cpu_kernels.fused_decode_variant(self.dtype, input_ids.shape[0]) == variant
            )
        )
        return variant if head_in_step else None

    def fused_decode_logits(self, input_ids, positions, kv_caches, metadata, backend, variant: str) -> Tensor:
        return self._fused_decode(input_ids, positions, kv_caches, metadata, backend, variant, self.lm_head)

    def fused_decode_variant(self, input_ids, kv_caches, metadata, backend) -> str | None:
        """The skinny GEMM variant for a one-op decode step (kvlab/kernels/decode_step.cpp), or None
        to run op by op: prefill and mixed steps, other backends, biases, GPU, no kernels, quantized
        matrices the step's quantized GEMM does not take (see _step_takes_quantized)."""
        if not (metadata.is_decode_only and backend.fused_cpu_decode) or self.has_bias:
            return None
        if self.device.type != "cpu" or self.head_dim % 8 or kv_caches[0][0].dtype != self.dtype:
            return None
        if self.quantized and not self._step_takes_quantized():
            return None
        return cpu_kernels.fused_decode_variant(self.dtype, input_ids.shape[0], self.quantized)

    def _step_takes_quantized(self) -> bool:
        """The one-op step reads quantized matrices with the float quantized GEMM (inputs of whole
        32-column blocks); the integer variant rounds each GEMM's inputs, so it runs op by op."""
        if cpu_kernels.quant_variant() in cpu_kernels.INTEGER_VARIANTS:
            return False
        if self._whole_blocks is None:  # once per model, as the step's weights are (not per token)
            self._whole_blocks = all(
                w.in_features % 32 == 0 for w in self.matmul_weights() if isinstance(w, QuantizedWeight)
            )
        return self._whole_blocks

    def _fused_decode(
        self, input_ids, positions, kv_caches, metadata, backend, variant: str, lm_head: Tensor | None = None
    ) -> Tensor:
        if self._step_weights is None:
            self._step_weights = self._split_step_weights()
        if self._step_caches is None or self._step_caches[0] is not kv_caches:
            self._step_caches = (kv_caches, cpu_kernels.step_caches(kv_caches))
        if isinstance(self.embed, Tensor):
            table = self.embed
        else:  # a quantized table: its rows dequantized here, which the step then reads as a table
            table, input_ids = embedding(input_ids, self.embed, self.dtype), torch.arange(input_ids.shape[0])
        return cpu_kernels.decode_step(
            input_ids,
            positions,
            table,
            (self.rotary.cos, self.rotary.sin),
            self._step_weights,
            self.final_norm,
            self._step_caches[1],
            [backend.layer_metadata(key_cache, metadata) for key_cache, _ in kv_caches]
            if backend.per_layer_metadata
            else [metadata],
            self.num_heads,
            self.eps,
            self.scale,
            variant,
            lm_head,
        )

    def _split_step_weights(self) -> cpu_kernels.StepWeights:
        """Per-layer q, k, v, gate, up (row views of fused matrices: no copies) and the rest."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        step: dict[str, list[Tensor]] = {
            name: [] for name in ("input_norm", "q", "k", "v", "o", "post_norm", "gate", "up", "down")
        }
        for layer in self.layers:
            qkv = layer.qkv if isinstance(layer.qkv, tuple) else layer.qkv.split([q_size, kv_size, kv_size])
            gate_up = layer.gate_up if isinstance(layer.gate_up, tuple) else _halves(layer.gate_up)
            for name, tensor in zip(
                step,
                (layer.input_norm, *qkv, layer.o_proj, layer.post_norm, *gate_up, layer.down),
                strict=True,
            ):
                step[name].append(tensor)
        return cpu_kernels.StepWeights.from_layers(step)


def _halves(gate_up: Tensor | QuantizedWeight) -> list:
    rows = gate_up.shape[0] // 2
    return gate_up.split([rows, rows])


# A long prefill's MLP holds gate, up, SiLU(gate) * up and the joined projection at once: at 4,096
# tokens of SmolLM2 in float32 about 150 MiB, more than the whole KV cache a press saves. The MLP is
# row-wise, so running it over chunks of rows gives the same output with a peak of one chunk's.
MLP_CHUNK_ROWS = 1024


def _mlp(layer, x: Tensor) -> Tensor:
    """down(SiLU(gate(x)) * up(x)) for x (T, hidden), in chunks of at most MLP_CHUNK_ROWS rows."""
    if x.shape[0] > MLP_CHUNK_ROWS:
        return torch.cat([_mlp(layer, rows) for rows in x.split(MLP_CHUNK_ROWS)])
    gate, up = project(x, layer.gate_up, layer.gate_up_bias).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, layer.down, layer.down_bias)
