"""Do kvlab's SnapKV / PyramidKV with `rule="kvpress"` keep what NVIDIA kvpress 0.5.5 keeps?

`make kvpress-compare` (or `python -m kvlab.bench.eval.kvpress_compare`): the same token ids (the first
`num_tokens` of a PG-19 book) go through the same model twice. kvpress runs in its own virtual
environment (it pins transformers < 5.3) via `scripts/kvpress/capture_kept.py`, which records the
positions its presses keep per (layer, kv-head). kvlab observes the post-RoPE queries and keys of one
float32 forward and asks each press for its selection at the budgets `kvlab.press.budget.Budget`
resolves, as `PressCache` does. Agreement = the fraction of (layer, kv-head, position) entries both
keep or both drop; the paper rule (max pooling, paper budgets) is shown for contrast.

Results: results/kvpress-compare/<experiment>/{report.md, results.json, config.yaml}.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

from kvlab.bench.core.datasets import load_text
from kvlab.bench.core.writer import SCHEMA_VERSION, claim_experiment_dir, experiment_dir, write_experiment
from kvlab.errors import ConfigError, KvlabError
from kvlab.models.adapters import observe
from kvlab.models.loader import load_model
from kvlab.press import get_press
from kvlab.press.base import Observations
from kvlab.press.budget import Budget

CAPTURE_SCRIPT = Path("scripts") / "kvpress" / "capture_kept.py"
PRESSES = ("snapkv", "pyramidkv")
RULES = ("kvpress", "paper")


@dataclass(slots=True)
class CompareConfig:
    """Defaults are kvpress 0.5.5's press defaults (window_size 64, kernel_size 5, beta 20)."""

    model: str = "smollm2-135m"
    dataset: str = "pg19"
    num_tokens: int = 1024
    compression_ratio: float = 0.5
    window: int = 64
    kernel: int = 5
    beta: float = 20.0
    kvpress_python: str = ".venv-kvpress/bin/python"
    experiment_name: str = "default"
    overwrite: bool = False

    def validate(self) -> None:
        if not 0.0 < self.compression_ratio < 1.0:
            raise ConfigError(f"compression_ratio must be in (0, 1), got {self.compression_ratio!r}")
        if self.num_tokens <= self.window + 1:
            raise ConfigError(f"num_tokens must exceed window + 1 = {self.window + 1}, got {self.num_tokens}")
        if not Path(self.kvpress_python).exists():
            raise ConfigError(
                f"no kvpress interpreter at {self.kvpress_python}; `make kvpress-compare` creates "
                ".venv-kvpress with kvpress==0.5.5"
            )


