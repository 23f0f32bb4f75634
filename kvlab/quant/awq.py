"""AWQ: activation-aware weight quantization (Lin et al. 2023, arXiv 2306.00978).

A few input channels carry much larger activations than the rest, and the weights they multiply
matter most. AWQ protects them without mixed precision: scaling input channel j of W up by s_j and
the activation down by 1/s_j leaves W x unchanged in float, but shrinks the relative rounding error
of the scaled weights (section 3.2). The scales are searched per group of linears sharing one input,

    s = s_x ^ alpha,    alpha* = argmin_alpha || Q(W diag(s)) (diag(s)^-1 X) - W X ||     (eq. 4-5)

with s_x the mean |x| of each input channel on calibration data and alpha on a grid of 20 points in
[0, 1). The 1 / s is folded into the operation that produces the input, so it costs nothing at run
time: the RMSNorm weight before q/k/v and before gate/up, the rows of up_proj before down_proj. Then,
as the authors' code does, each weight group's clipping range is searched (shrinking max |w| by up to
half) to minimise the same output error, for every linear but q and k.

The output error needs no forward pass per candidate: for E = Q(W diag(s)) diag(s)^-1 - W,
||E X||^2 = trace(E G E^T) with G = X X^T, the Gram matrix of the inputs, gathered once on all
calibration tokens (kvlab/quant/calibration.py).

o_proj's input comes from v_proj; with grouped-query attention (SmolLM2, tiny-llama) one v row feeds
several o_proj input channels, so that scale is not applied (the authors skip it when shapes differ).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvlab.errors import ConfigError
from kvlab.quant.calibration import InputStats, calibration_samples, layer_by_layer
from kvlab.quant.formats import QuantSpec
from kvlab.quant.modules import QuantizedLinear, quantize_model, replace_module
from kvlab.quant.rtn import quantize_weight

GRID = 20  # alpha and clipping candidates
MAX_SHRINK = 0.5  # clipping keeps at least half of each group's range
UNCLIPPED = ("self_attn.q_proj", "self_attn.k_proj")  # their error passes through softmax; kept


def awq_quantize_model(
    model: nn.Module,
    tokenizer,
    spec: QuantSpec,
    num_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    include_embeddings: bool = True,
    clip: bool = True,
    batch_size: int = 8,
) -> nn.Module:
    """Quantize, in place, every decoder linear of a Llama model with AWQ (scales searched and folded
    layer by layer on WikiText-2 validation windows, then round-to-nearest); the embedding and LM
    head (include_embeddings) get plain round-to-nearest."""
    require_llama(model)
    samples = calibration_samples(tokenizer, num_samples, seq_len, seed)
    for _index, layer, inputs in layer_by_layer(model, samples, batch_size):
        stats = inputs.linear_stats(layer)
        scale_layer(layer, stats, spec)
        if clip:
            clip_layer(layer, stats, spec)
        for name, module in list(layer.named_modules()):
            if isinstance(module, nn.Linear):
                replace_module(
                    layer, name, QuantizedLinear(quantize_weight(module.weight, spec), module.bias)
                )
    return quantize_model(model, spec, include_embeddings=include_embeddings)


def require_llama(model: nn.Module) -> None:
    if getattr(model.config, "model_type", None) != "llama":
        raise ConfigError(
            f"AWQ folds its scales into Llama's RMSNorm and MLP; got model type {model.config.model_type!r}"
        )


def scale_layer(layer: nn.Module, stats: dict[str, InputStats], spec: QuantSpec) -> dict[str, Tensor]:
    """Search and fold the three AWQ scales of one Llama decoder layer, in place: the layer computes
    the same function in float (up to rounding). `stats` are the inputs of each linear (by name in
    the layer) before this call; they are updated to the scaled inputs. Returns the scales by group."""
    mlp = layer.mlp
    folds = {
        # group (linears sharing one input) -> the weight whose output is that input
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"): layer.input_layernorm.weight,
        ("mlp.gate_proj", "mlp.up_proj"): layer.post_attention_layernorm.weight,
        ("mlp.down_proj",): mlp.up_proj.weight,
    }
    chosen = {}
    with torch.no_grad():
        for names, previous in folds.items():
            linears = [layer.get_submodule(name) for name in names]
            s = search_scale([m.weight for m in linears], stats[names[0]], spec)
            for module in linears:
                module.weight.mul_(s.to(module.weight.dtype))
            # A norm weight scales the input channels; up_proj's rows each produce one of them.
            previous.div_(s.view(-1, *([1] * (previous.dim() - 1))).to(previous.dtype))
            for name in names:
                _rescale_stats(stats[name], s)
            chosen[names[0]] = s
    return chosen


def _rescale_stats(stats: InputStats, s: Tensor) -> None:
    """The group's inputs are now x / s: keep the statistics in step for the clipping search."""
    inverse = 1 / s.double()
    stats.gram = stats.gram * inverse[:, None] * inverse[None, :]
    stats.abs_sum = stats.abs_sum * inverse


