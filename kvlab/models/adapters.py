"""THE ONLY per-architecture code: where a model's attention lives and how to read its queries.

Presses that score tokens by attention need the post-RoPE queries, which SDPA never exposes. Rather
than replacing any `forward`, `observe()` installs two hooks per layer for the duration of a `with`
block and removes them in `finally`:

- a forward pre-hook on the attention module reads the rotary `position_embeddings` (cos, sin) and
  may substitute the attention mask (caches whose layers or heads hold different lengths);
- a forward hook on the module that produces the queries (Llama `q_proj`; GPT-NeoX's fused
  `query_key_value`) rebuilds post-RoPE queries from its output with those cos/sin.

Supported: Llama-family (GQA, full rotary) and GPT-NeoX (fused QKV, partial rotary, e.g. Pythia).
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from kvlab.errors import ConfigError
from kvlab.rope import RotarySpec, apply_rotary

QueryCallback = Callable[[int, torch.Tensor], None]
# (layer_idx, q_len, incoming mask) -> mask to use; returning the incoming mask leaves it unchanged.
MaskCallback = Callable[[int, int, torch.Tensor | None], torch.Tensor | None]


@dataclass(frozen=True, slots=True)
class Adapter:
    """How to find attention and queries in one architecture."""

    arch: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary: RotarySpec

    @property
    def scaling(self) -> float:
        return self.head_dim**-0.5

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        if self.arch == "gpt_neox":
            return [layer.attention for layer in model.gpt_neox.layers]
        return [layer.self_attn for layer in model.model.layers]

    def query_module(self, attention: nn.Module) -> nn.Module:
        return attention.query_key_value if self.arch == "gpt_neox" else attention.q_proj

    def queries_from_output(self, output: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE queries (batch, heads, seq, head_dim) from the query module's output (batch, seq, -1)."""
        batch, seq = output.shape[:2]
        if self.arch == "gpt_neox":
            # Fused layout: per head, [q | k | v] of head_dim each (GPTNeoXAttention.forward).
            return output.view(batch, seq, self.num_heads, 3 * self.head_dim)[..., : self.head_dim].transpose(
                1, 2
            )
        return output.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)


def get_adapter(model: nn.Module) -> Adapter:
    config = model.config
    arch = config.model_type
    if arch == "gpt_neox":
        rotary_emb = model.gpt_neox.rotary_emb
    elif arch in ("llama", "mistral"):
        rotary_emb = model.model.rotary_emb
    else:
        raise ConfigError(f"KV presses support llama and gpt_neox models, not {arch!r}")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    inv_freq = rotary_emb.inv_freq.detach().float()
    return Adapter(
        arch=arch,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        rotary=RotarySpec(inv_freq=inv_freq, rotary_dim=2 * inv_freq.numel()),
    )


@contextmanager
def observe(
    model: nn.Module, on_queries: QueryCallback | None = None, on_mask: MaskCallback | None = None
) -> Iterator[Adapter]:
    """Observe post-RoPE queries (and optionally replace attention masks) while the block runs."""
    adapter = get_adapter(model)
    rotary: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []

    def pre_hook(layer_idx: int):
        def hook(module, args, kwargs):
            cos, sin = kwargs["position_embeddings"]
            rotary[layer_idx] = (cos, sin)
            if on_mask is None:
                return None
            mask = kwargs.get("attention_mask")
            new_mask = on_mask(layer_idx, cos.shape[1], mask)
            if new_mask is mask:
                return None
            return args, {**kwargs, "attention_mask": new_mask}

        return hook

    def query_hook(layer_idx: int):
        def hook(module, args, output):
            cos, sin = rotary.pop(layer_idx)
            on_queries(layer_idx, apply_rotary(adapter.queries_from_output(output), cos, sin))

        return hook

    try:
        for layer_idx, attention in enumerate(adapter.attention_modules(model)):
            handles.append(attention.register_forward_pre_hook(pre_hook(layer_idx), with_kwargs=True))
            if on_queries is not None:
                handles.append(adapter.query_module(attention).register_forward_hook(query_hook(layer_idx)))
        yield adapter
    finally:
        for handle in handles:
            handle.remove()
        rotary.clear()
