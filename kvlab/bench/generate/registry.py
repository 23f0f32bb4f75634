"""The generation bench's registry: `kvlab bench --technique NAME`. A technique is one module that
builds a `Technique` (kvlab.bench.generate.technique) and one line below."""

from kvlab.bench.generate import press_technique, static_cache
from kvlab.bench.generate.technique import Technique

# Benches of their own, not generation techniques: the serving engine (kvlab.bench.serving), the
# HTTP server under load (kvlab.bench.loadgen), the kernel micro-benchmark (kvlab.bench.kernels) and
# quantization (kvlab.bench.quant; alias 量化).
STANDALONE_BENCHES = ("paged", "serving", "kernels", "quantization", "量化")

TECHNIQUES: dict[str, Technique] = {
    "static-cache": static_cache.TECHNIQUE,
    **press_technique.press_techniques(),  # every registered press (kvlab.press.registry)
}


def known_techniques() -> list[str]:
    return sorted([*TECHNIQUES, *STANDALONE_BENCHES])
