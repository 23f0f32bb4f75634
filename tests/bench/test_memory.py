"""Peak memory of a region must not depend on what the process freed before (issue 10)."""

import sys

import pytest
import torch

from kvlab.bench.core.memory import CPU_METHOD, PeakMemory, resident_bytes

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")


def leave_freed_heap(total_mib: int = 500) -> list[torch.Tensor]:
    """Free `total_mib` MiB of heap that glibc keeps resident for reuse: 1 MiB chunks (below the
    dynamic mmap threshold once a freed 4 MiB mmapped chunk has raised it), with a live allocation
    above the highest of them so that free() cannot trim them off the top of the heap."""
    raise_threshold = torch.ones(4 * 2**20 // 4)
    del raise_threshold
    blocks = [torch.ones(2**20 // 4) for _ in range(total_mib)]
    top = max(block.data_ptr() for block in blocks)
    pins = [torch.ones(2**16)]
    while pins[-1].data_ptr() < top and len(pins) < 64:  # small holes lower down take the first pins
        pins.append(torch.ones(2**16))
    del blocks
    return pins


@linux_only
def test_peak_rise_is_right_after_a_large_free():
    # The old measure (VmHWM reset alone) read 0 here: the 200 MB came from the resident free heap.
    pin = leave_freed_heap(500)
    with PeakMemory(torch.device("cpu")) as peak:
        block = torch.ones(200 * 10**6 // 4)  # 200 MB, every page touched
        del block
    assert peak.kind == CPU_METHOD
    assert peak.delta >= 190 * 10**6
    del pin


@linux_only
def test_peak_memory_sees_an_allocation_inside_the_region():
    with PeakMemory(torch.device("cpu")) as peak:
        block = torch.ones(256 * 2**20 // 4)  # 256 MiB, every page touched
        del block
    assert 200 * 2**20 <= peak.delta <= 320 * 2**20 and peak.bytes >= peak.start + peak.delta


@linux_only
def test_resident_bytes_follow_live_memory():
    pin = leave_freed_heap(200)
    before = resident_bytes()
    block = torch.ones(100 * 2**20 // 4)
    during = resident_bytes()
    del block
    after = resident_bytes()
    assert during - before >= 90 * 2**20  # reused heap pages count once touched again
    assert during - after >= 90 * 2**20  # and leave the count when freed
    del pin
