"""The physical floor of batch-1 decode: the bytes a step must read / the memory's bandwidth.

Each decode step of a batch of one must stream every weight from memory once, and exact attention
must read the cached K and V of every position it attends, in every layer. So no correct
implementation decodes faster than `(weight bytes + KV bytes per position x positions) / bandwidth`,
the positions averaged over the measured steps (`mean_decode_context`). A step that keeps fewer
positions (a press) reads less; its floor then counts the weights alone (`Floor.tpot_s`). The bandwidth must be the
best the memory delivers, not what one kernel reaches: torch's matrix-vector product is compute-bound
for bf16 (and for float32 on some CPUs) and then understates it (issue 10 measured a "floor" above
the TPOT it bounds). So the bandwidth here is the best of several probes, all measured in the run:

  stream sum    a multithreaded sum over a float32 tensor of 512 MiB, far larger than any cache
                (one add per 4 bytes: memory-bound on any CPU with SIMD)
  stream dot    the dot product of the two halves of that tensor (BLAS sdot: every byte read once,
                two flops per 8 bytes; on some CPUs faster than torch's cascade sum)
  torch matvec  `matrix @ vector` at the run's dtype (what HF decode does)
  kvlab skinny  kvlab's own skinny GEMM at the run's dtype (kvlab.kernels.cpu), where it runs

On the CPU the two stream probes run again with the tensor in 2 MiB pages ("(2 MiB pages)"), and the
matrix-vector probes read a matrix in them: kvlab keeps model weights there
(kvlab.models.huge_pages), and a floor read from 4 KiB pages alone could sit below what they deliver.

A bench probes right before each timed run or round (`probe_round`, `Floor.from_rounds`): what a
VM's memory delivers moves from minute to minute. On a 2-core AMD EPYC a sum read 55-68 GB/s in
spells of seconds to minutes and 30-37 GB/s otherwise, the timed decode steps with it, so the best
probe of a whole run set each TPOT against a spell it may not have run in, and the spells come and go
between the cells of one run. So each timed run is set against the floor of the probes right before
it (their best), a row's TPOT / floor is the median over its runs of those ratios
(`round_over_floor`), its floor ms the median of its runs' floors, and the fastest probe of any round
is kept beside them. The report names the probe that set the floor. A TPOT below the floor is a
measurement error.

A spell can also begin or end during a run, and then no probe describes it: the generation bench and
the paged bench's batch-1 decode probe again right after each run (`probed_run`) and measure the run
again, up to MAX_RUN_ATTEMPTS times, while the best probes before and after it differ by more than
PROBE_AGREEMENT. The criterion reads the probes alone, never the run's time; the report counts the
runs measured again.
"""

import dataclasses
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kvlab.bench.core.metrics import synchronize
from kvlab.models import huge_pages

STREAM_BYTES = 512 * 2**20
HUGE_PAGES_SUFFIX = " (2 MiB pages)"
MATVEC_BYTES = 256 * 2**20
ROUND_ITERS = 3  # timed passes per probe when a bench probes every round
PROBE_AGREEMENT = 0.15  # best probes before and after a run further apart: the speed changed during it
MAX_RUN_ATTEMPTS = 3


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Weight bytes one batch-1 decode step must read: every parameter (and every quantized module's
    codes, scales and offsets: kvlab.quant keeps them as buffers) once, except an untied input
    embedding, of which only one row is read."""
    from kvlab.quant.modules import quantized_tensors

    seen, total = set(), 0
    for tensor in [*model.parameters(), *quantized_tensors(model)]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    embedding = model.get_input_embeddings()
    output = model.get_output_embeddings()
    embedding_tensors = _tensors_of(embedding)
    if output is None or {t.data_ptr() for t in _tensors_of(output)} != {
        t.data_ptr() for t in embedding_tensors
    }:
        rows = embedding.weight.shape[0] if hasattr(embedding, "weight") else embedding.num_embeddings
        table = sum(t.numel() * t.element_size() for t in embedding_tensors)
        total -= table - table // rows
    return total


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a decoder's KV cache, from its HF config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def kv_bytes_per_position(model: torch.nn.Module) -> int:
    """K and V bytes one cached position holds over all layers, at the model's dtype: what exact
    attention reads per attended position in a decode step (a batch-1 row, full-precision cache)."""
    layers, kv_heads, head_dim = kv_shape(model.config)
    return 2 * layers * kv_heads * head_dim * model.dtype.itemsize


def mean_decode_context(prompt_len: int, new_tokens: int) -> float:
    """Positions a decode step attends, averaged over the steps TPOT times: the step that feeds token
    k (k = 1 .. new_tokens - 1; token 0 comes from the prefill) attends prompt_len + k positions."""
    return prompt_len + new_tokens / 2


def _tensors_of(module: torch.nn.Module) -> list[torch.Tensor]:
    """A linear or embedding module's weight storage: its weight, or its quantized buffers."""
    from kvlab.quant.modules import quantized_tensors

    return quantized_tensors(module) or [module.weight]


