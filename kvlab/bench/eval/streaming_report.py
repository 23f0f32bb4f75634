"""`kvlab ppl --mode streaming`: StreamingLLM's experiment (Xiao et al. 2023, Fig. 3) on any model.

Each configuration decodes the same text token by token; the table and the plot of cumulative PPL vs
tokens compare full cache (stops at the context), window only, StreamingLLM, H2O, TOVA and the
sliding-window-with-recompute oracle.
"""

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from kvlab.bench.core.machine import machine_info, prepare_kernels
from kvlab.bench.core.writer import portable
from kvlab.bench.eval.banded_ring import CHUNK_TOKENS
from kvlab.bench.eval.perplexity import tokenize
from kvlab.bench.eval.streaming_ppl import STREAMING_CONFIGS, streaming_ppl
from kvlab.errors import ConfigError
from kvlab.models.loader import load_model

DEFAULT_CONFIGS = ["full", "window", "streaming_llm", "recompute"]


@dataclass(slots=True)
class StreamingConfig:
    """What `kvlab ppl --mode streaming` compares; checked by `validate` before any model loads."""

    dataset: str = "wikitext2"
    data_dir: str | None = None  # where the text was read from (made portable in the results)
    configs: list[str] = field(default_factory=lambda: list(DEFAULT_CONFIGS))
    cache_tokens: int = 1024  # KV budget per layer
    score_from: int = 1  # PPL over tokens from this index on (e.g. past the model's context)
    max_tokens: int | None = None
    model: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "cpu"
    output: Path | None = None  # default results/streaming-ppl/<model>-<dataset>

    def validate(self) -> None:
        for name in self.configs:
            if name not in STREAMING_CONFIGS:
                raise ConfigError(
                    f"unknown streaming configuration {name!r}; choose from {', '.join(STREAMING_CONFIGS)}"
                )
        if self.cache_tokens < 2:
            raise ConfigError(f"--cache-tokens must be >= 2, got {self.cache_tokens}")


def run_streaming(config: StreamingConfig, text, command: str) -> Path:
    """Every configuration on the same tokens of `text` (a `datasets.Text`); returns the report dir."""
    config.validate()
    configs, score_from = config.configs, config.score_from
    prepare_kernels()
    loaded = load_model(config.model, dtype=config.dtype, device=config.device)
    ids = tokenize(loaded.tokenizer, text.text)[0][: config.max_tokens]
    if not 1 <= score_from < ids.numel():
        raise ConfigError(f"--score-from must be in [1, {ids.numel() - 1}] for this text, got {score_from}")
    output = (
        config.output
        or Path("results") / "streaming-ppl" / f"{loaded.name}-{config.dataset.replace(':', '-')}"
    )
    rows = {}
    for name in configs:
        total = min(ids.numel(), loaded.context_length) if name == "full" else ids.numel()
        first = score_from if name == "recompute" else 1
        bar = tqdm(total=total - first, desc=f"streaming {name}", unit="tok")
        started = time.perf_counter()
        result = streaming_ppl(
            loaded.model,
            ids,
            name,
            max_cache_tokens=config.cache_tokens,
            on_step=lambda _step, bar=bar: bar.update(),
            score_from=first,
        )
        bar.close()
        tail = result.tail(score_from)
        ppl = math.exp(float(tail.mean())) if tail.numel() else float("nan")
        rows[name] = {
            "ppl": ppl,
            "tokens_scored": int(tail.numel()),
            "first_scored": result.first_scored,
            "kv_bytes": result.kv_bytes,
            "seconds": time.perf_counter() - started,
            # "native" (engine twin + kernels, token by token), "native-banded" (chunks) or "hf" (HF modules)
            "forward_path": result.path,
            "cumulative_ppl": result.cumulative_ppl().tolist(),
        }
        print(f"{name:<14} ppl {ppl:10.3f} over {tail.numel()} tokens, KV {result.kv_bytes / 2**20:.1f} MiB")
    scored = "" if score_from == 1 else f"; PPL over tokens {score_from}..{ids.numel() - 1} only"
    protocol = (
        f"token-by-token over the first {ids.numel()} tokens of {text.description}; KV budget {config.cache_tokens} "
        f"tokens per layer (full: no eviction, stops at the {loaded.context_length}-token context); "
        "window/streaming_llm/h2o/tova re-rotate keys inside the cache; recompute re-runs the last "
        f"{config.cache_tokens} tokens for every token it scores{scored}. Forward 'native-banded': a ring "
        f"(window, streaming_llm) scored {CHUNK_TOKENS} tokens at a time with the attention band the ring "
        "implies for each token, the token-by-token NLLs (kvlab/bench/eval/banded_ring.py)"
    )
    output.mkdir(parents=True, exist_ok=True)
    payload = {
        "schema_version": 1,
        "command": command,
        "machine": machine_info(loaded.model.device),
        "model": {"name": loaded.name, "source": loaded.source, "meaningful_ppl": loaded.meaningful_ppl},
        "protocol": protocol,
        "results": rows,
    }
    payload = portable(payload, config.data_dir)
    (output / "results.json").write_text(json.dumps(payload))
    _plot(rows, loaded.context_length, output / "cumulative_ppl.png")
    _markdown(payload, output / "report.md")
    print(f"protocol: {payload['protocol']}")
    return output


def _plot(rows: dict, context: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, row in rows.items():
        first = row.get("first_scored", 1)
        ax.plot(range(first, first + len(row["cumulative_ppl"])), row["cumulative_ppl"], label=name)
    ax.axvline(context, color="grey", linestyle=":", label="model context")
    ax.set_xlabel("tokens")
    ax.set_ylabel("cumulative PPL")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(payload: dict, path: Path) -> None:
    machine = payload["machine"]
    lines = [
        f"# Streaming PPL: {payload['model']['name']}",
        "",
        f"    {payload['command']}",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}.",
        "",
        f"Protocol: {payload['protocol']}.",
        "",
        "| configuration | PPL | tokens scored | KV MiB at end | seconds | forward |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, row in payload["results"].items():
        ppl = "-" if math.isnan(row["ppl"]) else f"{row['ppl']:.3f}"
        lines.append(
            f"| {name} | {ppl} | {row['tokens_scored']} | {row['kv_bytes'] / 2**20:.1f} | {row['seconds']:.0f} "
            f"| {row.get('forward_path', 'hf')} |"
        )
    if not payload["model"]["meaningful_ppl"]:
        lines += ["", "Random weights: these perplexities are meaningless."]
    lines += ["", "![cumulative PPL](cumulative_ppl.png)"]
    path.write_text("\n".join(lines) + "\n")
