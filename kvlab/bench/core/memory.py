"""Peak memory of a measured region, right regardless of what the process did before.

CUDA: `torch.cuda.max_memory_allocated` after a reset. CPU: the process's resident high-water mark
(VmHWM), reset before the region by writing 5 to /proc/self/clear_refs (Linux >= 4.0).

Why a reset alone is not enough on CPU: glibc keeps freed heap chunks (everything below its dynamic
mmap threshold, up to 32 MiB a chunk) resident and hands them out again before it asks the kernel for
pages. A region that reuses memory the process freed earlier then raises no page and its peak rise
reads 0 (every `peak Δ` of issue 10's static-cache report). So before each region `settle()` runs
the garbage collector and `malloc_trim(0)`, which returns every free page of every arena to the
kernel (MADV_DONTNEED): resident memory is then live memory, and whatever the region touches, new or
reused, shows up as a rise. Within the region the high-water mark is the true footprint, including
fragmentation of the region's own frees.

Fragmentation inside a region still varies from run to run while glibc's mmap threshold moves (it
rises to the size of the largest chunk freed, so a 4,096-token prefill's activations land in the heap
one run and in mmap the next: measured on SmolLM2, the same SnapKV run rose 400-485 MiB). The first
measurement therefore fixes the threshold (M_MMAP_THRESHOLD through mallopt, which also stops its
adjustment) at 32 MiB, the most glibc's own rule raises it to, and the heap's trim threshold at twice
that, as the rule would. A fixed 128 KiB (glibc's starting value) made every tensor of 128 KiB or more
its own mapping, faulted in and unmapped on each use: HF's decode, which concatenates each layer's K/V
every step, ran 4-7% slower at a 512-token prompt (interleaved in one process, 2-core AMD EPYC) and
GPTQ's calibration spent half its time in the kernel. The setting holds for the bench process only,
for both paths alike.
"""

import ctypes
import ctypes.util
import functools
import gc
import re
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")

CPU_METHOD = (
    "peak RSS (VmHWM reset per run via /proc/self/clear_refs, after gc + glibc malloc_trim(0) so that "
    "resident = live memory at the start; glibc mmap threshold fixed at 32 MiB)"
)
M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD_BYTES = 2 * MMAP_THRESHOLD_BYTES


def status_bytes(key: str) -> int | None:
    """A /proc/self/status field in bytes (VmRSS, VmHWM), or None where there is no such file."""
    try:
        match = re.search(rf"^{key}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


@functools.cache
def _libc():
    """glibc, if this process runs on it (malloc_trim is glibc's); None elsewhere (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        return libc
    except (OSError, AttributeError, TypeError):
        return None


def settle() -> bool:
    """Collect garbage and return freed heap pages to the kernel; True when malloc_trim ran."""
    gc.collect()
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def resident_bytes(device: torch.device | None = None) -> int:
    """Live memory now: CUDA bytes allocated, or the process's RSS after `settle()`."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    settle()
    return status_bytes("VmRSS") or 0


class PeakMemory:
    """Context manager measuring a region's peak memory: `bytes` (absolute peak) and `delta` (rise over
    the region's start); `kind` says how it was measured."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes = 0
        self.delta = 0
        self.kind = ""
        self.start = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            self.kind = "cuda max_memory_allocated"
            return self
        trimmed = settle()
        try:
            _CLEAR_REFS.write_text("5")
            reset = True
        except OSError:
            reset = False
        self.start = status_bytes("VmRSS") or 0
        if reset and trimmed:
            self.kind = CPU_METHOD
        elif reset:
            self.kind = "peak RSS (VmHWM reset per run; no malloc_trim here: reused heap may read low)"
        else:
            self.kind = "peak RSS (process lifetime: VmHWM cannot be reset here)"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.bytes = status_bytes("VmHWM") or 0
        self.delta = max(0, self.bytes - self.start)


def model_resident_bytes(*models: torch.nn.Module) -> int:
    """Live memory with `models` loaded and every weight resident. Weights loaded from safetensors are
    file mappings that the first forward pages in (513 MiB for SmolLM2 in float32): unread, they would
    count as the first run's rise rather than as the model."""
    device = next(models[0].parameters()).device
    if device.type != "cuda":
        with torch.no_grad():
            for model in models:
                for tensor in [*model.parameters(), *model.buffers()]:
                    tensor.detach().reshape(-1)[:: max(1, 4096 // tensor.element_size())].sum()
    return resident_bytes(device)