def best_seconds(run: Callable[[], object], device: torch.device, iters: int) -> float:
    """Fastest of `iters` timed calls after two warm-ups: the floor wants the memory's best."""
    import time

    for _ in range(2):
        run()
    best = float("inf")
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def stream_read_bandwidth(
    device: torch.device, num_bytes: int = STREAM_BYTES, iters: int = 8
) -> dict[str, float]:
    """Bytes/s of reading a float32 tensor of `num_bytes` (default 512 MiB) once: by a sum and by the
    dot product of its two halves. On the CPU also with the tensor in 2 MiB pages, where kvlab keeps
    model weights (kvlab.models.huge_pages): the floor is the faster of the two."""
    probes = {}
    for suffix, data in _stream_buffers(num_bytes // 4, device):
        for name, bandwidth in _stream_probes(data.fill_(1.0), device, iters).items():
            probes[name + suffix] = bandwidth
        del data  # before the next buffer: one resident at a time
    return probes


def _stream_probes(data: torch.Tensor, device: torch.device, iters: int) -> dict[str, float]:
    half = data.numel() // 2
    first, second = data[:half], data[half : 2 * half]
    return {
        "stream sum": data.numel() * 4 / best_seconds(lambda: data.sum(), device, iters),
        "stream dot": 2 * half * 4 / best_seconds(lambda: torch.dot(first, second), device, iters),
    }


def _stream_buffers(numel: int, device: torch.device):
    """(name suffix, float32 tensor of `numel`): one on ordinary pages, and on the CPU where huge
    pages are on, one in them; made one at a time, so that only one is resident."""
    yield "", torch.empty(numel, dtype=torch.float32, device=device)
    if device.type == "cpu" and huge_pages.enabled():
        yield HUGE_PAGES_SUFFIX, huge_pages.empty(numel, torch.float32)


def matvec_bandwidth(
    dtype: torch.dtype,
    device: torch.device,
    num_bytes: int = MATVEC_BYTES,
    iters: int = 8,
    kernel: str = "torch",
) -> float:
    """Bytes/s of a matrix-vector product at `dtype` over a `num_bytes` matrix (what batch-1 decode
    does). kernel: "torch" (`matrix @ vector`) or "kvlab" (the CPU skinny GEMM)."""
    side = int((num_bytes / torch.tensor([], dtype=dtype).element_size()) ** 0.5)
    matrix = torch.randn(side, side, device=device).to(dtype)
    if device.type == "cpu":  # where the model's weights are (kvlab.models.huge_pages)
        matrix = huge_pages.place_tensors([matrix])[0]
    vector = torch.randn(side, device=device).to(dtype)
    if kernel == "kvlab":
        from kvlab.kernels import cpu as cpu_kernels

        rows = vector[None]

        def product():
            return cpu_kernels.skinny_linear(rows, matrix)
    elif kernel == "torch":

        def product():
            return matrix @ vector
    else:
        raise ValueError(f"unknown kernel {kernel!r}; choose torch or kvlab")
    return matrix.numel() * matrix.element_size() / best_seconds(product, device, iters)


def kvlab_kernel_runs(dtype: torch.dtype, device: torch.device) -> bool:
    if device.type != "cpu":
        return False
    from kvlab.kernels import cpu as cpu_kernels

    return dtype in cpu_kernels.SKINNY_DTYPES and cpu_kernels.available()


def bandwidth_probes(dtype: torch.dtype, device: torch.device, iters: int = 8) -> dict[str, float]:
    """Every probe's bandwidth (bytes/s) now, by name: each the fastest of `iters` timed passes."""
    probes = stream_read_bandwidth(device, iters=iters)
    probes["torch matvec"] = matvec_bandwidth(dtype, device, iters=iters)
    if kvlab_kernel_runs(dtype, device):
        probes["kvlab skinny"] = matvec_bandwidth(dtype, device, iters=iters, kernel="kvlab")
    return probes


def best_probe(probes: dict[str, float]) -> float:
    """A round's bandwidth: the best of its probes (what the memory delivered at least, then)."""
    return max(probes.values())


def round_over_floor(times: Sequence[float], floors: Sequence[float]) -> float:
    """Median over the rounds of each round's time over its own round's floor."""
    return statistics.median(t / f for t, f in zip(times, floors, strict=True))


def round_bandwidth(rounds: Sequence[dict[str, float]]) -> tuple[str, float]:
    """(the probe that was best in most rounds, the median over the rounds of each round's best)."""
    if not rounds:
        raise ValueError("the floor needs at least one round of bandwidth probes")
    winners = Counter(max(probes, key=probes.__getitem__) for probes in rounds)
    return winners.most_common(1)[0][0], statistics.median(best_probe(probes) for probes in rounds)


def probe_medians(rounds: Sequence[dict[str, float]]) -> dict[str, float]:
    """Each probe's median over the rounds."""
    return (
        {name: statistics.median(r[name] for r in rounds if name in r) for name in rounds[0]}
        if rounds
        else {}
    )


@dataclass(slots=True)
class Floor:
    """Bytes a decode step reads / the memory's bandwidth over the run's probe rounds (from_rounds)."""

    weight_bytes_per_token: int
    bandwidth_bytes_per_s: float
    probe: str = ""
    probes: dict[str, float] = field(default_factory=dict)  # per probe: its median over the rounds
    kv_bytes_per_position: int = 0
    rounds: int = 1
    fastest_bytes_per_s: float = 0.0  # the fastest probe of any round
    remeasured_runs: int | None = None  # runs measured again by probed_run (None: not probed after)

    @property
    def tpot_s(self) -> float:
        """The weights' share alone: the floor of a step that attends no cached position."""
        return self.tpot_at(0.0)

    def tpot_at(self, context: float, batch: int = 1) -> float:
        """The floor of a step of `batch` rows that each attend `context` cached positions."""
        kv_bytes = batch * context * self.kv_bytes_per_position
        return (self.weight_bytes_per_token + kv_bytes) / self.bandwidth_bytes_per_s

    def at_bandwidth(self, bandwidth_bytes_per_s: float) -> "Floor":
        """The same bytes over another bandwidth (one round's best probe)."""
        return dataclasses.replace(self, bandwidth_bytes_per_s=bandwidth_bytes_per_s)

    @classmethod
    def from_rounds(
        cls,
        weight_bytes_per_token: int,
        rounds: Sequence[dict[str, float]],
        kv_bytes_per_position: int = 0,
    ) -> "Floor":
        """`rounds`: every probe's bandwidth, once per round of the timed runs (bandwidth_probes)."""
        probe, bandwidth = round_bandwidth(rounds)
        probes = probe_medians(rounds)
        fastest = max(best_probe(r) for r in rounds)
        return cls(
            weight_bytes_per_token, bandwidth, probe, probes, kv_bytes_per_position, len(rounds), fastest
        )

    @classmethod
    def from_probes(
        cls, weight_bytes_per_token: int, probes: dict[str, float], kv_bytes_per_position: int = 0
    ) -> "Floor":
        """One round: the best probe sets the floor."""
        return cls.from_rounds(weight_bytes_per_token, [probes], kv_bytes_per_position)

    def to_dict(self) -> dict:
        return {
            "weight_bytes_per_token": self.weight_bytes_per_token,
            "kv_bytes_per_position": self.kv_bytes_per_position,
            "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
            "floor_tpot_s": self.tpot_s,
            "probe": self.probe,
            "probes_bytes_per_s": self.probes,
            "probe_rounds": self.rounds,
            "fastest_probe_bytes_per_s": self.fastest_bytes_per_s,
        } | ({} if self.remeasured_runs is None else {"remeasured_runs": self.remeasured_runs})


def measure_floor(model: torch.nn.Module) -> Floor:
    """The floor of batch-1 decode for `model` (its dtype and device), measured now in one round."""
    return floor_of_rounds(model, [bandwidth_probes(model.dtype, model.device)])


def probe_round(model: torch.nn.Module) -> dict[str, float]:
    """One round's probes at `model`'s dtype and device, shortened to be taken beside every timed round."""
    return bandwidth_probes(model.dtype, model.device, iters=ROUND_ITERS)


@dataclass
class ProbedRun:
    """A timed run between two probe rounds (`probed_run`)."""

    result: object
    probes: dict[str, float]  # per probe, the better of its readings before and after the run
    attempts: int  # runs measured, the kept one last


def probes_agree(before: dict[str, float], after: dict[str, float]) -> bool:
    """Whether two probe rounds saw one memory speed: their best probes within PROBE_AGREEMENT."""
    first, second = best_probe(before), best_probe(after)
    return abs(first - second) <= PROBE_AGREEMENT * max(first, second)


def probed_run(
    model: torch.nn.Module,
    run: Callable[[], object],
    probe: Callable[[torch.nn.Module], dict[str, float]] = probe_round,
    attempts: int = MAX_RUN_ATTEMPTS,
) -> ProbedRun:
    """`run()` between two probe rounds, measured again while the probes before and after it disagree
    (the memory changed speed during it, so neither describes it), at most `attempts` times; the last
    run is kept either way. A retry's "before" is the failed attempt's "after"."""
    before = probe(model)
    for attempt in range(1, attempts + 1):
        result = run()
        after = probe(model)
        if probes_agree(before, after) or attempt == attempts:
            merged = {name: max(before[name], after.get(name, 0.0)) for name in before}
            return ProbedRun(result, merged, attempt)
        before = after
    raise ValueError(f"attempts must be >= 1, got {attempts}")


def floor_of_rounds(model: torch.nn.Module, rounds: Sequence[dict[str, float]]) -> Floor:
    """The floor of batch-1 decode for `model` over probe rounds taken beside its timed runs."""
    return Floor.from_rounds(decode_weight_bytes(model), rounds, kv_bytes_per_position(model))


def below_floor(tpot_s: float, floor_tpot_s: float) -> bool:
    """A TPOT under the floor cannot be: the timing (or the floor's byte count) is wrong."""
    return tpot_s < floor_tpot_s