def kvpress_kept(config: CompareConfig, model_dir: str, input_ids: list[int]) -> dict:
    """Run kvpress in its own environment; its kept positions per press, [layer][kv_head] -> list."""
    request = {
        "model_dir": model_dir,
        "input_ids": input_ids,
        "compression_ratio": config.compression_ratio,
        "presses": {
            "snapkv": {"window_size": config.window, "kernel_size": config.kernel},
            "pyramidkv": {"window_size": config.window, "kernel_size": config.kernel, "beta": config.beta},
        },
    }
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env["HF_HUB_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory(prefix="kvpress-compare-") as scratch:
        request_path, answer_path = Path(scratch) / "request.json", Path(scratch) / "answer.json"
        request_path.write_text(json.dumps(request))
        command = [config.kvpress_python, str(CAPTURE_SCRIPT), str(request_path), str(answer_path)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise KvlabError(f"kvpress capture failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        return json.loads(answer_path.read_text())


def observed_prefill(model, input_ids: torch.Tensor) -> tuple[list, list, list, float]:
    """One float32 forward: per layer the post-RoPE queries, keys and values; and its scaling."""
    queries: dict[int, torch.Tensor] = {}
    cache = DynamicCache()
    with torch.inference_mode(), observe(model, on_queries=queries.__setitem__) as adapter:
        model(input_ids=input_ids, cache=cache, use_cache=True)
    layers = range(adapter.num_layers)
    keys = [cache.layers[i].keys for i in layers]
    values = [cache.layers[i].values for i in layers]
    return [queries[i] for i in layers], keys, values, adapter.scaling


def kvlab_kept(press, prefill, compression_ratio: float) -> list[list[list[int]]]:
    """The positions `press` keeps per [layer][kv_head] at the budgets `PressCache` would use."""
    queries, keys, values, scaling = prefill
    num_layers, n = len(keys), keys[0].shape[-2]
    budgets = Budget(compression_ratio=compression_ratio).layers(press, num_layers, n)
    kept = []
    for layer in range(num_layers):
        positions = torch.arange(n).expand(1, keys[layer].shape[1], n)
        obs = Observations(positions=positions, num_new=n, queries=queries[layer], scaling=scaling)
        obs.state = press.update_state(layer, keys[layer], obs)
        with torch.inference_mode():
            selection = press.keep(layer, keys[layer], values[layer], obs, budgets[layer])
        kept.append([sorted(row.tolist()) for row in selection.indices[0]])
    return kept


def agreement(reference: list, candidate: list, n: int) -> dict:
    """Fraction of (layer, head, position) entries kept by both or dropped by both, and the overlap of
    the kept sets; per layer too, to locate a disagreement."""
    per_layer, same_budget, overlap, kept_total = [], 0, 0, 0
    for ref_layer, cand_layer in zip(reference, candidate, strict=True):
        differ = 0
        for ref_head, cand_head in zip(ref_layer, cand_layer, strict=True):
            ref_set, cand_set = set(ref_head), set(cand_head)
            differ += len(ref_set ^ cand_set)
            overlap += len(ref_set & cand_set)
            kept_total += len(ref_set)
        same_budget += all(len(r) == len(c) for r, c in zip(ref_layer, cand_layer, strict=True))
        per_layer.append(1.0 - differ / (n * len(ref_layer)))
    num_layers = len(reference)
    return {
        "entry_agreement": sum(per_layer) / num_layers,
        "kept_overlap": overlap / kept_total,
        "worst_layer": min(range(num_layers), key=per_layer.__getitem__),
        "worst_layer_agreement": min(per_layer),
        "layers_with_kvpress_budget": same_budget,
        "per_layer": per_layer,
        "kept_per_layer": [len(layer[0]) for layer in candidate],
    }


def run_compare(config: CompareConfig) -> tuple[Path, dict]:
    config.validate()
    out_dir = experiment_dir("kvpress-compare", config.experiment_name)
    claim_experiment_dir(out_dir, config.overwrite)
    loaded = load_model(config.model, dtype="float32")
    text = load_text(config.dataset)
    ids = loaded.tokenizer(text.text, verbose=False)["input_ids"][: config.num_tokens]
    if len(ids) < config.num_tokens:
        raise ConfigError(f"{text.name} has {len(ids)} tokens, fewer than num_tokens={config.num_tokens}")
    model_dir = loaded.model.name_or_path
    if not Path(model_dir).is_dir():
        raise ConfigError(f"{config.model} was not loaded from a local directory; kvpress needs one")

    start = time.perf_counter()
    reference = kvpress_kept(config, model_dir, ids)
    kvpress_seconds = time.perf_counter() - start
    prefill = observed_prefill(loaded.model, torch.tensor([ids]))
    n = len(ids)
    rows = []
    for name in PRESSES:
        for rule in RULES:
            options = {"window": config.window, "kernel": config.kernel, "rule": rule}
            if name == "pyramidkv":
                options["beta"] = config.beta
            press = get_press(name, **options)
            scores = agreement(
                reference["kept"][name], kvlab_kept(press, prefill, config.compression_ratio), n
            )
            rows.append({"press": name, "rule": rule, "kvlab_press": press.describe(), **scores})
    payload = {
        "schema_version": SCHEMA_VERSION,
        "technique": "kvpress-compare",
        "model": config.model,
        "text": f"{text.name}, first {n} tokens",
        "num_tokens": n,
        "compression_ratio": config.compression_ratio,
        "kvpress": {
            **reference["versions"],
            "attn_implementation": reference["attn_implementation"],
            "seconds": round(kvpress_seconds, 1),
            "kept_per_layer": {
                name: [len(layer[0]) for layer in reference["kept"][name]] for name in PRESSES
            },
        },
        "kvlab_versions": {"torch": torch.__version__, "transformers": _version("transformers")},
        "rows": rows,
    }
    settings = {k: v for k, v in asdict(config).items() if k != "kvpress_python"}
    write_experiment(out_dir, payload, settings, plot=lambda _: [], render=render)
    return out_dir, payload


def render(payload: dict, plots: list) -> str:
    kvpress = payload["kvpress"]
    lines = [
        "# kvlab vs kvpress: kept positions of SnapKV and PyramidKV",
        "",
        f"Model {payload['model']} (float32), {payload['text']}, compression ratio "
        f"{payload['compression_ratio']}. kvpress {kvpress['kvpress']} (transformers "
        f"{kvpress['transformers']}, torch {kvpress['torch']}, attention {kvpress['attn_implementation']}) "
        f"in its own virtual environment; kvlab with transformers {payload['kvlab_versions']['transformers']}.",
        "",
        "Agreement: fraction of (layer, kv-head, position) entries that both keep or both drop. "
        "Kept overlap: kept positions common to both, over kvpress' kept count.",
        "",
        "| press | kvlab rule | agreement | kept overlap | worst layer (agreement) | layers at kvpress' budget |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in payload["rows"]:
        lines.append(
            f"| {row['press']} | {row['rule']} | {row['entry_agreement']:.2%} | {row['kept_overlap']:.2%} "
            f"| {row['worst_layer']} ({row['worst_layer_agreement']:.2%}) "
            f"| {row['layers_with_kvpress_budget']}/{len(row['per_layer'])} |"
        )
    lines += [
        "",
        "kvlab presses: " + "; ".join(f"`{row['kvlab_press']}`" for row in payload["rows"]) + ".",
        "",
        "PyramidKV tokens kept per layer, kvpress: "
        + ", ".join(map(str, kvpress["kept_per_layer"]["pyramidkv"])),
        "",
    ]
    return "\n".join(lines)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main(argv: list[str] | None = None) -> int:
    defaults = CompareConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for field_name, value in asdict(defaults).items():
        flag = "--" + field_name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type=type(value), default=value)
    config = CompareConfig(**vars(parser.parse_args(argv)))
    try:
        out_dir, payload = run_compare(config)
    except KvlabError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(render(payload, []))
    print(f"written to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
