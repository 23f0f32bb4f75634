"""The kernel bench's report: results.json (raw samples), config.yaml and report.md in
results/kernels/<experiment>/, with the issue's bars as measured on this machine."""

import statistics
from pathlib import Path
from typing import Any

from kvlab.bench.core.floor import PROBE_AGREEMENT, Floor, best_probe, round_over_floor
from kvlab.bench.core.writer import SCHEMA_VERSION, write_experiment
from kvlab.bench.report.format import bar, bars_table, title_lines
from kvlab.kernels.calibrate import TIE

TORCH = "torch"
MODEL_PATH = "kvlab.models"  # what the model's linear layers run: the calibration's kernel for the shape
# The engine's decode step at these rows (one op: every layer's matmuls, norms, attention over one
# cached position, and the LM head), where the model has one: what batch-1 to 32-row decode runs.
FUSED_STEP = "kvlab fused step"

# (rows, target): the model path's pass at `rows` rows may cost at most `target` x its pass at one row.
ROW_BARS = ((16, 2.0), (32, 3.5))
PEAK_SIDE = 2048  # the square matmul that stands for the machine's arithmetic peak (runs.matmul_peak_flops)
FLOOR_BAR = 1.15  # one row's pass / (weight bytes / read bandwidth): one_row_over_floor
PAST_SPEEDUP_BAR = 3.0  # paged decode attention: the past revision's call / kvlab's, same run


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def probe_rounds(gemm: dict[str, Any]) -> list[dict[str, float]]:
    """The bandwidth probes of each timed one-row round (results written before the bench probed per
    round hold one set of probes)."""
    return gemm.get("probe_rounds") or [gemm["probes_bytes_per_s"]]


def decode_path(gemm: dict[str, Any]) -> str:
    """What decode runs over these weights: the fused step where it ran at every rows count, else the
    model's linear layers op by op (results written before the bench timed the step)."""
    by_rows = gemm["by_rows"].values()
    return FUSED_STEP if all(FUSED_STEP in entry["seconds"] for entry in by_rows) else MODEL_PATH


def one_row_over_floor(gemm: dict[str, Any], path: str = MODEL_PATH) -> float:
    """`path`'s one-row pass over the floor: each round's pass over its own round's floor (the weight
    bytes over that round's best probe), median over the rounds."""
    passes, rounds = gemm["by_rows"]["1"]["seconds"][path], probe_rounds(gemm)
    floor = Floor.from_rounds(gemm["weight_bytes"], rounds)
    if len(rounds) != len(passes):  # one set of probes for the run
        return median(passes) / floor.tpot_s
    return round_over_floor(passes, [floor.at_bandwidth(best_probe(r)).tpot_s for r in rounds])


def arithmetic_peak(gemm: dict[str, Any]) -> tuple[float, str]:
    """(FLOP/s, what reached it): the fastest of each variant's multiply-add on registers (the
    arithmetic units' peak), torch's square matmul and the fastest pass any kernel ran in the run (its
    median), as the read bandwidth is the best of several probes: a matmul understates the peak
    (torch's float32 matmul reached 194 GFLOP/s on a Zen 4 EPYC whose FMAs issue 235)."""
    best, source = gemm["matmul_peak_flops"], f"torch's {PEAK_SIDE}^3 matmul"
    for variant, flops in gemm.get("multiply_add_peak_flops", {}).items():
        if flops > best:
            best, source = flops, f"kvlab {variant}'s multiply-add on registers"
    for rows, entry in gemm["by_rows"].items():
        for name, samples in entry["seconds"].items():
            flops = 2 * int(rows) * gemm["params"] / median(samples)
            if flops > best:
                best, source = flops, f"{name} at {rows} rows"
    return best, source


def probing_phrase(gemm: dict[str, Any], rounds: int) -> str:
    """How the one-row rounds were probed: before each (older results), or before and after each, a
    round measured again while the two disagreed (kvlab.bench.core.floor.probed_run)."""
    if "remeasured_rounds" not in gemm:
        return f"before each of the {rounds} timed one-row rounds"
    return (
        f"before and after each of the {rounds} timed one-row rounds, a round measured again while the two "
        f"disagreed by more than {PROBE_AGREEMENT:.0%} ({gemm['remeasured_rounds']} were)"
    )


