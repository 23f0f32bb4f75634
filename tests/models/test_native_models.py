"""Engine-native models reproduce the HF model's logits, through the paged cache, for prefill,
chunked prefill and incremental decode of several requests batched together."""

import random

import pytest
import torch

from kvlab.attention.backends.registry import get_backend
from kvlab.attention.metadata import AttentionMetadata
from kvlab.errors import ConfigError
from kvlab.models.loader import load_model
from kvlab.models.native import build_engine_model, linear


def run_schedule(
    model, backend, token_ids: list[torch.Tensor], schedule: list[list[int]], block_size: int = 4
):
    """Feed each request its tokens in steps (schedule[step][request] new tokens; 0 = idle this step),
    all active requests flattened into one batch per step. Returns per-request logits (len, vocab)."""
    lengths = [len(ids) for ids in token_ids]
    blocks = [-(-n // block_size) for n in lengths]
    free = list(range(1, sum(blocks) + 2))
    random.Random(0).shuffle(free)  # non-contiguous, interleaved block tables
    tables = [[free.pop() for _ in range(n)] for n in blocks]
    kv_caches = model.allocate_kv_caches(num_blocks=sum(blocks) + 2, block_size=block_size)
    done = [0] * len(token_ids)
    logits = [[] for _ in token_ids]
    for step in schedule:
        active = [i for i, n in enumerate(step) if n]
        metadata = AttentionMetadata.from_lists(
            query_lens=[step[i] for i in active],
            seq_lens=[done[i] + step[i] for i in active],
            block_tables=[tables[i] for i in active],
            block_size=block_size,
        )
        input_ids = torch.cat([token_ids[i][done[i] : done[i] + step[i]] for i in active])
        positions = torch.cat([torch.arange(done[i], done[i] + step[i]) for i in active])
        hidden = model(input_ids, positions, kv_caches, metadata, backend)
        step_logits = model.compute_logits(hidden).split([step[i] for i in active])
        for i, chunk in zip(active, step_logits, strict=True):
            logits[i].append(chunk)
            done[i] += step[i]
    assert done == lengths, "the schedule must consume every token"
    return [torch.cat(chunks) for chunks in logits]


def hf_logits(hf_model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(ids[None]).logits[0]


def assert_logits_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """float32 agreement up to summation order: the error of a dot product grows with the size of its
    terms, so the tolerance scales with the largest logit (the tiny models' logits reach about 20)."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got, expected, atol=1e-5 * scale, rtol=1e-4)


@pytest.fixture
def token_ids(prompt_ids):
    return [prompt_ids[0, :15], prompt_ids[1, :10]]


def test_long_prefill_mlp_in_row_chunks_matches_hf(tiny_model, token_ids, monkeypatch):
    """The Llama twin runs a long prefill's MLP over chunks of rows (peak memory); the output must not
    change. A chunk of 4 rows splits this 25-token prefill into uneven chunks."""
    from kvlab.models import llama

    if tiny_model.model.config.model_type != "llama":
        pytest.skip("only the Llama twin chunks its MLP")
    monkeypatch.setattr(llama, "MLP_CHUNK_ROWS", 4)
    model = build_engine_model(tiny_model.model)
    logits = run_schedule(model, get_backend("sdpa"), token_ids, [[15, 10]])
    for ids, got in zip(token_ids, logits, strict=True):
        assert_logits_close(got, hf_logits(tiny_model.model, ids))


@pytest.mark.parametrize("backend_name", ["sdpa", "reference", "tiled"])
def test_prefill_matches_hf(tiny_model, token_ids, backend_name):
    model = build_engine_model(tiny_model.model)
    logits = run_schedule(model, get_backend(backend_name), token_ids, [[15, 10]])
    for ids, got in zip(token_ids, logits, strict=True):
        assert_logits_close(got, hf_logits(tiny_model.model, ids))


@pytest.mark.parametrize("backend_name", ["sdpa", "tiled"])
def test_chunked_prefill_and_decode_match_hf(tiny_model, token_ids, backend_name):
    # Request 0: chunks of 6 and 5, then 4 decode steps; request 1 starts late and decodes alongside.
    schedule = [[6, 0], [5, 4], [1, 3], [1, 1], [1, 1], [1, 1]]
    model = build_engine_model(tiny_model.model)
    options = {"block_m": 4, "block_n": 8} if backend_name == "tiled" else {}
    logits = run_schedule(model, get_backend(backend_name, **options), token_ids, schedule)
    for ids, got in zip(token_ids, logits, strict=True):
        assert_logits_close(got, hf_logits(tiny_model.model, ids))


def test_single_sequence_decode_matches_hf(tiny_model, token_ids):
    """bs-1 decode: the sdpa fast path (a view of consecutive blocks when possible)."""
    model = build_engine_model(tiny_model.model)
    ids = token_ids[0]
    logits = run_schedule(model, get_backend("sdpa"), [ids], [[8]] + [[1]] * 7)[0]
    assert_logits_close(logits, hf_logits(tiny_model.model, ids))


@pytest.mark.parametrize("emulated", [True, False], ids=["float32-math", "half-math"])
def test_bfloat16_close_to_hf(tiny_model, prompt_ids, emulated, monkeypatch):
    """A 17-token prefill (many-row matmuls: float32 math where the CPU emulates bf16) and decode
    steps; both precision choices run here whatever this CPU supports."""
    monkeypatch.setattr("kvlab.models.native.emulated_half", lambda x: emulated)
    hf_model = load_model(tiny_model.name, dtype="bfloat16").model  # a copy: the fixture stays fp32
    model = build_engine_model(hf_model)
    ids = prompt_ids[0]
    logits = run_schedule(model, get_backend("sdpa"), [ids], [[17]] + [[1]] * 7)[0]
    expected = hf_logits(hf_model, ids)
    torch.testing.assert_close(logits.float(), expected.float(), atol=5e-2, rtol=5e-2)


def test_many_row_half_linear_in_float32_equals_float32_math(monkeypatch):
    monkeypatch.setattr("kvlab.models.native.emulated_half", lambda x: True)
    torch.manual_seed(0)
    x, weight, bias = torch.randn(32, 24), torch.randn(40, 24), torch.randn(40)
    half = [t.bfloat16() for t in (x, weight, bias)]
    out = linear(*half)
    assert out.dtype == torch.bfloat16
    expected = torch.nn.functional.linear(*[t.float() for t in half])
    torch.testing.assert_close(out.float(), expected, atol=0, rtol=8e-3)  # one bf16 rounding


def test_unfused_twin_matches_fused_and_copies_no_llama_weight(tiny_model, token_ids):
    fused = build_engine_model(tiny_model.model)
    unfused = build_engine_model(tiny_model.model, fuse_projections=False)
    schedule = [[6, 4], [1, 2], [1, 2]]
    short = [ids[:8] for ids in token_ids]
    for a, b in zip(
        run_schedule(fused, get_backend("sdpa"), short, schedule),
        run_schedule(unfused, get_backend("sdpa"), short, schedule),
        strict=True,
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if tiny_model.model.config.model_type == "llama":
        hf_storage = {p.data_ptr() for p in tiny_model.model.parameters()}
        assert {t.data_ptr() for t in unfused._layer_tensors()} <= hf_storage


def test_unknown_architecture_is_a_config_error(tiny_model):
    class Fake:
        class config:
            model_type = "mamba"

    with pytest.raises(ConfigError, match="supported: llama, gpt_neox"):
        build_engine_model(Fake())


def test_cache_geometry(tiny_model):
    model = build_engine_model(tiny_model.model)
    caches = model.allocate_kv_caches(num_blocks=3, block_size=4)
    assert len(caches) == tiny_model.model.config.num_hidden_layers
    assert caches[0][0].shape == (3, 4, model.num_kv_heads, model.head_dim)
    assert model.kv_bytes_per_token() == 2 * model.num_layers * model.num_kv_heads * model.head_dim * 4
    # Fused copies replace q/k/v and gate/up, so the engine reads as many weight bytes as HF holds.
    assert model.weight_bytes == tiny_model.weight_bytes


@pytest.mark.integration
def test_smollm2_matches_hf(smollm2):
    """Real weights (GGUF-converted, tied embeddings, GQA 9/3, rope_theta 1e5): a chunked prefill
    then a few decode steps reproduce HF's logits and greedy tokens."""
    text = "The capital of France is Paris, and the capital of Italy is"
    ids = smollm2.tokenizer(text, return_tensors="pt").input_ids[0]
    model = build_engine_model(smollm2.model)
    n = len(ids)
    logits = run_schedule(model, get_backend("sdpa"), [ids], [[n - 4], [2], [1], [1]], block_size=16)[0]
    expected = hf_logits(smollm2.model, ids)
    torch.testing.assert_close(logits[-6:], expected[-6:], atol=2e-3, rtol=2e-3)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize(
    "model_type, overrides",
    [
        ("gpt_neox", {"use_parallel_residual": False, "rotary_pct": 0.5}),
        ("llama", {"attention_bias": True, "mlp_bias": True, "num_key_value_heads": 1}),
    ],
    ids=["neox-sequential-residual", "llama-biases-mqa"],
)
def test_architecture_variants_match_hf(model_type, overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        **overrides,
    )
    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 128, (12,))
    logits = run_schedule(build_engine_model(hf_model), get_backend("sdpa"), [ids], [[7], [3], [1], [1]])[0]
    assert_logits_close(logits, hf_logits(hf_model, ids))


def test_the_registry_knows_each_loaded_models_context_without_loading_it(smollm2, tiny_model):
    # Bench configs check prompt lengths against it before any model loads.
    from kvlab.models.registry import MODELS

    for loaded in (smollm2, tiny_model):
        assert MODELS[loaded.name].known_context_length == loaded.context_length


def test_a_gpt_neox_without_attention_biases_runs_on_its_twin():
    # attention_bias=False leaves query_key_value and dense without a bias; the twin read .bias.detach().
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvlab.generate import generate
    from kvlab.models.registry import MODELS

    settings = dict(MODELS["tiny-gpt-neox"].config, attention_bias=False)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.2)  # context-dependent outputs
    ids = torch.randint(10, 49000, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
    result = generate(model, ids, 6, path="native")
    assert torch.equal(result.tokens, expected[:, 12:])


def test_a_bfloat16_load_keeps_the_rotary_frequencies_in_float32():
    # As from_pretrained(dtype=bfloat16) keeps them; cast with the weights they were rounded to bf16.
    from kvlab.models.loader import load_model

    def frequencies(dtype):
        model = load_model("tiny-llama", dtype=dtype).model
        return [b for name, b in model.named_buffers() if name.endswith("inv_freq")]

    half, full = frequencies("bfloat16"), frequencies("float32")
    assert half and all(
        h.dtype == torch.float32 and torch.equal(h, f) for h, f in zip(half, full, strict=True)
    )


@pytest.mark.parametrize("name", ["./no-such-dir/", "/no/such/model", "~/nowhere"])
def test_a_missing_local_directory_is_named_as_such(name):
    from kvlab.errors import ModelUnavailableError
    from kvlab.models.loader import load_model

    with pytest.raises(ModelUnavailableError, match="local model directory .* does not exist"):
        load_model(name)


def test_two_gguf_files_of_one_name_get_their_own_conversions(tmp_path, monkeypatch):
    # Keyed by the file name alone, the second file loaded the first's cached weights.
    from kvlab.models import loader

    targets = []
    monkeypatch.setattr(loader, "_convert_gguf", lambda path, target: targets.append(target))
    monkeypatch.setattr(loader, "_load_directory", lambda target, name, source: target)
    files = []
    for folder, content in (("a", b"one"), ("b", b"other")):
        (tmp_path / folder).mkdir()
        files.append(tmp_path / folder / "model.gguf")
        files[-1].write_bytes(content)
    first, second = (loader._load_gguf_file(path) for path in files)
    assert first != second and targets == [first, second]
    assert loader._load_gguf_file(files[0]) == first  # the same file: the same conversion
