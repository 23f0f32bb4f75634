"""GPTQ: post-training quantization with second-order error feedback (Frantar et al. 2022,
arXiv 2210.17323).

For a linear layer with weight W (N, K) and calibration inputs X (K, tokens), GPTQ minimises the
layer's output error ||W X - Q X||^2 one input column at a time. Quantizing column j leaves an error
that the not yet quantized columns absorb through the inverse Hessian of that loss, H = 2 X X^T
(the Optimal Brain Quantization update, eq. 2-3):

    delta_F = -(w_j - q_j) / [H_F^-1]_jj * (H_F^-1)_j,:

The paper's three changes make it fast and stable, all kept here:
- one column order for every row (step 1), so H_F^-1 is shared by all N rows;
- lazy batch updates (step 2): columns are processed in blocks of 128 and the rest of the matrix
  receives one rank-128 update per block, not one rank-1 update per column (eq. 4);
- the Cholesky reformulation (step 3): the rows of H_F^-1 the updates need are the rows of the upper
  Cholesky factor of H^-1, computed once, with a dampening of 1% of the mean diagonal of H.

The quantization grid is round-to-nearest's (kvlab/quant/rtn.py): a group's scale and offset come
from the group's weights, as updated so far, when the loop reaches its first column. With act-order
(the "desc_act" heuristic of the authors' code: columns in decreasing order of diag(H), the most
activated first) a group's columns are scattered over the loop, so its scale is fixed beforehand from
the original weights ("static groups"), keeping our format's contiguous groups.
"""

import torch
from torch import Tensor, nn

from kvlab.quant.calibration import calibration_samples, layer_by_layer
from kvlab.quant.formats import QuantizedWeight, QuantSpec
from kvlab.quant.modules import QuantizedLinear, quantize_model, replace_module
from kvlab.quant.rtn import codes_for, from_codes, scales_for

BLOCK_SIZE = 128  # lazy-batch width (the paper's B)
PERCDAMP = 0.01  # dampening: this fraction of the mean diagonal of H is added to it


def gptq_quantize_weight(
    weight: Tensor,
    hessian: Tensor,
    spec: QuantSpec,
    act_order: bool = False,
    block_size: int = BLOCK_SIZE,
    percdamp: float = PERCDAMP,
) -> QuantizedWeight:
    """Quantize an (N, K) weight under `spec` with GPTQ, given H = 2 X X^T (K, K) of its inputs."""
    n, k = weight.shape
    group_size = spec.groups_along(k)
    w = weight.detach().float().clone()
    h = hessian.detach().double().clone()
    # An input channel that was always zero carries no information: any value works for its
    # weights, so it is zeroed and its diagonal set to 1 to keep H invertible (as the authors do).
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    static = act_order or spec.granularity != "group"
    scales, offsets = scales_for(w, spec) if static else _empty_grid(n, k, group_size, spec)
    order = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, order], h[order][:, order]
    upper = _inverse_cholesky(h, percdamp).float()

    # With natural order, blocks are whole groups so a group's weights are all up to date (in the
    # current block) when its scale is chosen.
    if not static:
        block_size = -(-block_size // group_size) * group_size
    codes = torch.empty(n, k, dtype=torch.int16)
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        block = w[:, start:end].clone()
        errors = torch.empty_like(block)
        for i in range(end - start):
            column = start + i
            group = int(order[column]) // group_size
            if not static and column % group_size == 0:
                scales[:, group], group_offset = _group_grid(block[:, i : i + group_size], spec)
                if offsets is not None:
                    offsets[:, group] = group_offset
            offset = None if offsets is None else offsets[:, group]
            q, dequantized = _quantize_column(block[:, i], scales[:, group], offset, spec.bits)
            codes[:, column] = q
            errors[:, i] = (block[:, i] - dequantized) / upper[column, column]
            block[:, i + 1 :] -= errors[:, i : i + 1] * upper[column, column + 1 : end]
        w[:, end:] -= errors @ upper[start:end, end:]

    restored = torch.empty_like(codes)
    restored[:, order] = codes
    return from_codes(restored, scales, offsets, spec.bits, group_size)


def _inverse_cholesky(h: Tensor, percdamp: float) -> Tensor:
    """The upper Cholesky factor of (H + damp I)^-1, in float64. When H is too ill-conditioned the
    dampening grows tenfold until the factorisation succeeds."""
    damp = percdamp * torch.diagonal(h).mean()
    identity = torch.eye(h.shape[0], dtype=h.dtype)
    for _ in range(6):
        lower, info = torch.linalg.cholesky_ex(h + damp * identity)
        if info == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper
        damp = damp * 10
    raise ValueError("GPTQ: the Hessian is not positive definite even after dampening")


def _empty_grid(n: int, k: int, group_size: int, spec: QuantSpec) -> tuple[Tensor, Tensor | None]:
    groups = -(-k // group_size)
    scales = torch.zeros(n, groups, dtype=torch.float16)
    return scales, None if spec.symmetric else torch.zeros(n, groups, dtype=torch.float16)


def _group_grid(group_weights: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor | None]:
    """Round-to-nearest's scale (and offset) for one group of columns: (N,) float16 each."""
    scales, offsets = scales_for(group_weights, spec)
    return scales[:, 0], None if offsets is None else offsets[:, 0]


def _quantize_column(
    column: Tensor, scale: Tensor, offset: Tensor | None, bits: int
) -> tuple[Tensor, Tensor]:
    """The stored codes of one column (N,), given its float16 scale (N,) and offset (N,) or None,
    and the float values they dequantize to (what the kernels will multiply by)."""
    scale = scale.view(-1, 1)
    offset = None if offset is None else offset.view(-1, 1)
    q = codes_for(column.view(-1, 1), scale, offset, bits, 1)
    value = q.float() * scale.float()
    if offset is not None:
        value = value + offset.float()
    elif bits == 4:
        value = value - 8 * scale.float()
    return q[:, 0], value[:, 0]


def gptq_quantize_model(
    model: nn.Module,
    tokenizer,
    spec: QuantSpec,
    num_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    act_order: bool = False,
    include_embeddings: bool = True,
    batch_size: int = 8,
) -> nn.Module:
    """Quantize, in place, every linear layer of the decoder with GPTQ, one decoder layer at a time
    on WikiText-2 validation windows; the embedding and LM head (include_embeddings) get
    round-to-nearest (the paper keeps them in full precision; a tied head has no GPTQ inputs of its
    own that would also serve the embedding)."""
    samples = calibration_samples(tokenizer, num_samples, seq_len, seed)
    for _index, layer, inputs in layer_by_layer(model, samples, batch_size):
        stats = inputs.linear_stats(layer)
        for name, module in list(layer.named_modules()):
            if name in stats:
                qweight = gptq_quantize_weight(module.weight, stats[name].hessian, spec, act_order)
                replace_module(layer, name, QuantizedLinear(qweight, module.bias))
    return quantize_model(model, spec, include_embeddings=include_embeddings)
