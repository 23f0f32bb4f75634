"""Measurement primitives: per-token timing, peak memory, exact KV bytes, and the bandwidth floor.

Peak memory: on CUDA `torch.cuda.max_memory_allocated` after a reset; on CPU the process's resident
high-water mark (VmHWM), reset before each measured region by writing 5 to /proc/self/clear_refs
(Linux), so every run reports its own peak rather than the process's lifetime peak.
"""

import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(slots=True)
class Summary:
    """Median, min and max of repeated samples, with the raw samples kept."""

    median: float
    min: float
    max: float
    samples: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, samples: list[float]) -> "Summary":
        return cls(statistics.median(samples), min(samples), max(samples), list(samples))


def _status_kib(key: str) -> int | None:
    try:
        match = re.search(rf"^{key}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class PeakMemory:
    """Context manager measuring peak memory of a region: `bytes` (absolute peak) and `delta` (over start)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes = 0
        self.delta = 0
        self.kind = ""
        self.region_reset = True

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.kind = "cuda max_memory_allocated"
        else:
            try:
                _CLEAR_REFS.write_text("5")
            except OSError:
                self.region_reset = False  # the peak then covers the process lifetime; reported as such
            self._start = (_status_kib("VmRSS") or 0) * 1024
            self.kind = (
                "peak RSS (VmHWM, reset per run)" if self.region_reset else "peak RSS (process lifetime)"
            )
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.bytes = (_status_kib("VmHWM") or 0) * 1024
        self.delta = max(0, self.bytes - self._start)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(
    dtype: torch.dtype,
    device: torch.device,
    num_bytes: int = 256 * 2**20,
    iters: int = 10,
    kernel: str = "torch",
) -> float:
    """Sustained read bandwidth (bytes/s) of a matrix-vector product at `dtype`: what batch-1 decode does.

    The matrix (default 256 MiB) is far larger than any CPU cache, so each product streams it from memory.
    kernel: "torch" (`matrix @ vector`) or "kvlab" (the CPU skinny GEMM, kvlab.kernels.cpu).
    """
    side = int((num_bytes / torch.tensor([], dtype=dtype).element_size()) ** 0.5)
    matrix = torch.randn(side, side, device=device).to(dtype)
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
    for _ in range(2):
        product()
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        product()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return matrix.numel() * matrix.element_size() / statistics.median(times)


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Weight bytes one batch-1 decode step must read: every parameter once, except an untied input
    embedding, of which only one row is read."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    if output is None or output.weight.data_ptr() != embedding.data_ptr():
        total -= embedding.numel() * embedding.element_size() - embedding.shape[1] * embedding.element_size()
    return total


@dataclass(slots=True)
class Floor:
    """The physical limit of batch-1 decode: weight bytes per token / memory bandwidth."""

    weight_bytes_per_token: int
    bandwidth_bytes_per_s: float

    @property
    def tpot_s(self) -> float:
        return self.weight_bytes_per_token / self.bandwidth_bytes_per_s
