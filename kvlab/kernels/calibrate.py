"""Which kernel serves a (dtype, rows) matmul on this CPU: measured once, cached beside the build.

Why measure: whether torch's matmul (MKL / oneDNN) or kvlab's skinny GEMM is faster depends on the
CPU, the dtype and the rows count, and assumptions about it proved wrong. On a 2-core AMD EPYC with
AVX512-BF16, oneDNN's bf16 matrix-vector product streamed 9 GB/s where a plain read gets 30, so the
old rule "native bf16 -> oneDNN" cost bf16 decode 1.7x; at 16-32 rows oneDNN won there instead.

The calibration times every candidate -- each skinny GEMM variant this CPU supports, and torch --
on a pass over a set of distinct weight matrices (by default SmolLM2-135M's layer shapes, copied to
`working_set`) so each call streams its matrix as a decode step does rather than hitting a
warm cache, for rows 1, 2, 4, 8, 16, 32 and float32 / bfloat16. Candidates alternate within each
round and each call's minimum over the rounds counts, so a noisy neighbour skews no candidate alone. The
table is keyed by the kernel sources, CPU model, torch version, thread count and the candidates, and
stored as JSON in the build folder: a new build, CPU, torch or thread count calibrates afresh.

At one row the walk is also timed with non-temporal requests ("<variant>/nt", skinny_tile.h). Its
pass takes about as long; what it changes is what the caches still hold after it, where the host
work between decode steps (Python, torch's dispatch, the K/V cache) finds its data. So one-row
candidates are scored by their pass plus a footprint probe right after it: a gather over a 4 MiB
table that was warm before the pass, a stand-in for that host work, whose cost adds to a step's
the same way. On a 2-core Zen 4 EPYC the gather took 330-580 us after a non-temporal pass of
SmolLM2's bf16 matrices, 700-750 after a plain one, ~130 warm.

The quantized GEMM's variants (quant_gemm.cpp) are timed the same way at one input row, per weight
format (int8 per channel, int4 in groups of 128), over the same shapes' codes: the float variants
convert every weight to float32, the integer one (avx512vnni-x16) rounds the inputs to int16 and
multiplies integers, and which streams a matrix from memory faster differs by format and CPU (on a
2-core Zen 4 EPYC the integer kernel ran int4-g128 from memory faster and int8 slower, though it ran
both 1.6-1.9x faster from cache).
"""

import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

TORCH = "torch"
ROW_BUCKETS = (1, 2, 4, 8, 16, 32)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# SmolLM2-135M's decode matrices (out_features, in_features): fused q/k/v, o, fused gate/up, down.
DEFAULT_SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))
# Bytes of float32 weights per pass (bfloat16 passes read half): far past the last-level cache (this
# VM reports 300 MiB of L3 on a Sapphire Rapids; a 16 MiB set stayed cache-resident and crowned torch
# at 1 row), so each call streams from memory as a decode step does.
DEFAULT_WORKING_SET = 512 * 2**20
ROUNDS = 6  # the first is a warm-up
TIE = 0.03  # relative difference below which two candidates count as equally fast
TILES = "/tiles"  # a variant name's suffix: the register tiles at one input row (one_row_options)
NON_TEMPORAL = "/nt"  # a variant name's suffix: the one-row walk with non-temporal requests
# The footprint probe: a gather of HOT_GATHERS random entries of a HOT_SET-byte table, warm before the
# pass; past a core's L2 (1-2 MiB) and well inside a last-level cache, as the host's working set is.
HOT_SET = 4 * 2**20
HOT_GATHERS = 65536
# Weight formats the quantized GEMM's calibration times, as kvlab.quant spells them: bits -> format.
QUANT_FORMATS = {8: "int8", 4: "int4-g128"}
QUANT_WORKING_SET = 128 * 2**20  # bytes of codes per pass: as many int8 weights as the float32 set's


def bucket(rows: int) -> int:
    """The calibrated rows count that stands for `rows`: the smallest bucket >= rows."""
    for size in ROW_BUCKETS:
        if rows <= size:
            return size
    raise ValueError(f"rows {rows} exceeds the largest calibrated bucket {ROW_BUCKETS[-1]}")


