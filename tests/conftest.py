import copy
import dataclasses
import os
import random
import re

import pytest
import torch


def pytest_make_parametrize_id(config, val, argname):
    """Test ids that a shell passes through unquoted: a string parameter (YAML text, a message, a
    command line) keeps its letters, digits and . - + and turns anything else into _, so a list of
    node ids (e.g. the suite in reverse order) can be handed back to pytest as arguments."""
    if isinstance(val, str):
        return re.sub(r"[^\w.+-]+", "_", val).strip("_") or "empty"
    return None


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


@pytest.fixture(autouse=True)
def _isolated_process_state():
    """Every test starts from the same global state and leaves none behind, so the suite passes in any
    order (`pytest --reverse` checks): torch's and Python's global RNGs are seeded, and the thread
    count (the CLI and the benches set it; the kernels' calibration is cached per thread count) and
    the environment are restored afterwards, also when code outside `monkeypatch` changed them."""
    threads = torch.get_num_threads()
    environment = dict(os.environ)
    torch.manual_seed(0)
    random.seed(0)
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if dict(os.environ) != environment:
        os.environ.clear()
        os.environ.update(environment)


def contextful_init_(model: torch.nn.Module, seed: int = 0, std: float = 0.5) -> torch.nn.Module:
    """Re-initialise a tiny model so that its next token depends on the context, in place.

    transformers' default init (normal, std 0.02) leaves attention and MLP outputs far below the
    token's own embedding in the residual stream; with tied embeddings greedy decoding then repeats
    one token whatever the prompt, padding or positions, and an equality test cannot fail. Every
    matrix (embeddings and projections) is drawn again at `std` from a seeded generator; norms and
    biases keep their defaults. Logits then span about +-20, so float32 paths agree with HF to
    ~1e-4 absolute. test_tiny_models.py checks the outputs vary."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():  # a tied matrix is listed once
            if parameter.dim() == 2:
                draw = torch.randn(parameter.shape, generator=generator, dtype=torch.float32) * std
                parameter.copy_(draw.to(parameter.dtype))
    return model


def load_tiny(name: str, seed: int = 0):
    """A tiny registry model (random weights) with context-dependent outputs (see contextful_init_)."""
    from kvlab.models.loader import load_model

    loaded = load_model(name)
    contextful_init_(loaded.model, seed)
    return loaded


@pytest.fixture(scope="session", params=TINY_MODELS)
def tiny_model(request):
    """A LoadedModel with random weights, once per architecture (Llama with GQA, GPT-NeoX); shared by
    the session, so a test that changes it must work on a copy."""
    return load_tiny(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded real model (SmolLM2-135M, fp32); converted once into the kvlab cache."""
    from kvlab.models.loader import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def prompt_ids():
    torch.manual_seed(0)
    return torch.randint(10, 49000, (2, 24))


def make_paged_case(
    requests: list[tuple[int, int]],
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    block_size: int = 4,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """Random paged inputs for requests given as (cached_len, new_len). Blocks are handed out in a
    shuffled order, so block tables are non-contiguous and interleaved between requests; caches are
    filled with random values everywhere (stale data in unused slots must never leak in)."""
    from kvlab.attention.metadata import AttentionMetadata  # after TRITON_INTERPRET is set, above

    generator = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-(cached + new) // block_size) for cached, new in requests]
    num_blocks = sum(blocks_needed) + 3
    free = list(range(1, num_blocks))  # block 0 stays unused: it is the table padding value
    random.Random(seed).shuffle(free)
    tables = [[free.pop() for _ in range(n)] for n in blocks_needed]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=generator).to(dtype)
    value_cache = torch.randn(shape, generator=generator).to(dtype)
    metadata = AttentionMetadata.from_lists(
        query_lens=[new for _, new in requests],
        seq_lens=[cached + new for cached, new in requests],
        block_tables=tables,
        block_size=block_size,
    )
    num_tokens = metadata.num_tokens
    query = torch.randn(num_tokens, num_heads, head_dim, generator=generator).to(dtype)
    new_keys = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator).to(dtype)
    new_values = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator).to(dtype)
    return query, new_keys, new_values, key_cache, value_cache, metadata


@pytest.fixture
def paged_case():
    """The factory above, as a fixture: paged_case(requests, num_heads=..., ...)."""
    return make_paged_case


@pytest.fixture(scope="session")
def pristine_tiny_llama():
    from kvlab.models.loader import load_model

    return load_model("tiny-llama")


@pytest.fixture
def tiny_llama(pristine_tiny_llama):
    """A private copy of tiny-llama (random weights, seed 0) that a test may quantize in place;
    copying is much cheaper than building the model and its tokenizer again."""
    return dataclasses.replace(pristine_tiny_llama, model=copy.deepcopy(pristine_tiny_llama.model))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """tiny-llama with context-dependent outputs (load_tiny) saved as a model directory, for code that
    loads a model by name in another process: `kvlab serve --model DIR`, Ray Serve replicas."""
    loaded = load_tiny("tiny-llama")
    path = tmp_path_factory.mktemp("tiny-llama-contextful")
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path
