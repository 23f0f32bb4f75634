"""PNG plots of the generation bench: TPOT and TTFT vs prompt length, memory at the longest prompt."""

from pathlib import Path

from kvlab.bench.generate.runner import RunRecord


def generation_plots(runs: list[RunRecord], directory: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    series = sorted({(r.method, r.dtype) for r in runs})
    for metric, label, filename in [
        ("tpot_s", "TPOT (ms)", "tpot_vs_prompt.png"),
        ("ttft_s", "TTFT (ms)", "ttft_vs_prompt.png"),
    ]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, dtype in series:
            points = sorted(
                (r.prompt_len, getattr(r, metric).median * 1000)
                for r in runs
                if (r.method, r.dtype) == (method, dtype)
            )
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{method} {dtype}")
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(directory / filename, dpi=110)
        plt.close(fig)
        names.append(filename)
    longest = max(r.prompt_len for r in runs)
    chosen = [r for r in runs if r.prompt_len == longest]
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [f"{r.method}\n{r.dtype}" for r in chosen]
    x = range(len(chosen))
    ax.bar(
        [i - 0.2 for i in x],
        [r.peak_memory_rise_bytes.median / 2**20 for r in chosen],
        0.4,
        label="peak rise over model MiB",
    )
    ax.bar([i + 0.2 for i in x], [r.kv_cache_bytes / 2**20 for r in chosen], 0.4, label="KV cache MiB")
    ax.set_xticks(list(x), labels)
    ax.set_title(f"memory at prompt {longest}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / "memory.png", dpi=110)
    plt.close(fig)
    names.append("memory.png")
    return names
