import os

import pytest
import torch

# Triton kernels are checked on CPU by Triton's interpreter, which must be chosen before triton is first
# imported (importing transformers may import it), so it is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests never reach the hub; a hub call would otherwise retry for ~30 s before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault(
    "KVLAB_DATA_DIR", os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
)

TINY_MODELS = ["tiny-llama", "tiny-gpt-neox"]


@pytest.fixture(scope="session", params=TINY_MODELS)
def tiny_model(request):
    """A LoadedModel with random weights, once per architecture (Llama with GQA, GPT-NeoX)."""
    from kvlab.models.loader import load_model

    return load_model(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded real model (SmolLM2-135M, fp32); converted once into the kvlab cache."""
    from kvlab.models.loader import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def prompt_ids():
    torch.manual_seed(0)
    return torch.randint(10, 49000, (2, 24))
