"""EngineConfig: the validated, strict configuration of the serving engine.

Built directly (`EngineConfig(block_size=16, num_blocks=256)`), from a dict or from YAML
(`EngineConfig.from_yaml(path)`); an unknown key raises ConfigError naming the valid keys.
"""

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from kvlab.errors import ConfigError
from kvlab.quant.kv_quant import KV_CACHE_DTYPES, KVQuantSpec

PdPolicy = Literal["strict", "time_share", "hybrid"]
PD_POLICIES: tuple[str, ...] = ("strict", "time_share", "hybrid")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
DEVICES: tuple[str, ...] = ("cpu", "cuda", "auto")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How the engine lays out the KV cache and schedules work.

    The KV pool size is `num_blocks` if given, else `kv_cache_memory_bytes` divided by the bytes of
    one block (known only once the model is loaded: `resolve_num_blocks`), else `DEFAULT_NUM_BLOCKS`.

    pd_policy (how prefill and decode share a step):
      strict      prefills first; a step holds only prefills or only decodes (never mixed)
      time_share  steps alternate between prefill-only and decode-only when both kinds are pending
      hybrid      decodes first, the rest of the token budget goes to prefill chunks (vLLM v1 style)
    """

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    pd_policy: PdPolicy = "hybrid"
    attention_backend: str = "auto"  # sdpa on CPU, triton on CUDA; "reference" is the ground truth
    dtype: str = "float32"
    device: str = "cpu"
    quantization: str | None = None  # weights: int8, int4-g128, gptq-/awq-<spec>, gguf (kvlab.quant.methods)
    # "int8" / "int4" store K/V blocks quantized (per token, groups of kv_cache_group_size channels,
    # float16 scale and zero per group; kvlab/quant/paged_kv.py), so a byte budget holds more blocks.
    kv_cache_dtype: str = "auto"
    kv_cache_group_size: int = 32

    DEFAULT_NUM_BLOCKS = 512  # class constant (not a field): slots excludes it from instances

    def __post_init__(self):
        if self.quantization is not None:
            from kvlab.quant.methods import parse_method

            if parse_method(self.quantization).kind not in ("weights", "gguf"):
                raise ConfigError(
                    f"quantization {self.quantization!r} is not a weight quantization; choose int8, "
                    "int4-g128 (any weight spec), gptq-<spec>, awq-<spec> or gguf"
                )
        _check_positive("block_size", self.block_size)
        _check_positive("max_num_seqs", self.max_num_seqs)
        _check_positive("max_num_batched_tokens", self.max_num_batched_tokens)
        if self.num_blocks is not None:
            _check_positive("num_blocks", self.num_blocks)
        if self.kv_cache_memory_bytes is not None:
            _check_positive("kv_cache_memory_bytes", self.kv_cache_memory_bytes)
        if self.num_blocks is not None and self.kv_cache_memory_bytes is not None:
            raise ConfigError("give num_blocks or kv_cache_memory_bytes, not both")
        if self.max_model_len is not None:
            _check_positive("max_model_len", self.max_model_len)
            if not self.enable_chunked_prefill and self.max_model_len > self.max_num_batched_tokens:
                # Without chunking a whole prompt must fit one step, or it could never be scheduled.
                raise ConfigError(
                    f"max_model_len ({self.max_model_len}) > max_num_batched_tokens "
                    f"({self.max_num_batched_tokens}) needs enable_chunked_prefill=True"
                )
        if self.pd_policy not in PD_POLICIES:
            raise ConfigError(f"unknown pd_policy {self.pd_policy!r}; choose one of {', '.join(PD_POLICIES)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.kv_cache_dtype not in ("auto", *KV_CACHE_DTYPES):
            raise ConfigError(
                f"unknown kv_cache_dtype {self.kv_cache_dtype!r}; choose one of auto, {', '.join(KV_CACHE_DTYPES)}"
            )
        _check_positive("kv_cache_group_size", self.kv_cache_group_size)
        if self.device not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        for name in ("enable_prefix_caching", "enable_chunked_prefill"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def kv_quant(self) -> KVQuantSpec | None:
        """The blocks' quantization, None for K/V in the model dtype. The engine keeps no residual
        window (every slot is quantized when written)."""
        if self.kv_cache_dtype == "auto":
            return None
        group = self.kv_cache_group_size
        return KVQuantSpec(KV_CACHE_DTYPES[self.kv_cache_dtype], group_size=group, residual_length=group)

    def resolve_num_blocks(self, bytes_per_block: int) -> int:
        """Blocks in the pool.

        bytes_per_block = 2 (K and V) * layers * block_size * kv_heads * head_dim * itemsize, or with
        a quantized cache 2 * layers * block_size * kv_heads * (code bytes + 4 per group).
        """
        if self.num_blocks is not None:
            return self.num_blocks
        if self.kv_cache_memory_bytes is None:
            return self.DEFAULT_NUM_BLOCKS
        num_blocks = self.kv_cache_memory_bytes // bytes_per_block
        if num_blocks < 1:
            raise ConfigError(
                f"kv_cache_memory_bytes={self.kv_cache_memory_bytes} is smaller than one block "
                f"({bytes_per_block} bytes)"
            )
        return num_blocks

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "EngineConfig":
        valid = [f.name for f in fields(cls)]
        for key in values:
            if key not in valid:
                raise ConfigError(f"unknown engine config key {key!r}; valid keys: {', '.join(valid)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "EngineConfig":
        import yaml

        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as error:
            raise ConfigError(f"cannot read engine config {path}: {error}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"engine config {path} must be a mapping of keys to values")
        return cls.from_dict(values)


def _check_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
