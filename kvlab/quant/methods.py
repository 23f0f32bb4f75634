"""The quantization bench's methods: what each row of the report runs, and how its model is built from
the float32 model the baseline runs.

    float32, bfloat16               the model at that dtype (kvlab.generate, engine-native twin)
    int8, int4-g128, int4-g64-asym  round-to-nearest weights (kvlab.quant.rtn); `rtn-` prefix optional
    gptq-<spec>, awq-<spec>         calibrated weights (kvlab.quant.gptq / awq), cached on disk
    gguf                            the embedded GGUF's own quantized tensors, loaded natively
    kv-int8, kv-int4                float32 weights, KV cache quantized (kvlab.quant.kv_cache)
    bnb-int8, bnb-nf4               bitsandbytes through transformers (CUDA only; skipped on CPU)
"""

import copy
from dataclasses import dataclass, replace

from kvlab.errors import ConfigError
from kvlab.quant.formats import QuantSpec

WEIGHT_QUANTIZERS = ("rtn", "gptq", "awq")


@dataclass(frozen=True, slots=True)
class Method:
    name: str
    kind: str  # "dtype", "weights", "gguf", "kv", "bnb"
    dtype: str = "float32"
    quantizer: str | None = None  # rtn / gptq / awq for "weights"
    spec: QuantSpec | None = None
    kv_bits: int | None = None
    bnb: str | None = None

    @property
    def needs_cuda(self) -> bool:
        return self.kind == "bnb"


def parse_method(name: str) -> Method:
    """A method name -> what it runs; ConfigError naming the choices for anything else."""
    text = name.strip().lower()
    if text in ("float32", "bfloat16", "float16"):
        return Method(name, "dtype", dtype=text)
    if text == "gguf":
        return Method(name, "gguf")
    if text in ("kv-int8", "kv-int4"):
        return Method(name, "kv", kv_bits=int(text[-1]))
    if text in ("bnb-int8", "bnb-nf4"):
        return Method(name, "bnb", bnb=text[4:])
    quantizer, _, rest = text.partition("-")
    if quantizer not in WEIGHT_QUANTIZERS:
        quantizer, rest = "rtn", text
    try:
        spec = QuantSpec.parse(rest)
    except ConfigError as error:
        raise ConfigError(
            f"unknown quantization method {name!r} ({error}); methods: float32, bfloat16, int8, "
            "int4-g128 (any weight spec, optionally rtn-/gptq-/awq- prefixed), gguf, kv-int8, kv-int4, "
            "bnb-int8, bnb-nf4"
        ) from None
    return Method(name, "weights", quantizer=quantizer, spec=spec)


def build_variant(method: Method, float_model, load, config):
    """The HF model `method` runs, derived from `float_model` (the float32 baseline's, left untouched).
    `load(dtype)` loads the configured model at a dtype; `config` is the bench's QuantBenchConfig."""
    if method.kind == "dtype":
        return float_model if method.dtype == "float32" else load(method.dtype)
    if method.kind == "kv":
        return float_model
    if method.kind == "weights":
        from kvlab.quant.modules import quantize_model

        if method.quantizer == "rtn":
            model = copy.deepcopy(float_model)
            return quantize_model(model, method.spec, include_embeddings=config.include_embeddings)
        return calibrated_variant(method, config)
    if method.kind == "gguf":
        return gguf_variant(config)
    return bitsandbytes_variant(method, float_model, config)


def calibrated_variant(method: Method, config):
    """GPTQ / AWQ weights, from the on-disk cache or calibrated now (seeded, wikitext-2 validation)."""
    from kvlab.quant.checkpoint import cached_quantized

    return cached_quantized(
        config.model,
        method.quantizer,
        method.spec,
        num_samples=config.calibration.num_samples,
        seq_len=config.calibration.seq_len,
        seed=config.calibration.seed,
        act_order=config.calibration.act_order and method.quantizer == "gptq",
        include_embeddings=config.include_embeddings,
    ).model


def bitsandbytes_variant(method: Method, float_model, config):
    """bitsandbytes LLM.int8() or NF4 weights through transformers' BitsAndBytesConfig (CUDA only): the
    float model is saved once to a temporary directory and loaded back with the quantization config,
    which is how transformers applies it."""
    import tempfile

    import torch

    if config.device != "cuda" or not torch.cuda.is_available():
        raise ConfigError(f"method {method.name!r} needs CUDA (bitsandbytes); this run is on {config.device}")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if method.bnb == "int8":
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16
        )
    with tempfile.TemporaryDirectory() as directory:
        float_model.save_pretrained(directory)
        return AutoModelForCausalLM.from_pretrained(
            directory, quantization_config=quantization, device_map="cuda"
        ).eval()


def gguf_variant(config):
    """The configured model's GGUF tensors loaded in their own quantized formats (no re-quantization)."""
    from kvlab.models.loader import resolve_device
    from kvlab.quant.gguf import load_gguf_quantized

    return load_gguf_quantized(config.model, device=resolve_device(config.device).type).model


def quantize_loaded(loaded, method_name: str, include_embeddings: bool = True, **calibration):
    """`loaded` (a LoadedModel) with its weights quantized by a weight method (int8, int4-g128,
    gptq-int4-g128, awq-..., gguf): the option behind `LLM(..., quantization=...)` and
    `kvlab generate --quantization`. The model is changed in place (a GGUF method reloads it).
    `calibration`: num_samples, seq_len, seed for GPTQ / AWQ."""
    from kvlab.quant.modules import quantize_model

    method = parse_method(method_name)
    if method.kind == "gguf":
        from kvlab.quant.gguf import load_gguf_quantized

        dtype = next(p for p in loaded.model.parameters()).dtype
        return load_gguf_quantized(loaded.name, dtype=dtype, device=str(loaded.model.device))
    if method.kind != "weights":
        raise ConfigError(
            f"{method_name!r} is not a weight quantization; choose int8, int4-g128 (any weight spec), "
            "gptq-<spec>, awq-<spec> or gguf"
        )
    if method.quantizer == "rtn":
        quantize_model(loaded.model, method.spec, include_embeddings=include_embeddings)
        return loaded
    from kvlab.quant.checkpoint import cached_quantized

    model = cached_quantized(
        loaded.name, method.quantizer, method.spec, include_embeddings=include_embeddings, **calibration
    )
    return replace(loaded, model=model)