def search_scale(weights: list[Tensor], stats: InputStats, spec: QuantSpec, grid: int = GRID) -> Tensor:
    """AWQ's per-input-channel scale for linears sharing one input (eq. 5): s_x^alpha for the alpha
    on the grid with the smallest output error; alpha = 0 (s = 1, plain round-to-nearest) is a
    candidate, so the result is never worse than it on the calibration data. float32 (K,)."""
    gram = stats.gram.float() / max(stats.count, 1)
    magnitude = stats.mean_abs.float().clamp(min=1e-8)
    best, best_error = torch.ones_like(magnitude), float("inf")
    for step in range(grid):
        s = magnitude.pow(step / grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1 (the authors' normalisation)
        error = sum(_output_error(w.float(), s, gram, spec) for w in weights)
        if error < best_error:
            best, best_error = s, error
    return best


def _output_error(weight: Tensor, s: Tensor, gram: Tensor, spec: QuantSpec) -> float:
    """Mean squared output error per token of Q(W diag(s)) diag(s)^-1 against W: trace(E G E^T)."""
    error = quantize_weight(weight * s, spec).dequantize() / s - weight
    return ((error @ gram) * error).sum().item()


def clip_layer(layer: nn.Module, stats: dict[str, InputStats], spec: QuantSpec) -> None:
    """Clip, in place, each weight group of the layer's linears (but q and k) to its best range."""
    with torch.no_grad():
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear) and name not in UNCLIPPED and spec.granularity != "tensor":
                module.weight.copy_(search_clip(module.weight.float(), stats[name], spec))


def search_clip(weight: Tensor, stats: InputStats, spec: QuantSpec, grid: int = GRID) -> Tensor:
    """The weight with each (row, group) clipped to the fraction of its range, among 1, 1 - 1/grid,
    ... down to MAX_SHRINK, that minimises that group's output error e_g^T G_gg e_g (the error of
    one group adds to the output through that group's inputs only)."""
    n, k = weight.shape
    group_size = spec.groups_along(k)
    groups = -(-k // group_size)
    padded = groups * group_size
    gram = stats.gram.float() / max(stats.count, 1)
    gram = F.pad(gram, (0, padded - k, 0, padded - k))
    blocks = torch.stack(
        [gram[g * group_size : (g + 1) * group_size, g * group_size :][:, :group_size] for g in range(groups)]
    )
    w = F.pad(weight, (0, padded - k)).view(n, groups, group_size)
    low, high = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    if spec.symmetric:
        high = torch.maximum(high.abs(), low.abs())
        low = -high
    best, best_error = w, torch.full((n, groups), float("inf"))
    for step in range(int(grid * MAX_SHRINK) + 1):
        ratio = 1 - step / grid
        clipped = torch.maximum(torch.minimum(w, high * ratio), low * ratio)
        dequantized = quantize_weight(clipped.view(n, padded)[:, :k], spec).dequantize()
        error = F.pad(dequantized - weight, (0, padded - k)).view(n, groups, group_size)
        group_error = torch.einsum("ngk,gkl,ngl->ng", error, blocks, error)
        better = group_error < best_error
        best = torch.where(better[..., None], clipped, best)
        best_error = torch.where(better, group_error, best_error)
    return best.view(n, padded)[:, :k]
