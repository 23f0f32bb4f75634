"""Compiling the C++ CPU kernels: once per source digest, into kvlab's cache, announced on stderr.

The torch ops (OP_SOURCES) build with AVX2 flags through torch.utils.cpp_extension. The ISA variants
of the skinny GEMMs (float: skinny_*.cpp; quantized: quant_*.cpp) are separate translation units,
each compiled here with its own -m flags and linked in; skinny_gemm.cpp calls one only where the CPU
reports its instructions, so the library loads on any AVX2 CPU (why they include no torch header:
skinny_variants.h). `make install` builds ahead (`python -m kvlab.kernels build`); otherwise the
first use does, once, with a line on stderr so the wait is not mistaken for a slow first token.
"""

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

KERNEL_DIR = Path(__file__).parent
OP_SOURCES = (
    "skinny_gemm.cpp",
    "quant_gemm.cpp",
    "paged_attention.cpp",
    "rms_norm.cpp",
    "rotary.cpp",
    "decode_step.cpp",
    "argmax.cpp",
)
OP_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp")  # -fopenmp: at::parallel_for uses OpenMP
# source -> its own ISA flags; the CPU check before each call lives in skinny_gemm.cpp.
VARIANT_SOURCES = {
    "skinny_avx2.cpp": ("-mavx2", "-mfma"),
    "skinny_avx512.cpp": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma"),
    "skinny_avx512bf16.cpp": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma"),
    "skinny_amx.cpp": ("-mamx-tile", "-mamx-bf16", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"),
    "quant_avx2.cpp": ("-mavx2", "-mfma", "-mf16c"),
    "quant_avx512.cpp": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-mf16c"),
    "quant_avx512vnni.cpp": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-mf16c"),
    "quant_avx512_x16.cpp": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-mf16c"),
}
VARIANT_FLAGS = ("-O3", "-std=c++17", "-fPIC")


def compiler() -> str:
    return os.environ.get("CXX", "c++")


def cache_root() -> Path:
    """kvlab's cache (the same $KVLAB_CACHE the model loader uses); the kernels build under kernels/."""
    return Path(os.environ.get("KVLAB_CACHE", Path.home() / ".cache" / "kvlab")) / "kernels"


def source_digest() -> str:
    """Names the build after its sources, headers and flags, so an edited kernel is rebuilt."""
    digest = hashlib.sha256()
    for path in sorted(KERNEL_DIR.glob("*.cpp")) + sorted(KERNEL_DIR.glob("*.h")):
        digest.update(path.name.encode() + path.read_bytes())
    digest.update(repr((OP_FLAGS, VARIANT_SOURCES, VARIANT_FLAGS, torch.__version__)).encode())
    return digest.hexdigest()[:12]


def extension_name() -> str:
    return f"kvlab_cpu_kernels_{source_digest()}"


def build_dir() -> Path:
    return cache_root() / extension_name()


def is_built() -> bool:
    return (build_dir() / f"{extension_name()}.so").exists()


def _compile_variants(directory: Path) -> list[str]:
    """One object per ISA variant, compiled in parallel; written under a temporary name and renamed,
    so a concurrent build in another process never links a half-written object."""
    jobs, objects = [], []
    for source, isa_flags in VARIANT_SOURCES.items():
        target = directory / (Path(source).stem + ".o")
        objects.append(str(target))
        if target.exists():
            continue
        handle, partial = tempfile.mkstemp(suffix=".o", dir=directory)
        os.close(handle)
        command = [compiler(), *VARIANT_FLAGS, *isa_flags, "-c", str(KERNEL_DIR / source), "-o", partial]
        jobs.append((subprocess.Popen(command, stderr=subprocess.PIPE, text=True), partial, target))
    for process, partial, target in jobs:
        _, errors = process.communicate()
        if process.returncode != 0:
            Path(partial).unlink(missing_ok=True)
            lines = [line for line in errors.splitlines() if "error" in line] or errors.splitlines() or [""]
            raise RuntimeError(f"{target.stem}: {lines[0]}")
        os.replace(partial, target)
    return objects


def build_and_load() -> Path:
    """Compile (unless this digest is built) and load the ops into torch.ops.kvlab; the build folder."""
    from torch.utils.cpp_extension import load

    directory = build_dir()
    if not is_built():
        print("kvlab: compiling CPU kernels once (~20 s)...", file=sys.stderr, flush=True)
    directory.mkdir(parents=True, exist_ok=True)
    objects = _compile_variants(directory)
    load(
        name=extension_name(),
        sources=[str(KERNEL_DIR / name) for name in OP_SOURCES],
        extra_cflags=list(OP_FLAGS),
        extra_ldflags=["-fopenmp", *objects],
        build_directory=str(directory),
        is_python_module=False,
    )
    return directory
