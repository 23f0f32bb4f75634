"""Quantized checkpoints: a saved and reloaded model gives bit-identical logits (RTN, GPTQ, AWQ,
whose RMSNorm weights changed), a tied head stays tied and is stored once, and the cache calibrates
once per set of settings."""

import json

import pytest
import torch
from safetensors import safe_open

from kvlab.models.loader import load_model
from kvlab.quant import checkpoint
from kvlab.quant.awq import awq_quantize_model
from kvlab.quant.calibration import calibration_samples
from kvlab.quant.checkpoint import cached_quantized, load_quantized, save_quantized
from kvlab.quant.formats import QuantSpec
from kvlab.quant.gptq import gptq_quantize_model
from kvlab.quant.modules import QuantizedEmbedding, QuantizedLinear, quantize_model

SPEC = QuantSpec.parse("int4-g32-asym")
CALIBRATION = {"num_samples": 2, "seq_len": 16}


def quantize(loaded, method: str, include_embeddings: bool = True):
    if method == "rtn":
        quantize_model(loaded.model, SPEC, include_embeddings=include_embeddings)
    elif method == "gptq":
        gptq_quantize_model(
            loaded.model, loaded.tokenizer, SPEC, include_embeddings=include_embeddings, **CALIBRATION
        )
    else:
        awq_quantize_model(
            loaded.model, loaded.tokenizer, SPEC, include_embeddings=include_embeddings, **CALIBRATION
        )
    return loaded


def logits(loaded) -> torch.Tensor:
    ids = calibration_samples(loaded.tokenizer, 2, seq_len=12, seed=7)
    with torch.no_grad():
        return loaded.model(ids).logits


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_round_trip_gives_bit_identical_logits(method, tiny_llama, tmp_path):
    saved = quantize(tiny_llama, method)
    save_quantized(saved.model, tmp_path, {"method": method, "spec": SPEC.name})
    # A different seed: every weight the checkpoint holds must come from the checkpoint.
    fresh = load_model("tiny-llama", seed=1)
    load_quantized(fresh.model, tmp_path)
    assert torch.equal(logits(fresh), logits(saved))
    embedding, head = fresh.model.get_input_embeddings(), fresh.model.get_output_embeddings()
    assert isinstance(embedding, QuantizedEmbedding) and isinstance(head, QuantizedLinear)
    assert head.qweight is embedding.qweight
    assert fresh.model.config.kvlab_quantization == SPEC.name


def test_a_tied_head_is_stored_once_and_described(tiny_llama, tmp_path):
    saved = quantize(tiny_llama, "rtn")
    save_quantized(saved.model, tmp_path, {"method": "rtn", "spec": SPEC.name, "seed": 0})
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as file:
        keys = set(file.keys())
    assert "model.embed_tokens.qdata" in keys and "lm_head.qdata" not in keys
    info = json.loads((tmp_path / "quantization.json").read_text())
    assert info["method"] == "rtn" and info["spec"] == "int4-g32-asym"
    head = next(m for m in info["modules"] if m["name"] == "lm_head")
    # an int4 model keeps its embedding table (and so the tied head) at int8 per channel
    assert head["shares"] == "model.embed_tokens" and head["bits"] == 8
    assert len(info["modules"]) == 1 + 2 * 7 + 1


def test_round_trip_without_quantized_embeddings(tiny_llama, tmp_path):
    saved = quantize(tiny_llama, "rtn", include_embeddings=False)
    save_quantized(saved.model, tmp_path, {"method": "rtn", "spec": SPEC.name})
    fresh = load_model("tiny-llama", seed=1)
    load_quantized(fresh.model, tmp_path)
    assert torch.equal(logits(fresh), logits(saved))
    assert fresh.model.get_output_embeddings().weight is fresh.model.get_input_embeddings().weight


def test_cache_calibrates_once_per_settings(tmp_path, monkeypatch):
    first = cached_quantized("tiny-llama", "gptq", "int4-g32", cache_root=tmp_path, **CALIBRATION)
    (directory,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert directory.name.startswith("tiny-llama-gptq-int4-g32-")

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated again although the checkpoint is cached")

    monkeypatch.setattr(checkpoint, "gptq_quantize_model", no_calibration)
    again = cached_quantized("tiny-llama", "gptq", "int4-g32", cache_root=tmp_path, **CALIBRATION)
    assert torch.equal(logits(again), logits(first))
    with pytest.raises(AssertionError, match="calibrated again"):
        cached_quantized("tiny-llama", "gptq", "int4-g32", cache_root=tmp_path, seed=1, **CALIBRATION)