@dataclass(slots=True, frozen=True)
class Decision:
    """For one (dtype, rows bucket): the fastest kvlab variant, and what runs (it, or torch)."""

    kernel: str  # "torch" or the variant's name
    variant: str  # the fastest skinny GEMM variant, used when kvlab's kernel is asked for anyway
    ms: dict[str, float] = field(default_factory=dict)  # per candidate: ms per pass (minimum)
    # At one row, per kvlab candidate: us of the footprint probe right after a pass (added to its ms).
    hot_set_us: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class Calibration:
    key: dict
    decisions: dict[tuple[str, int], Decision]
    path: Path | None = None
    measured_now: bool = False
    quant: dict[str, Decision] = field(default_factory=dict)  # per QUANT_FORMATS name, at one row
    # (dtype, rows) for every rows count up to the largest bucket: decision() runs once per matmul.
    _by_rows: dict[tuple[torch.dtype, int], Decision] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_rows = {
            (dtype, rows): self.decisions[(name, bucket(rows))]
            for name, dtype in DTYPES.items()
            if (name, ROW_BUCKETS[0]) in self.decisions
            for rows in range(1, ROW_BUCKETS[-1] + 1)
        }

    def decision(self, dtype: torch.dtype, rows: int) -> Decision:
        return self._by_rows[(dtype, rows)]

    def to_json(self) -> dict:
        table: dict[str, dict[str, dict]] = {}
        for (dtype, rows), d in self.decisions.items():
            table.setdefault(dtype, {})[str(rows)] = {
                "kernel": d.kernel,
                "variant": d.variant,
                "ms": d.ms,
                "hot_set_us": d.hot_set_us,
            }
        quant = {
            name: {"kernel": d.kernel, "variant": d.variant, "ms": d.ms} for name, d in self.quant.items()
        }
        return {"key": self.key, "decisions": table, "quant": quant}

    @classmethod
    def from_json(cls, data: dict, path: Path) -> "Calibration":
        decisions = {
            (dtype, int(rows)): Decision(
                entry["kernel"], entry["variant"], entry["ms"], entry.get("hot_set_us", {})
            )
            for dtype, by_rows in data["decisions"].items()
            for rows, entry in by_rows.items()
        }
        quant = {
            name: Decision(entry["kernel"], entry["variant"], entry["ms"])
            for name, entry in data["quant"].items()
        }
        return cls(data["key"], decisions, path, quant=quant)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def calibration_key(
    digest: str,
    variants: Sequence[str],
    shapes: Sequence[tuple[int, int]],
    threads: int,
    quant_variants: Sequence[str] = (),
) -> dict:
    return {
        "kernels": digest,
        "method": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12],  # this file's procedure
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "threads": threads,
        "variants": list(variants),
        "shapes": [list(shape) for shape in shapes],
        "rows": list(ROW_BUCKETS),
        "quant_variants": list(quant_variants),
    }


def cache_path(directory: Path, key: dict) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return directory / f"calibration-{name}.json"