def multiply_add_sentence(gemm: dict[str, Any]) -> str:
    """The FMA peak the issue asks the report to state: each variant's multiply-add on registers."""
    peaks = gemm.get("multiply_add_peak_flops", {})
    if not peaks:
        return ""
    listed = ", ".join(f"{variant} {flops / 1e9:.0f}" for variant, flops in peaks.items())
    return f" Multiply-add peak (each variant's instruction on registers, all threads, GFLOP/s): {listed}."


def rows_floor_seconds(gemm: dict[str, Any], rows: int) -> float:
    """The least a pass of `rows` rows can take: reading the weights once at the run's bandwidth (the
    median of its rounds' best probes), or its arithmetic (2 x rows x parameters) at the arithmetic
    peak, whichever is longer."""
    floor = Floor.from_rounds(gemm["weight_bytes"], probe_rounds(gemm))
    return max(floor.tpot_s, 2 * rows * gemm["params"] / arithmetic_peak(gemm)[0])


def gemm_bars(dtype: str, gemm: dict[str, Any]) -> list[dict[str, Any]]:
    by_rows = gemm["by_rows"]
    path = decode_path(gemm)
    label = "the fused decode step" if path == FUSED_STEP else "what the model runs"
    one = median(by_rows["1"]["seconds"][path])
    bars = []
    for rows, target in ROW_BARS:
        if str(rows) in by_rows:
            ratio = median(by_rows[str(rows)]["seconds"][path]) / one
            bars.append(bar(f"{dtype}: {rows} rows / 1 row ({label})", "<=", target, ratio))
    bars.append(
        bar(
            f"{dtype}: 1 row / read-bandwidth floor ({label})",
            "<=",
            FLOOR_BAR,
            one_row_over_floor(gemm, path),
        )
    )
    if path != MODEL_PATH:
        bars.append(
            bar(
                f"{dtype}: 1 row / read-bandwidth floor (the model's matmuls called one by one)",
                "<=",
                FLOOR_BAR,
                one_row_over_floor(gemm),
            )
        )
    worst = max(
        median(entry["seconds"][MODEL_PATH]) / median(entry["seconds"][TORCH]) for entry in by_rows.values()
    )
    bars.append(bar(f"{dtype}: what the model runs / torch, worst rows count", "<=", 1 + TIE, worst))
    return bars


def past_revision(payload: dict[str, Any]) -> str:
    return payload["config"]["attention"].get("past_revision", "")


def cache_state(count: str) -> str:
    """Where the K/V of calls rotating over `count` caches come from."""
    return "one cache, every call" if count == "1" else f"{count} caches in turn"


