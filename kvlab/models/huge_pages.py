"""Model weights in 2 MiB pages (transparent huge pages), laid out in the order a forward reads them.

Batch-1 decode streams every weight from memory once per token. On 4 KiB pages that stream crosses
a page every 4 KiB: a TLB miss and a page walk for each, and the hardware prefetchers stop at every
page boundary (Intel 64 and IA-32 Architectures Optimization Reference Manual, "Hardware
Prefetching": the streamer tracks accesses within a 4 KiB page). Linux backs an anonymous region
with 2 MiB pages where the region asks for them (madvise MADV_HUGEPAGE; the kernel's
Documentation/admin-guide/mm/transhuge.rst), which is all most distributions' default THP mode
("madvise") allows. So the CPU weights of a model move into one private anonymous mapping, advised
before it is touched, each tensor at a 64-byte boundary in module order (a layer's matrices one
after the other, as the decode step reads them).

Measured on a 2-core Sapphire Rapids VM (SmolLM2-135M, `kvlab.generate` TPOT, the same model bound to
its 4 KiB-page and its huge-page weights in turn in one process, median of 8-10 rounds each): int8
8.48 -> 7.67 ms and 8.93 -> 8.10, bf16 15.42 -> 13.64, int4-g128 7.78 -> 7.38, float32 25.8 -> 25.5.
A standalone loop over SmolLM2's layer shapes streamed 10-12% faster on huge pages.

`KVLAB_HUGE_PAGES=0` turns the placement off (for A/B runs); it is also off where the kernel's THP
mode is "never", on other systems than Linux and for tensors not on the CPU.
"""

import math
import mmap
import os
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

HUGE_PAGE_BYTES = 2 * 2**20
ALIGNMENT = 64  # a cache line: every tensor starts on one, as the SIMD kernels' loads prefer
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# Live arenas as (mapping, first address, end address), for is_placed. A mapping is freed with its
# last tensor; the weak reference then drops the entry.
_arenas: list[tuple[weakref.ref, int, int]] = []


def enabled() -> bool:
    """Whether weights go to huge pages here: Linux with THP not "never" and KVLAB_HUGE_PAGES != 0."""
    if os.environ.get("KVLAB_HUGE_PAGES", "1") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in _THP_MODE.read_text()
    except OSError:
        return False


def empty(numel: int, dtype: torch.dtype) -> Tensor:
    """An uninitialised 1-D CPU tensor in a fresh mapping advised for huge pages (plain torch.empty
    where they are off)."""
    if not enabled():
        return torch.empty(numel, dtype=dtype)
    nbytes = numel * dtype.itemsize
    return _arena(nbytes)[:nbytes].view(dtype)


def zeros(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype) -> list[Tensor]:
    """Zeroed CPU tensors of `shapes`, one after another in one huge-page arena (each at a 64-byte
    boundary), written now so that they are resident as torch.zeros' are; torch.zeros where huge pages
    are off. For buffers a decode step reads in full, such as the paged KV cache (kvlab.models.native)."""
    if not enabled():
        return [torch.zeros(shape, dtype=dtype) for shape in shapes]
    sizes = [math.prod(shape) * dtype.itemsize for shape in shapes]
    arena = _arena(sum(_aligned(n) for n in sizes))
    tensors, offset = [], 0
    for shape, nbytes in zip(shapes, sizes, strict=True):
        tensors.append(arena[offset : offset + nbytes].view(dtype).view(shape).zero_())
        offset += _aligned(nbytes)
    return tensors


def _aligned(nbytes: int) -> int:
    """`nbytes` rounded up to whole ALIGNMENT units: the room a tensor takes in an arena."""
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def _arena(nbytes: int) -> Tensor:
    """`nbytes` (at least) of bytes starting on a 2 MiB boundary, in a mapping advised MADV_HUGEPAGE
    before anything touches it: the pages it faults in are then huge where the kernel has them."""
    region = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` alive while any view lives
    start = raw.data_ptr()
    _arenas[:] = [entry for entry in _arenas if entry[0]() is not None]
    _arenas.append((weakref.ref(region), start, start + raw.numel()))
    shift = -start % HUGE_PAGE_BYTES
    return raw[shift : shift + nbytes]


def is_placed(tensor: Tensor) -> bool:
    """Whether `tensor` lives in a huge-page arena made here."""
    address = tensor.data_ptr()
    return any(ref() is not None and start <= address < end for ref, start, end in _arenas)


def place_tensors(tensors: Iterable[Tensor]) -> list[Tensor]:
    """Copies of `tensors` in one huge-page arena, in the given order (one copy per distinct tensor);
    a tensor that is not on the CPU or empty, or everything when placement is off, comes back as it
    is."""
    tensors = list(tensors)
    copies = dict(_copies(tensors))
    return [copies.get(_identity(t), t) for t in tensors]


def place_module(model: nn.Module) -> int:
    """Moves every CPU parameter and buffer of `model` into one huge-page arena, in module order,
    in place (a tensor shared by several modules, such as a tied embedding, stays shared). Each
    original is released as soon as its copy is bound, so the move needs little memory beyond the
    model's own. Tensors already in an arena move too: an arena is one mapping, freed only with its
    last tensor, so after a module swap (quantization) the replaced weights' arena would otherwise
    stay resident for the sake of the few tensors left in it. Returns the bytes moved."""
    slots: dict[tuple, list] = {}  # identity -> where the tensor is bound
    tensors = []  # one per identity, in module order
    for module in model.modules():
        for kind in ("_parameters", "_buffers"):
            for name, tensor in getattr(module, kind).items():
                if tensor is None:
                    continue
                key = _identity(tensor)
                if key not in slots:
                    tensors.append(tensor.detach())
                slots.setdefault(key, []).append((module, kind, name))
    moved = 0
    with torch.no_grad():
        for key, copy in _copies(tensors, release=True):
            for module, kind, name in slots[key]:
                if kind == "_parameters":
                    module._parameters[name].data = copy
                else:
                    module._buffers[name] = copy
            moved += copy.numel() * copy.element_size()
    return moved


def _copies(tensors: list[Tensor], release: bool = False):
    """(identity, copy in a new arena) for each distinct movable tensor, in order. With `release`,
    `tensors` is emptied as it goes so that the caller holds no original once it has rebound it."""
    movable: dict[tuple, Tensor] = {}
    for tensor in tensors if enabled() else []:
        if tensor.device.type == "cpu" and tensor.numel():
            movable.setdefault(_identity(tensor), tensor)
    if release:
        tensors.clear()
    if not movable:
        return
    offsets, total = {}, 0
    for key, tensor in movable.items():
        offsets[key] = total
        total += _aligned(tensor.numel() * tensor.element_size())
    arena = _arena(total)
    for key in list(movable):
        tensor = movable.pop(key) if release else movable[key]
        nbytes = tensor.numel() * tensor.element_size()
        copy = arena[offsets[key] : offsets[key] + nbytes].view(tensor.dtype).view(tensor.shape)
        copy.copy_(tensor)
        del tensor
        yield key, copy


def _identity(tensor: Tensor) -> tuple:
    """Two tensors with this key are the same data (a tied weight seen through two modules)."""
    return (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
