"""Rotary position embedding (RoPE, Su et al. 2021, "RoFormer", arXiv:2104.09864) in one place.

Convention: "rotate half" on the first `rotary_dim` channels of each head, as HF Llama and GPT-NeoX
use it: for x = [x1, x2] (halves of the rotary part), R(p) x = [x1 cos - x2 sin, x2 cos + x1 sin]
with angles p * inv_freq. Rotations compose, R(a + b) = R(b) R(a), and scores depend only on
q_pos - k_pos (Eq. 16), which is what key re-rotation relies on.

- `RotaryEmbedding`: cos/sin tables for the engine-native models (kvlab/models/), rotated in place.
- `apply_rotary`: HF-layout rotation with the cos/sin an HF model computed (observation hooks).
- `RotarySpec` + `rotate_keys_`: move already-rotated keys by a position delta (presses, caches).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from kvlab.errors import ConfigError
from kvlab.kernels import cpu as cpu_kernels


@dataclass(frozen=True, slots=True)
class RotarySpec:
    """A model's rotary embedding as a press or cache needs it: inverse frequencies on `rotary_dim` channels."""

    inv_freq: Tensor  # (rotary_dim // 2,) float32
    rotary_dim: int


def rope_inverse_frequencies(config, rotary_dim: int) -> tuple[Tensor, float]:
    """(rotary_dim // 2,) float32 inverse frequencies and the cos/sin scaling factor.

    Default RoPE: inv_freq_i = theta^(-2i / rotary_dim), theta from `config.rope_parameters["rope_theta"]`.
    Scaled variants (linear, llama3, yarn, ...) are static functions of the config, so transformers'
    own initialisers are reused for them; dynamic scaling depends on the sequence length and is refused.
    """
    legacy = {"rope_theta": getattr(config, "rope_theta", 10000.0)}
    params = getattr(config, "rope_parameters", None) or legacy
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
        return 1.0 / (float(params["rope_theta"]) ** exponents), 1.0
    if rope_type == "dynamic":
        raise ConfigError(
            "dynamic RoPE rescales with sequence length; engine-native models do not support it"
        )
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.float(), float(scaling)


class RotaryEmbedding:
    """Precomputed cos/sin tables, (num_positions, rotary_dim // 2) each, in the model dtype.

    The tables start at the model's context (`max_position_embeddings`); `reserve(n)` extends them
    for callers that feed true positions past it (streaming with a bounded cache, as the HF model's
    on-the-fly RoPE allows).
    """

    def __init__(self, config, rotary_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.inv_freq, self.scaling = rope_inverse_frequencies(config, rotary_dim)
        self.rotary_dim = rotary_dim
        self.dtype, self.device = dtype, device
        self.cos = self.sin = torch.empty(0)
        self.num_positions = 0
        self.reserve(int(config.max_position_embeddings))

    @property
    def spec(self) -> RotarySpec:
        return RotarySpec(inv_freq=self.inv_freq, rotary_dim=self.rotary_dim)

    def reserve(self, num_positions: int) -> None:
        """Make the tables cover positions 0..num_positions - 1 (never shrinks them)."""
        if num_positions <= self.num_positions:
            return
        angles = torch.outer(torch.arange(num_positions, dtype=torch.float32), self.inv_freq)
        self.cos = (angles.cos() * self.scaling).to(device=self.device, dtype=self.dtype)
        self.sin = (angles.sin() * self.scaling).to(device=self.device, dtype=self.dtype)
        self.num_positions = num_positions

    def tables(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin for `positions` (T,), shaped (T, rotary_dim // 2): looked up once per step."""
        return self.cos[positions], self.sin[positions]

    def rotate_(self, x: Tensor, cos: Tensor, sin: Tensor) -> None:
        """Rotate x (T, heads, head_dim) in place (x may be a view into the fused QKV output)."""
        if cpu_kernels.handles(x):
            cpu_kernels.rotary_(x, cos, sin)
            return
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        x1, x2 = x[..., : self.rotary_dim].chunk(2, dim=-1)
        x1_sin = x1 * sin  # the one temporary: x1 is overwritten before x2 needs it
        x1.mul_(cos).addcmul_(x2, sin, value=-1.0)
        x2.mul_(cos).add_(x1_sin)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on the first `rot` channels of x (batch, heads, seq, dim); cos, sin (batch, seq, rot) as an
    HF model's rotary embedding returns them (both halves repeated)."""
    rot = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]
    rotated = x[..., :rot] * cos + rotate_half(x[..., :rot]) * sin
    return torch.cat((rotated, x[..., rot:]), dim=-1) if rot < x.shape[-1] else rotated


def delta_tables(delta: Tensor, rotary: RotarySpec) -> tuple[Tensor, Tensor]:
    """float32 cos, sin of R(delta): shapes delta.shape + (rotary_dim // 2,)."""
    angles = delta[..., None].float() * rotary.inv_freq.to(delta.device)
    return angles.cos(), angles.sin()


def rotate_by_(out: Tensor, x: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int) -> Tensor:
    """out[..., :rotary_dim] = R x[..., :rotary_dim] for float32 cos/sin broadcastable to (..., rot/2),
    computed in float32 and written in out's dtype; out may alias x. Channels past rotary_dim are untouched."""
    half = rotary_dim // 2
    x1, x2 = x[..., :half].float(), x[..., half:rotary_dim].float()
    first, second = x1 * cos - x2 * sin, x2 * cos + x1 * sin  # both before writing: out may alias x
    out[..., :half] = first
    out[..., half:rotary_dim] = second
    return out


def rotate_keys_(keys: Tensor, delta: Tensor, rotary: RotarySpec) -> Tensor:
    """Move RoPE'd keys (batch, heads, n, dim) in place by `delta` (batch, heads, n): R(p + d) = R(d) R(p)."""
    cos, sin = delta_tables(delta, rotary)
    return rotate_by_(keys, keys, cos, sin, rotary.rotary_dim)
