"""Record which positions NVIDIA kvpress keeps, per (layer, kv-head), for kvlab's comparison.

Runs inside the separate kvpress virtual environment (kvpress 0.5.5 pins transformers < 5.3, kvlab
needs >= 5.3), so it imports torch, transformers and kvpress only -- never kvlab. Driven by
`kvlab.bench.eval.kvpress_compare`, which writes the request and reads the answer:

    python scripts/kvpress/capture_kept.py REQUEST.json ANSWER.json

REQUEST: {"model_dir", "input_ids": [int], "compression_ratio", "presses": {name: {kvpress kwargs}}}
ANSWER:  {"versions": {...}, "kept": {name: [layer][kv_head] -> sorted kept positions}}

kvpress' `compress` returns the kept key rows gathered from the cache, not their indices; the
positions are recovered by matching each kept row to the identical row of the uncompressed keys
(RoPE rotates every position differently, so rows are distinct).
"""

import json
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache

# kvpress class names by kvlab press name (kvpress is imported in main(): kvlab's tests import this
# file for `kept_positions` without it).
PRESSES = {"snapkv": "SnapKVPress", "pyramidkv": "PyramidKVPress"}


def kept_positions(original: torch.Tensor, kept: torch.Tensor) -> list[list[int]]:
    """original (1, heads, n, dim), kept (1, heads, k, dim) -> per head, the sorted positions kept."""
    per_head = []
    for head in range(original.shape[1]):
        row_to_position = {row.tobytes(): i for i, row in enumerate(original[0, head].float().numpy())}
        try:
            positions = sorted(row_to_position[row.tobytes()] for row in kept[0, head].float().numpy())
        except KeyError:
            raise RuntimeError(f"head {head}: a kept key row matches no cached row") from None
        if len(row_to_position) != original.shape[2] or len(set(positions)) != len(positions):
            raise RuntimeError(f"head {head}: cached key rows are not distinct")
        per_head.append(positions)
    return per_head


def capturing(press_class: type) -> type:
    class Capturing(press_class):
        """The kvpress press, recording the kept positions of every layer it compresses."""

        def compress(self, module, hidden_states, keys, values, attentions, kwargs):
            new_keys, new_values = super().compress(module, hidden_states, keys, values, attentions, kwargs)
            self.kept[module.layer_idx] = kept_positions(keys, new_keys)
            return new_keys, new_values

    return Capturing


def main(request_path: str, answer_path: str) -> None:
    import kvpress

    with open(request_path) as file:
        request = json.load(file)
    model = AutoModelForCausalLM.from_pretrained(
        request["model_dir"], dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    input_ids = torch.tensor([request["input_ids"]])
    kept, seconds = {}, {}
    for name, options in request["presses"].items():
        press = capturing(getattr(kvpress, PRESSES[name]))(
            compression_ratio=request["compression_ratio"], **options
        )
        press.kept = {}
        start = time.perf_counter()
        with torch.inference_mode(), press(model):
            model(input_ids=input_ids, past_key_values=DynamicCache(), use_cache=True)
        seconds[name] = time.perf_counter() - start
        kept[name] = [press.kept[layer] for layer in sorted(press.kept)]
    answer = {
        "versions": {
            "kvpress": _version("kvpress"),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "attn_implementation": model.config._attn_implementation,
        "seconds": seconds,
        "kept": kept,
    }
    with open(answer_path, "w") as file:
        json.dump(answer, file)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: capture_kept.py REQUEST.json ANSWER.json")
    main(sys.argv[1], sys.argv[2])