def attention_bars(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """kvlab's paged attention against the past revision's, where the run timed it, per cache state."""
    revision, shape = past_revision(payload), payload["config"]["attention"]
    return [
        bar(
            f"{dtype}: paged attention {shape['num_requests']} x {shape['context_len']} ({cache_state(count)}), "
            f"{revision} / kvlab",
            ">=",
            PAST_SPEEDUP_BAR,
            median(seconds[revision]) / median(seconds["cpu_paged"]),
        )
        for dtype, entry in payload["attention"].items()
        for count, seconds in entry["seconds_by_caches"].items()
        if revision and revision in seconds
    ]


def write_kernels_report(payload: dict[str, Any], path: Path) -> Path:
    payload = {"schema_version": SCHEMA_VERSION, **payload}
    payload["bars"] = [bar for dtype, gemm in payload["gemm"].items() for bar in gemm_bars(dtype, gemm)]
    payload["bars"] += attention_bars(payload)
    return write_experiment(path, payload, payload["config"], lambda directory: [], render_markdown)


def render_markdown(payload: dict[str, Any], plots: list[str]) -> str:
    del plots
    config, machine = payload["config"], payload["machine"]
    lines = [
        *title_lines(config, payload["command"]),
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch threads, "
        f"{machine['ram_gib']} GiB RAM; torch {machine['torch']}. Kernels: {machine['kernels']}.",
        "",
        f"Weights: every matrix a decode step of `{payload['model']['name']}` ({payload['model']['source']}) "
        "multiplies, as kvlab's engine-native model holds them (q/k/v and gate/up fused) and the LM head. "
        "One pass multiplies `rows` input rows by "
        f"each matrix once; each cell is the median of {config['repeats']} passes after a warm-up, "
        "kernels interleaved pass by pass. `kvlab.models` is what the model's linear layers run: the "
        "calibration's kernel for the rows count (kvlab's or torch's).",
        "",
        "## Bars",
        "",
        *bars_table(payload["bars"]),
    ]
    for dtype, gemm in payload["gemm"].items():
        lines += gemm_section(dtype, gemm)
    lines += attention_section(payload)
    return "\n".join(lines) + "\n"


def gemm_section(dtype: str, gemm: dict[str, Any]) -> list[str]:
    rounds = probe_rounds(gemm)
    floor = Floor.from_rounds(gemm["weight_bytes"], rounds)
    peak, peak_source = arithmetic_peak(gemm)
    path = decode_path(gemm)
    names = list(dict.fromkeys(name for entry in gemm["by_rows"].values() for name in entry["seconds"]))
    lines = [
        "",
        f"## Skinny GEMM, {dtype}",
        "",
        f"{gemm['num_matrices']} matrices, {gemm['params'] / 1e6:.1f}M parameters, "
        f"{gemm['weight_bytes'] / 2**20:.1f} MiB per pass. Read bandwidth, probed "
        + probing_phrase(gemm, len(rounds))
        + " (each round's best probe, median over the rounds; best most "
        f"often: {floor.probe}): {floor.bandwidth_bytes_per_s / 1e9:.1f} GB/s (each probe's median: "
        f"{', '.join(f'{name} {value / 1e9:.1f}' for name, value in floor.probes.items())}; the fastest probe "
        f"of any round {floor.fastest_bytes_per_s / 1e9:.1f}), so one pass cannot take less than "
        f"{floor.tpot_s * 1e3:.2f} ms (the bar sets "
        "each round's one-row pass against its own round's floor: median "
        f"{one_row_over_floor(gemm, path):.2f}x). Arithmetic peak: {peak / 1e9:.0f} GFLOP/s ({peak_source}"
        + (
            f" at {dtype})."
            if peak == gemm["matmul_peak_flops"]
            else f"; torch's {PEAK_SIDE}^3 matmul at {dtype}: {gemm['matmul_peak_flops'] / 1e9:.0f})."
        )
        + multiply_add_sentence(gemm),
        "",
        "| rows | "
        + " | ".join(f"{name} ms" for name in names)
        + " | model runs | decode runs | x one row | floor ms | x floor | GB/s | GFLOP/s | max rel. error |",
        "|---:|" + "---:|" * len(names) + "---|---|---:|---:|---:|---:|---:|---:|",
    ]
    one = median(gemm["by_rows"]["1"]["seconds"][path])
    for rows, entry in gemm["by_rows"].items():
        ms = {name: median(samples) * 1e3 for name, samples in entry["seconds"].items()}
        seconds = ms[path] / 1e3
        decode = (
            f"fused step ({entry['fused_step_variant']})"
            if path == FUSED_STEP
            else entry["model_path_kernel"]
        )
        least = rows_floor_seconds(gemm, int(rows))
        error = max(entry["relative_error"].values())
        lines.append(
            f"| {rows} | "
            + " | ".join(f"{ms[name]:.2f}" if name in ms else "" for name in names)
            + f" | {entry['model_path_kernel']} | {decode} | {seconds / one:.2f}x | {least * 1e3:.2f} | {seconds / least:.2f}x"
            f" | {gemm['weight_bytes'] / seconds / 1e9:.1f} | {2 * int(rows) * gemm['params'] / seconds / 1e9:.0f}"
            f" | {error:.1e} |"
        )
    bounds = [
        f"{rows} rows / 1 row >= {rows_floor_seconds(gemm, rows) / one:.2f}x"
        for rows, _ in ROW_BARS
        if str(rows) in gemm["by_rows"]
    ]
    lines += [
        "",
        f"{MODEL_PATH}: the model's linear layers called one by one from Python, as prefill and mixed steps "
        f"run them (model runs: the kernel they picked); {FUSED_STEP}: the engine's decode step of that many "
        "requests (decode runs), one op over every layer's matmuls, norms and attention (one cached position "
        "per request) and the LM head, without a call per matrix. x one row, x floor, GB/s and GFLOP/s are "
        "those of the decode path. Floor: the weights read once at the bandwidth above "
        "or the arithmetic at the peak above, whichever takes longer; a rows count's pass cannot beat it, so "
        "against this run's one-row pass the ratios in the bars cannot go below: "
        + (", ".join(bounds) or "none timed")
        + " (a one-row pass that streams faster raises these bounds: on a 2-core CPU the arithmetic of 16 "
        "rows can take longer than twice a pass at full bandwidth). Error: the largest |kernel - float64 "
        "product| of any kernel over every n-th matrix (8 to 15 of them), relative to the product's largest "
        "entry.",
    ]
    return lines


def attention_section(payload: dict[str, Any]) -> list[str]:
    shape, revision = payload["config"]["attention"], past_revision(payload)
    timed_past = bool(revision) and all(
        revision in entry["max_abs_error"] for entry in payload["attention"].values()
    )
    past_text = (
        f" and the op of {revision} (its source from this checkout's git history, compiled with its flags, "
        "loaded beside today's)"
        if timed_past
        else ""
    )
    lines = [
        "",
        "## Paged decode attention",
        "",
        f"{shape['num_requests']} requests x {shape['context_len']} cached tokens, one query token each, the "
        f"model's heads; blocks of {shape['block_size']} scattered over the pool, in 2 MiB pages as the "
        "engine allocates it. kvlab `cpu_paged` (the C++ op) "
        "vs `sdpa` (kvlab's backend on torch's scaled_dot_product_attention over the blocks gathered into a "
        f"padded batch){past_text}; each checked against the `reference` backend. Median of "
        f"{shape['repeats']} calls after a warm-up, the kernels called in turn, with the same cache every "
        f"call (its K/V stay in the last-level cache if they fit) and with {shape['caches']} caches in turn "
        "(each call reads another cache than the last few, as a decode step's layers each read their own).",
        "",
    ]
    past_columns = (f" {revision} ms | {revision} / kvlab |", "---:|---:|") if timed_past else ("", "")
    lines += [
        f"| dtype | K/V | kvlab cpu_paged ms | torch sdpa ms | sdpa / kvlab |{past_columns[0]} kvlab K/V GB/s |",
        f"|---|---|---:|---:|---:|{past_columns[1]}---:|",
    ]
    for dtype, entry in payload["attention"].items():
        for count, seconds in entry["seconds_by_caches"].items():
            kvlab, sdpa = median(seconds["cpu_paged"]), median(seconds["sdpa"])
            past = ""
            if timed_past:
                past_seconds = median(seconds[revision])
                past = f" {past_seconds * 1e3:.2f} | {past_seconds / kvlab:.2f}x |"
            lines.append(
                f"| {dtype} | {cache_state(count)} | {kvlab * 1e3:.2f} | {sdpa * 1e3:.2f} | {sdpa / kvlab:.2f}x |"
                f"{past} {entry['kv_bytes'] / kvlab / 1e9:.1f} |"
            )
    lines += [
        "",
        "Largest |kernel - reference| over the caches: "
        + "; ".join(
            f"{dtype}: " + ", ".join(f"{name} {error:.1e}" for name, error in entry["max_abs_error"].items())
            for dtype, entry in payload["attention"].items()
        )
        + ".",
    ]
    missing = sorted({entry.get("past_revision_missing") for entry in payload["attention"].values()} - {None})
    if missing:
        lines += ["", *(f"{revision} not timed: {reason}." for reason in missing)]
    return lines
