"""PNG plots of the paged bench: throughput and prefix TTFT, batch-1 decode vs the floor, block usage."""

import statistics
from pathlib import Path
from typing import Any

from kvlab.bench.report.floor import decode_floor

DECODE_PATHS = ("engine", "kvlab.generate", "model.generate")


def decode_runs(decode: dict[str, Any]) -> list[tuple[int, str, dict[str, Any]]]:
    """(prompt length, dtype, run) of the payload's batch-1 decode section, prompt lengths in order."""
    return [
        (int(prompt_len), dtype, run)
        for prompt_len, by_dtype in decode["by_prompt"].items()
        for dtype, run in by_dtype.items()
    ]


def serving_plots(payload: dict[str, Any], directory: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixed, prefix = payload["mixed"], payload["prefix"]
    decode = decode_runs(payload["decode"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].bar(
        ["engine", "HF static"],
        [mixed["engine"]["output_tokens_per_s"], mixed["hf_static"]["output_tokens_per_s"]],
    )
    axes[0].set_ylabel("output tokens/s")
    axes[0].set_title("mixed workload throughput")
    labels = ["without cache", "with cache"]
    axes[1].bar(
        labels, [statistics.median(prefix[k]["ttft_s"][1:]) * 1000 for k in ("without_cache", "with_cache")]
    )
    axes[1].set_ylabel("TTFT ms (median)")
    axes[1].set_title("shared prefix")
    fig.tight_layout()
    fig.savefig(directory / "throughput_and_prefix.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(3 + 1.5 * len(decode), 4))
    paths = DECODE_PATHS
    width = 0.8 / (len(paths) + 1)
    for i, (_, _, run) in enumerate(decode):
        for j, path in enumerate(paths):
            ax.bar(
                i + j * width,
                statistics.median(run["tpot_s"][path]) * 1000,
                width,
                label=path if i == 0 else None,
                color=f"C{j}",
            )
        ax.bar(
            i + len(paths) * width,
            decode_floor(run) * 1000,
            width,
            label="floor" if i == 0 else None,
            color="grey",
        )
    ax.set_xticks(
        [i + 0.4 - width / 2 for i in range(len(decode))],
        [f"{dtype}\nprompt {prompt_len}" for prompt_len, dtype, _ in decode],
    )
    ax.set_ylabel("batch-1 TPOT ms")
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / "decode_tpot.png", dpi=110)
    plt.close(fig)

    engine = mixed["engine"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(engine["used_blocks"], label="blocks in use")
    ax.plot([t / engine["block_size"] for t in engine["stored_tokens"]], label="tokens held / block size")
    ax.axhline(engine["num_blocks"], color="grey", linestyle="--", label="blocks allocated")
    ax.set_xlabel("engine step")
    ax.set_ylabel("blocks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / "block_usage.png", dpi=110)
    plt.close(fig)
    return ["throughput_and_prefix.png", "decode_tpot.png", "block_usage.png"]
