"""`kvlab bench --technique static-cache`: kvlab.generate's explicit prefill/decode loop over a K/V
buffer preallocated for the request, against `model.generate()`."""

from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from kvlab.bench.generate.config import BenchConfig
from kvlab.bench.generate.technique import Technique
from kvlab.cache import PreallocatedCache


def make_cache(model: PreTrainedModel, cache_tokens: int, config: BenchConfig) -> Cache | None:
    if config.forward_path == "hf":
        return PreallocatedCache(model.config.num_hidden_layers, cache_tokens)
    return None  # kvlab.generate's own static buffer, on the engine-native twin where there is one


TECHNIQUE = Technique(
    "static-cache",
    "kvlab.generate: explicit prefill/decode loop over a K/V buffer preallocated for the request "
    "(engine-native twin of the model; forward_path: hf runs the HF modules instead)",
    make_cache,
)
