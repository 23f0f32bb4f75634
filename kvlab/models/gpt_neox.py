"""Engine-native GPT-NeoX (Pythia): LayerNorm with bias, fused QKV with bias, partial rotary
(`partial_rotary_factor`, Pythia's rotary_pct), GELU MLP and, usually, the parallel residual
h + attn(ln1(h)) + mlp(ln2(h)) (Black et al. 2022, GPT-NeoX-20B).

The QKV rows are always regrouped into a copy (HF interleaves them per head), so this twin holds
one extra QKV matrix per layer whatever `fuse_projections` says (about 7% of Pythia-70M's weights).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.activations import ACT2FN

from kvlab.attention.backends.base import AttentionBackend
from kvlab.attention.metadata import AttentionMetadata
from kvlab.models.native import EngineModel, embedding, linear, place_layer_weights
from kvlab.phases import PHASE_ATTENTION, phase
from kvlab.quant.formats import QuantizedWeight
from kvlab.quant.modules import quantized_weight_of
from kvlab.rope import RotaryEmbedding


@dataclass(slots=True)
class GPTNeoXLayer:
    ln1: tuple[Tensor, Tensor]  # (weight, bias)
    ln2: tuple[Tensor, Tensor]
    qkv: Tensor  # (3 * H * D, hidden), rows reordered to q | k | v (HF interleaves per head)
    qkv_bias: Tensor | None  # None where the config has attention_bias=False
    dense: Tensor
    dense_bias: Tensor | None
    up: Tensor
    up_bias: Tensor
    down: Tensor
    down_bias: Tensor


class GPTNeoXEngineModel(EngineModel):
    layer_matmuls = ("qkv", "dense", "up", "down")

    def __init__(self, hf_model, fuse_projections: bool = True) -> None:
        config = hf_model.config
        self.num_heads = self.num_kv_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.num_layers = config.num_hidden_layers
        self.eps = config.layer_norm_eps
        self.scale = self.head_dim**-0.5
        self.parallel_residual = config.use_parallel_residual
        self.act = ACT2FN[config.hidden_act]
        params = getattr(config, "rope_parameters", None) or {}
        rotary_pct = params.get("partial_rotary_factor", getattr(config, "rotary_pct", 1.0))
        self.embed = quantized_weight_of(hf_model.get_input_embeddings())
        self.lm_head = quantized_weight_of(hf_model.get_output_embeddings())
        self.dtype, self.device = hf_model.dtype, hf_model.device
        final = hf_model.gpt_neox.final_layer_norm
        self.final_norm = (final.weight.detach(), final.bias.detach())
        self.rotary = RotaryEmbedding(config, int(self.head_dim * rotary_pct), self.dtype, self.device)
        self.layers = [self._fuse(layer) for layer in hf_model.gpt_neox.layers]
        if fuse_projections:  # a long-lived engine model; kvlab.generate's per-call twin skips the copy
            place_layer_weights(self.layers, ("qkv",))  # regrouped rows: a copy made here

    def _fuse(self, layer) -> GPTNeoXLayer:
        attn, mlp = layer.attention, layer.mlp
        # HF's fused rows are [q_h0, k_h0, v_h0, q_h1, ...]; regroup to [q_all | k_all | v_all].
        regroup = torch.arange(3 * self.num_heads * self.head_dim).view(self.num_heads, 3, self.head_dim)
        regroup = regroup.transpose(0, 1).reshape(-1)
        weight = quantized_weight_of(attn.query_key_value)
        qkv = weight.select_rows(regroup) if isinstance(weight, QuantizedWeight) else weight[regroup]
        bias = attn.query_key_value.bias
        if bias is not None:
            bias = (
                bias.detach().view(self.num_heads, 3, self.head_dim).transpose(0, 1).reshape(-1).contiguous()
            )
        return GPTNeoXLayer(
            ln1=(layer.input_layernorm.weight.detach(), layer.input_layernorm.bias.detach()),
            ln2=(
                layer.post_attention_layernorm.weight.detach(),
                layer.post_attention_layernorm.bias.detach(),
            ),
            qkv=qkv,
            qkv_bias=bias,
            dense=quantized_weight_of(attn.dense),
            dense_bias=None if attn.dense.bias is None else attn.dense.bias.detach(),
            up=quantized_weight_of(mlp.dense_h_to_4h),
            up_bias=mlp.dense_h_to_4h.bias.detach(),
            down=quantized_weight_of(mlp.dense_4h_to_h),
            down_bias=mlp.dense_4h_to_h.bias.detach(),
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
        num_tokens = input_ids.shape[0]
        num_heads, head_dim = self.num_heads, self.head_dim
        size = num_heads * head_dim
        shape = (self.embed.shape[1],)
        cos, sin = self.rotary.tables(positions)
        hidden = embedding(input_ids, self.embed, self.dtype)
        for layer, (key_cache, value_cache) in zip(self.layers, kv_caches, strict=True):
            x = F.layer_norm(hidden, shape, *layer.ln1, self.eps)
            qkv = linear(x, layer.qkv, layer.qkv_bias)
            self.rotary.rotate_(qkv[:, : 2 * size].view(num_tokens, 2 * num_heads, head_dim), cos, sin)
            query = qkv[:, :size].view(num_tokens, num_heads, head_dim)
            key = qkv[:, size : 2 * size].view(num_tokens, num_heads, head_dim)
            value = qkv[:, 2 * size :].view(num_tokens, num_heads, head_dim)
            backend.write_kv(key, value, key_cache, value_cache, metadata.slot_mapping)
            with phase(PHASE_ATTENTION):
                attn = backend.forward(query, key_cache, value_cache, metadata, self.scale)
            attn = linear(attn.reshape(num_tokens, size), layer.dense, layer.dense_bias)
            if self.parallel_residual:
                mlp_in = F.layer_norm(hidden, shape, *layer.ln2, self.eps)
                hidden = hidden + attn + self._mlp(layer, mlp_in)
            else:
                hidden = hidden + attn
                hidden = hidden + self._mlp(layer, F.layer_norm(hidden, shape, *layer.ln2, self.eps))
        return F.layer_norm(hidden, shape, *self.final_norm, self.eps)

    def _mlp(self, layer: GPTNeoXLayer, x: Tensor) -> Tensor:
        return linear(self.act(linear(x, layer.up, layer.up_bias)), layer.down, layer.down_bias)