def _weight_set(
    shapes: Sequence[tuple[int, int]], dtype: torch.dtype, working_set: int
) -> list[torch.Tensor]:
    from kvlab.models import huge_pages

    generator = torch.Generator().manual_seed(0)
    layer = sum(out * inp for out, inp in shapes) * 4
    copies = min(64, max(1, working_set // layer))  # bounded: tiny shapes would mean many tiny calls
    # In 2 MiB pages where a loaded model's weights are (kvlab.models.huge_pages): from 4 KiB pages the
    # bf16 variants tied at one row on a 2-core AMD EPYC (8.71 / 8.58 ms a pass), while over the model's
    # weights in huge pages, interleaved, vdpbf16ps took 13.2 ms where the widening AVX2 kernel took 9.1.
    return huge_pages.place_tensors(
        (torch.randn(out, inp, generator=generator) * 0.05).to(dtype)
        for _ in range(copies)
        for out, inp in shapes
    )


def _fastest(names: Sequence[str], ms: dict[str, float]) -> str:
    """The fastest name; times within TIE of it are a tie, which the order of `names` settles (kvlab's
    variants widest ISA first, torch last), so noise between equals does not flip the choice."""
    best = min(ms[name] for name in names)
    return next(name for name in names if ms[name] <= best * (1 + TIE))


def distinct_variants(dtype: torch.dtype, variants: Sequence[str]) -> list[str]:
    """The variants that run distinct kernels at `dtype`: float32 weights take the same AVX-512 kernel
    in amx and avx512bf16 as in avx512, so only avx512 is timed."""
    return [
        v
        for v in variants
        if not (dtype == torch.float32 and v in ("amx", "avx512bf16") and "avx512" in variants)
    ]


def one_row_options(variants: Sequence[str]) -> list[str]:
    """At one input row each variant walks the weight rows one at a time (one sequential stream per
    thread, which the hardware prefetcher follows), the same with non-temporal requests
    ("<variant>/nt"), or, as "<variant>/tiles", runs the register tiles with software prefetch as at
    several rows: the walk read 54 GB/s where the tiles read 39 on a Zen 4 EPYC, and the tiles'
    prefetch distance was tuned on a Sapphire Rapids, so all are timed (with the footprint probe).
    Ties go to the non-temporal walk: it reads the same lines in the same order, hints added, and the
    probe's reading of what it spares moves with the memory's speed (on a 2-core Zen 4 EPYC, 26-400 us
    less than the plain walk's over several calibrations, once none for float32 AVX2), while
    alternated generations there were 1-8% faster with it in 5 of 6 pairings (one bf16 AVX2 run 2%
    slower)."""
    return [
        # the AMX kernel multiplies one row in its tiles: it has no walk to make non-temporal
        *(f"{variant}{NON_TEMPORAL}" for variant in variants if variant != "amx"),
        *variants,
        *(f"{variant}{TILES}" for variant in variants),
    ]


def _hot_set_us(
    candidates: dict[str, Callable], weights: Sequence, inputs: Sequence[torch.Tensor], rounds: int
) -> dict[str, float]:
    """Per candidate, us of the footprint probe (a gather over a warm HOT_SET table) right after a pass
    over `weights`; the fastest of the rounds after the first."""
    generator = torch.Generator().manual_seed(1)
    table = torch.randn(HOT_SET // 4, generator=generator)
    order = torch.randperm(table.numel(), generator=generator)[:HOT_GATHERS]
    fastest = {name: float("inf") for name in candidates}
    for round_index in range(rounds):
        for name, run in candidates.items():
            table.take(order)  # warm: the probe measures what the pass left of it
            for x, w in zip(inputs, weights, strict=True):
                run(x, w)
            start = time.perf_counter()
            table.take(order)
            elapsed = time.perf_counter() - start
            if round_index > 0:
                fastest[name] = min(fastest[name], elapsed)
    return {name: seconds * 1e6 for name, seconds in fastest.items()}


def _pass_ms(
    candidates: dict[str, Callable], weights: Sequence, inputs: Sequence[torch.Tensor], rounds: int
) -> dict[str, float]:
    """Per candidate, ms per pass over `weights` (run(inputs[i], weights[i]) each): per (candidate,
    matrix) the fastest of the rounds after the first, summed over the matrices, so a call that a busy
    machine descheduled in one round is replaced by its undisturbed time from another. Candidates
    alternate per round."""
    fastest = {name: [float("inf")] * len(weights) for name in candidates}
    for round_index in range(rounds):
        for name, run in candidates.items():
            times = fastest[name]
            for i, (x, w) in enumerate(zip(inputs, weights, strict=True)):
                start = time.perf_counter()
                run(x, w)
                elapsed = time.perf_counter() - start
                if round_index > 0 and elapsed < times[i]:
                    times[i] = elapsed
    return {name: sum(times) * 1e3 for name, times in fastest.items()}


def _quant_weight_set(bits: int, shapes: Sequence[tuple[int, int]], working_set: int) -> list:
    """Random codes and scales in QUANT_FORMATS[bits]'s layout, `working_set` bytes of codes, in 2 MiB
    pages as a loaded model's (kvlab.quant.modules.place_weights)."""
    from kvlab.models import huge_pages
    from kvlab.quant.formats import QuantizedWeight, QuantSpec, packed_columns

    spec = QuantSpec.parse(QUANT_FORMATS[bits])
    generator = torch.Generator().manual_seed(0)
    layer = sum(out * inp * bits // 8 for out, inp in shapes)
    weights = []
    for _ in range(min(64, max(1, working_set // layer))):
        for out, inp in shapes:
            if bits == 8:
                codes = torch.randint(-127, 128, (out, inp), generator=generator, dtype=torch.int8)
            else:
                codes = torch.randint(
                    0, 256, (out, packed_columns(inp)), generator=generator, dtype=torch.uint8
                )
            group = spec.group_size if spec.granularity == "group" else inp
            scales = (torch.rand(out, -(-inp // group), generator=generator) * 0.01).half()
            codes, scales = huge_pages.place_tensors([codes, scales])
            weights.append(QuantizedWeight(codes, scales, None, bits, group, inp))
    return weights


def measure_quant(
    quant_linear: Callable[[torch.Tensor, object, str], torch.Tensor],
    variants: Sequence[str],
    shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES,
    working_set: int = QUANT_WORKING_SET,
    rounds: int = ROUNDS,
) -> dict[str, Decision]:
    """Time each quantized GEMM variant at one input row per weight format; `quant_linear(x, weight,
    variant)` runs one. Ties go to the earlier variant (the op's order: float ones first)."""
    decisions = {}
    for bits, name in QUANT_FORMATS.items():
        weights = _quant_weight_set(bits, shapes, working_set)
        inputs = {inp: torch.randn(1, inp) for _, inp in shapes}
        candidates = {v: (lambda x, w, v=v: quant_linear(x, w, v)) for v in variants}
        best = _pass_ms(candidates, weights, [inputs[w.in_features] for w in weights], rounds)
        fastest = _fastest(list(variants), best)
        decisions[name] = Decision(fastest, fastest, {v: round(ms, 4) for v, ms in best.items()})
    return decisions


def measure(
    skinny: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor],
    variants: Sequence[str],
    shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES,
    working_set: int = DEFAULT_WORKING_SET,
    rounds: int = ROUNDS,
) -> dict[tuple[str, int], Decision]:
    """Time each candidate per (dtype, rows bucket); `skinny(x, weight, variant)` runs kvlab's kernel."""
    decisions = {}
    for dtype_name, dtype in DTYPES.items():
        weights = _weight_set(shapes, dtype, working_set)
        kernels = distinct_variants(dtype, variants)
        for rows in ROW_BUCKETS:
            inputs = {inp: torch.randn(rows, inp).to(dtype) for _, inp in shapes}
            names = one_row_options(kernels) if rows == 1 else kernels
            candidates: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
                name: (lambda x, w, name=name: skinny(x, w, name)) for name in names
            }
            candidates[TORCH] = F.linear  # what kvlab.models.native.linear runs when torch is chosen
            ordered = [inputs[w.shape[1]] for w in weights]
            best = _pass_ms(candidates, weights, ordered, rounds)
            score, hot = best, {}
            if rows == 1:
                hot = _hot_set_us({name: candidates[name] for name in names}, weights, ordered, rounds)
                score = {name: best[name] + hot[name] / 1e3 for name in names}
            variant = _fastest(names, score)
            # torch only where its pass beats every kvlab candidate's (ties to kvlab's)
            kernel = TORCH if _fastest([*names, TORCH], best) == TORCH else variant
            ms = {name: round(value, 4) for name, value in best.items()}
            hot = {name: round(value, 1) for name, value in hot.items()}
            decisions[(dtype_name, rows)] = Decision(kernel, variant, ms, hot)
    return decisions


def load_or_measure(
    directory: Path,
    digest: str,
    variants: Sequence[str],
    skinny: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor],
    shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES,
    fresh: bool = False,
    working_set: int = DEFAULT_WORKING_SET,
    quant_variants: Sequence[str] = (),
    quant_linear: Callable[[torch.Tensor, object, str], torch.Tensor] | None = None,
) -> Calibration:
    """The cached table for this key (at torch's current thread count), or (if none, or `fresh`) a new
    measurement written beside the build. With `quant_variants` (and `quant_linear` to run them) the
    quantized GEMM's variants are timed too."""
    key = calibration_key(digest, variants, shapes, torch.get_num_threads(), quant_variants)
    path = cache_path(directory, key)
    if path.exists() and not fresh:
        try:
            calibration = Calibration.from_json(json.loads(path.read_text()), path)
            if calibration.key == key:
                return calibration
        except (ValueError, KeyError, TypeError):
            pass  # a damaged file is measured again and overwritten
    print("kvlab: calibrating CPU kernels once for this machine (~20 s)...", file=sys.stderr, flush=True)
    quant = (
        measure_quant(quant_linear, quant_variants, shapes, min(working_set, QUANT_WORKING_SET))
        if quant_variants and quant_linear is not None
        else {}
    )
    calibration = Calibration(
        key, measure(skinny, variants, shapes, working_set), path, measured_now=True, quant=quant
    )
    directory.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(calibration.to_json(), indent=1))
    os.replace(partial, path)  # atomic: a concurrent reader sees the old file or the whole new one
    return calibration
