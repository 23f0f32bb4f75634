"""An earlier revision's paged decode-attention op, built from this checkout's git history so the kernel
bench can time it beside today's in one process (issue 11 asks for a speed-up over 38295d3 "in the same
run"; separate processes on a VM with moody memory gave ratios that moved by 2x between runs).

The revision's `kvlab/kernels/paged_attention.cpp` and the local headers it includes are read with
`git show`, its torch library is renamed from `kvlab` to `kvlab_<revision>` (two libraries cannot both
define `kvlab::paged_decode_attention`), and it is compiled with the flags that revision's build used.
"""

import re
import subprocess
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

import kvlab

SOURCE = "kvlab/kernels/paged_attention.cpp"
# The flags of the revisions this is used for (38295d3's kvlab/kernels/cpu.py: AVX2 + FMA, OpenMP for
# at::parallel_for).
COMPILE_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
REVISION = re.compile(r"[0-9a-f]{7,40}")  # a commit id, abbreviated or whole
LOCAL_INCLUDE = re.compile(r'^#include "([^"]+)"', re.MULTILINE)
LIBRARY = re.compile(r"\b(TORCH_LIBRARY(?:_FRAGMENT|_IMPL)?)\(kvlab,")
BUILD_ROOT = Path.home() / ".cache" / "kvlab" / "past-kernels"


class PastKernelUnavailable(RuntimeError):
    """The revision's kernel cannot be built here (no git checkout, unknown revision, failed build)."""


def repository_root() -> Path:
    return Path(kvlab.__file__).resolve().parents[1]


def git_show(revision: str, path: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(repository_root()), "show", f"{revision}:{path}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise PastKernelUnavailable(f"git is not usable here ({error})") from error
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        raise PastKernelUnavailable(f"{path} at {revision} is not in this checkout's history: {reason}")
    return done.stdout


def write_sources(revision: str, directory: Path) -> Path:
    """The op's source and every local header it includes, as of `revision`, under `directory`, the
    library renamed; returns the .cpp."""
    directory.mkdir(parents=True, exist_ok=True)
    pending, seen = [SOURCE], set()
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        text = git_show(revision, path)
        if path == SOURCE:
            text, renamed = LIBRARY.subn(rf"\1(kvlab_{revision},", text)
            if not renamed:
                raise PastKernelUnavailable(f"{SOURCE} at {revision} defines no torch library named kvlab")
        (directory / Path(path).name).write_text(text)
        folder = str(Path(path).parent)
        pending += [f"{folder}/{name}" for name in LOCAL_INCLUDE.findall(text)]
    return directory / Path(SOURCE).name


@cache
def past_paged_attention(revision: str) -> Callable[..., torch.Tensor]:
    """`revision`'s paged_decode_attention(query, key_cache, value_cache, block_tables, seq_lens, scale),
    built once per process (torch caches the build across processes)."""
    if not REVISION.fullmatch(revision):
        raise PastKernelUnavailable(f"revision must be a hexadecimal commit id, got {revision!r}")
    source = write_sources(revision, BUILD_ROOT / revision)
    from torch.utils.cpp_extension import load

    try:
        load(
            name=f"kvlab_attention_{revision}",
            sources=[str(source)],
            extra_cflags=COMPILE_FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(source.parent),
            is_python_module=False,
        )
    except Exception as error:  # a compiler's failure: the bench reports it instead of the timing
        lines = str(error).strip().splitlines()
        reason = lines[-1] if lines else error
        raise PastKernelUnavailable(f"building {SOURCE} at {revision} failed: {reason}") from error
    return getattr(torch.ops, f"kvlab_{revision}").paged_decode_attention
