"""Quantized checkpoints: calibrate once, load in a second.

A directory holds two files:

    model.safetensors    every quantized module's qdata / scales / offsets (under "<module>.qdata" ...)
                         and every other tensor of the state dict that the quantizer may have changed
                         (AWQ rewrites the RMSNorm weights; biases stay float)
    quantization.json    the method and its settings (spec, seed, samples, ...) and one entry per
                         quantized module: its kind, bits, group size, K, and the module it shares
                         its weight with (a tied LM head), so loading rebuilds the same sharing

Loading starts from a freshly loaded base model of the same architecture and swaps in the stored
modules, so the checkpoint needs no code of its own to build the model. safetensors refuses tensors
that share storage; each shared weight is therefore written once, under its first module's name.
"""

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kvlab.errors import ConfigError
from kvlab.models.loader import LoadedModel, cache_dir, load_model
from kvlab.quant.awq import awq_quantize_model
from kvlab.quant.formats import QuantizedWeight, QuantSpec
from kvlab.quant.gptq import gptq_quantize_model
from kvlab.quant.modules import (
    QuantizedEmbedding,
    QuantizedLinear,
    default_embedding_spec,
    place_weights,
    quantize_model,
    replace_module,
)

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "quantization.json"
METHODS = ("rtn", "gptq", "awq")
_PARTS = ("qdata", "scales", "offsets")


def save_quantized(model: nn.Module, directory: str | os.PathLike, method_info: dict) -> Path:
    """Write `model`'s quantized modules and remaining tensors to `directory` (created)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, modules, owner_of = {}, [], {}
    quantized = {
        name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear | QuantizedEmbedding)
    }
    for name, module in quantized.items():
        qweight = module.qweight
        owner = owner_of.setdefault(id(qweight.data), name)
        modules.append(
            {
                "name": name,
                "kind": "embedding" if isinstance(module, QuantizedEmbedding) else "linear",
                "bits": qweight.bits,
                "group_size": qweight.group_size,
                "in_features": qweight.in_features,
                "symmetric": qweight.offsets is None,
                "shares": None if owner == name else owner,
                "dtype": str(module.dtype).removeprefix("torch.")
                if isinstance(module, QuantizedEmbedding)
                else None,
            }
        )
        if owner == name:
            for part, tensor in zip(_PARTS, (qweight.data, qweight.scales, qweight.offsets), strict=True):
                if tensor is not None:
                    tensors[f"{name}.{part}"] = tensor.contiguous().cpu()
    quantized_keys = {f"{name}.{part}" for name in quantized for part in _PARTS}
    seen = set()
    for key, tensor in model.state_dict().items():
        # A float weight tied to another (an unquantized tied head) is stored once.
        identity = (tensor.data_ptr(), tuple(tensor.shape))
        if key in quantized_keys or identity in seen:
            continue
        seen.add(identity)
        tensors[key] = tensor.contiguous().cpu()
    save_file(tensors, str(directory / WEIGHTS_FILE))
    info = {"format_version": FORMAT_VERSION, **method_info, "modules": modules}
    (directory / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return directory


def load_quantized(base_model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Swap the stored quantized modules into `base_model` (same architecture, float) and load the
    stored float tensors over its own; returns the model, quantized in place."""
    directory = Path(directory)
    info = json.loads((directory / INFO_FILE).read_text())
    if info.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{directory} holds quantized checkpoint format {info.get('format_version')}")
    tensors = load_file(str(directory / WEIGHTS_FILE))
    weights: dict[str, QuantizedWeight] = {}
    for entry in info["modules"]:
        name = entry["name"]
        if entry["shares"] is not None:
            qweight = weights[entry["shares"]]
        else:
            qweight = QuantizedWeight(
                tensors.pop(f"{name}.qdata"),
                tensors.pop(f"{name}.scales"),
                tensors.pop(f"{name}.offsets", None),
                entry["bits"],
                entry["group_size"],
                entry["in_features"],
            )
        weights[name] = qweight
        if entry["kind"] == "embedding":
            module = QuantizedEmbedding(qweight, getattr(torch, entry["dtype"]))
        else:
            module = QuantizedLinear(qweight, tensors.pop(f"{name}.bias", None))
        replace_module(base_model, name, module)
    _load_float_tensors(base_model, tensors)
    base_model.config.kvlab_quantization = info.get("spec")
    place_weights(base_model)
    return base_model


def _load_float_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    state = model.state_dict(keep_vars=True)
    unknown = sorted(set(tensors) - set(state))
    if unknown:
        raise ConfigError(f"the checkpoint has tensors the model lacks: {', '.join(unknown[:5])}")
    with torch.no_grad():
        for key, tensor in tensors.items():
            state[key].copy_(tensor)


def settings_digest(settings: dict) -> str:
    """A short name for a set of quantization settings: equal settings, equal cache directory."""
    text = json.dumps({"format_version": FORMAT_VERSION, **settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def cached_quantized(
    model_name: str,
    method: str,
    spec: QuantSpec | str,
    num_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    act_order: bool = False,
    include_embeddings: bool = True,
    cache_root: str | os.PathLike | None = None,
) -> LoadedModel:
    """`model_name` quantized by `method` (rtn, gptq, awq) under `spec`: loaded from
    <cache_root>/<model>-<method>-<spec>-<digest of the settings> when a run with the same
    settings saved it there (default cache root: $KVLAB_CACHE/quantized), else calibrated and saved."""
    if method not in METHODS:
        raise ConfigError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    spec = QuantSpec.parse(spec) if isinstance(spec, str) else spec
    settings = {
        "model": model_name,
        "method": method,
        "spec": spec.name,
        "include_embeddings": include_embeddings,
        "embedding_spec": default_embedding_spec(spec).name if include_embeddings else None,
    }
    if method != "rtn":
        settings |= {
            "num_samples": num_samples,
            "seq_len": seq_len,
            "seed": seed,
            "calibration": "wikitext2 validation",
        }
    if method == "gptq":
        settings["act_order"] = act_order
    root = Path(cache_root) if cache_root is not None else cache_dir() / "quantized"
    safe_name = model_name.replace("/", "--")
    directory = root / f"{safe_name}-{method}-{spec.name}-{settings_digest(settings)}"
    loaded = load_model(model_name)
    if (directory / INFO_FILE).is_file():
        load_quantized(loaded.model, directory)
        return loaded
    started = time.perf_counter()
    _quantize(loaded, method, spec, settings, act_order)
    info = {
        **settings,
        "bits": spec.bits,
        "group_size": spec.group_size,
        "granularity": spec.granularity,
        "symmetric": spec.symmetric,
        "seconds": round(time.perf_counter() - started, 1),
    }
    # Written beside the target and renamed, so a concurrent or interrupted run never leaves a
    # half-written checkpoint where a later run would load it.
    root.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=root, prefix=f".{directory.name}-"))
    save_quantized(loaded.model, partial, info)
    try:
        partial.rename(directory)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
    return loaded


def _quantize(loaded: LoadedModel, method: str, spec: QuantSpec, settings: dict, act_order: bool) -> None:
    include = settings["include_embeddings"]
    if method == "rtn":
        quantize_model(loaded.model, spec, include_embeddings=include)
        return
    calibration = {k: settings[k] for k in ("num_samples", "seq_len", "seed")}
    if method == "gptq":
        gptq_quantize_model(
            loaded.model,
            loaded.tokenizer,
            spec,
            act_order=act_order,
            include_embeddings=include,
            **calibration,
        )
    else:
        awq_quantize_model(loaded.model, loaded.tokenizer, spec, include_embeddings=include, **calibration)
