"""The floor in every report: how it was measured, which probe set it, and a TPOT under it flagged
as the measurement error it is (kvlab.bench.core.floor)."""

import statistics

from kvlab.bench.core.floor import MAX_RUN_ATTEMPTS, PROBE_AGREEMENT, round_over_floor
from kvlab.bench.report.format import format_mib, format_ms


def over_floor(ratio: float) -> str:
    """A TPOT / floor cell; under 1 cannot be and is marked."""
    return f"{ratio:.2f}x" if ratio >= 1 else f"**{ratio:.2f}x (below floor)**"


def below_floor_warning(cells: list[tuple[str, float]]) -> list[str]:
    """A paragraph naming every (label, TPOT / floor) under the floor; nothing when none is."""
    below = [f"{label} ({ratio:.2f}x)" for label, ratio in cells if ratio < 1]
    if not below:
        return []
    return [
        "",
        "**MEASUREMENT ERROR: TPOT below the bandwidth floor** in " + "; ".join(below) + ". No decode step "
        "can read its weights faster than the memory delivers them, so these timings (or the floor's byte "
        "count) are wrong.",
    ]


def decode_floor(run: dict) -> float:
    """A serving bench dtype's batch-1 decode floor: the weights plus the K/V its timed steps attend
    (results written before the floor counted K/V hold the weights' alone)."""
    return run.get("decode_floor_tpot_s", run["floor_tpot_s"])


def decode_over_floor(run: dict, path: str) -> float:
    """A serving bench path's batch-1 TPOT over the floor: each run's TPOT over the floor of the probes
    around it (per path; results written before: one probe round per round of paths, or before the
    floor was probed per round: median TPOT over the one floor), median over the rounds."""
    times, floors = run["tpot_s"][path], run.get("round_decode_floor_tpot_s")
    if isinstance(floors, dict):
        floors = floors.get(path)
    if not floors or len(floors) != len(times):
        return statistics.median(times) / decode_floor(run)
    return round_over_floor(times, floors)


def floor_lines(floors: dict[str, dict]) -> list[str]:
    """The floor section: per dtype, weight bytes, every probe's bandwidth, the best and the floor."""
    names = sorted({name for floor in floors.values() for name in floor.get("probes_bytes_per_s", {})})
    lines = [
        "## The physical floor of batch-1 decode",
        "",
        "Each decode step must read every weight once, and exact attention the cached K and V of every position "
        "it attends, so TPOT >= (weight bytes + KV bytes per position x positions attended) / memory bandwidth, "
        "the positions averaged over the timed steps (prompt + new tokens / 2 at batch 1; a row's floor ms). A "
        "press keeps fewer positions: its rows count the weights alone. The "
        "bandwidth is probed right before every timed run, by several probes (fastest of a few timed "
        "passes each): reading a 512 MiB float32 tensor once by a multithreaded sum (stream sum) and by the dot "
        "product of its halves (stream dot), and a 256 MiB matrix-vector product at the dtype by torch (torch "
        "matvec) and by kvlab's skinny GEMM (kvlab skinny, where it runs). On a CPU with transparent huge pages "
        'the stream probes run again over a tensor in 2 MiB pages ("(2 MiB pages)") and the matrices live in '
        "them, as kvlab keeps model weights there. Each run's TPOT is set against the floor of the probes "
        "right before it (their best): a row's TPOT / floor is the median over its runs of those ratios, its "
        "floor ms the median of its runs' floors (a VM's memory has fast spells that come and go between "
        "runs). Below, per dtype over all its probe rounds: each probe's median, the median over the rounds "
        "of each round's best probe (the weights' floor; beside it the probe that was best most often) and "
        "the fastest probe of any round.",
        "",
        "| dtype | weight MiB per token | KV KiB per position | "
        + " | ".join(f"{name} GB/s" for name in names)
        + " | best probe | rounds | fastest probe GB/s | weights' floor ms |",
        "|---|---:|---:|" + "---:|" * len(names) + "---|---:|---:|---:|",
    ]
    for dtype, floor in floors.items():
        probes = floor.get("probes_bytes_per_s", {})
        cells = [f"{probes[name] / 1e9:.1f}" if name in probes else "" for name in names]
        lines.append(
            f"| {dtype} | {format_mib(floor['weight_bytes_per_token'])} | "
            f"{floor.get('kv_bytes_per_position', 0) / 1024:.1f} | "
            + " | ".join(cells)
            + f" | {floor.get('probe', '')} ({floor['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s) "
            f"| {floor.get('probe_rounds', 1)} "
            f"| {floor.get('fastest_probe_bytes_per_s', floor['bandwidth_bytes_per_s']) / 1e9:.1f} "
            f"| {format_ms(floor['floor_tpot_s'])} |"
        )
    remeasured = {
        dtype: floor["remeasured_runs"] for dtype, floor in floors.items() if "remeasured_runs" in floor
    }
    if remeasured:
        counts = ", ".join(f"{dtype} {count}" for dtype, count in remeasured.items())
        lines += [
            "",
            f"The probes also ran right after each timed run; a run whose best probes before and after differed "
            f"by more than {PROBE_AGREEMENT:.0%} met a change of the memory's speed and was measured again, up to "
            f"{MAX_RUN_ATTEMPTS} times (the last kept either way; the criterion reads the probes alone). Runs "
            f"measured again: {counts}. A run's floor is that of the better reading of each probe around it.",
        ]
    return lines
