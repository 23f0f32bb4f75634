"""The fused Llama decode step (kvlab/kernels/decode_step.cpp) gives the logits of the op-by-op
forward and of the HF model, for batches of requests over shuffled paged blocks, at any thread count
(which changes how attention is split into shares), under presses with per-layer metadata and
rings, and refuses metadata that would write outside the cache."""

import copy
import random

import pytest
import torch
from conftest import load_tiny

from kvlab.attention.backends.registry import get_backend
from kvlab.attention.metadata import AttentionMetadata
from kvlab.generate import generate
from kvlab.kernels import cpu as cpu_kernels
from kvlab.models.llama import LlamaEngineModel
from kvlab.models.native import build_engine_model
from kvlab.press.budget import Budget
from kvlab.press.registry import get_press
from kvlab.quant import QuantSpec, quantize_model

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available(), reason=f"kvlab CPU kernels: {cpu_kernels.build_failure()}"
)

BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def tiny_llama():
    return load_tiny("tiny-llama")


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused steps that ran (so a test cannot pass by silently running op by op)."""
    calls = []
    original = cpu_kernels.decode_step

    def counting(input_ids, *args, **kwargs):
        calls.append(input_ids.shape[0])
        return original(input_ids, *args, **kwargs)

    monkeypatch.setattr(cpu_kernels, "decode_step", counting)
    return calls


def decode_logits(hf_model, dtype, prompt_lens, steps, seed=0, head_in_step=False):
    """Prefill requests of `prompt_lens` tokens, then `steps` batched decode steps of fixed random
    tokens, over shuffled blocks; -> the decode steps' logits (steps, requests, vocab), float32.
    A bf16 run converts a copy (the fixture is shared; a round trip would round its buffers too).
    head_in_step: the steps' logits from `decode_logits` (the LM head inside the fused step), else
    from the forward and then `compute_logits`."""
    model = build_engine_model(hf_model if dtype == torch.float32 else copy.deepcopy(hf_model).to(dtype))
    generator = torch.Generator().manual_seed(seed)
    total = [n + steps for n in prompt_lens]
    tokens = [torch.randint(10, 1000, (n,), generator=generator) for n in total]
    blocks = [-(-n // BLOCK_SIZE) for n in total]
    free = list(range(sum(blocks)))
    random.Random(seed).shuffle(free)
    tables = [[free.pop() for _ in range(n)] for n in blocks]
    caches = model.allocate_kv_caches(num_blocks=sum(blocks), block_size=BLOCK_SIZE)
    backend = get_backend("cpu_paged")
    for ids, n, table in zip(tokens, prompt_lens, tables, strict=True):
        metadata = AttentionMetadata.from_lists([n], [n], [table], BLOCK_SIZE)
        model(ids[:n], torch.arange(n), caches, metadata, backend)
    logits = []
    for step in range(steps):
        seq_lens = [n + step + 1 for n in prompt_lens]
        metadata = AttentionMetadata.from_lists([1] * len(tokens), seq_lens, tables, BLOCK_SIZE)
        input_ids = torch.stack([ids[length - 1] for ids, length in zip(tokens, seq_lens, strict=True)])
        positions = torch.tensor(seq_lens) - 1
        if head_in_step:
            step_logits = model.decode_logits(input_ids, positions, caches, metadata, backend)
        else:
            step_logits = model.compute_logits(model(input_ids, positions, caches, metadata, backend))
        logits.append(step_logits.float())
    return torch.stack(logits), tokens


def op_by_op(monkeypatch, *args):
    with monkeypatch.context() as patch:
        patch.setenv("KVLAB_FUSED_DECODE", "0")
        return decode_logits(*args)[0]


def assert_float32_close(got, expected):
    """Equal up to summation order, whose error grows with the terms (tiny-model logits reach ~20)."""
    torch.testing.assert_close(got, expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_float32_fused_steps_equal_op_by_op_and_hf(tiny_llama, fused_calls, monkeypatch, threads):
    """Three requests of different lengths; 3 threads over 2 kv heads split each context in shares."""
    # The kernel choice stays the one calibrated at this process' thread count (a calibration per
    # thread count would take seconds); the thread count changes how the step splits its work.
    table = cpu_kernels.calibration()
    monkeypatch.setattr(cpu_kernels, "calibration", lambda: table)
    torch.set_num_threads(threads)
    prompt_lens, steps = [5, 70, 33], 6
    fused, tokens = decode_logits(tiny_llama.model, torch.float32, prompt_lens, steps)
    assert fused_calls == [3] * steps
    assert_float32_close(fused, op_by_op(monkeypatch, tiny_llama.model, torch.float32, prompt_lens, steps))
    with torch.no_grad():
        for row, (ids, n) in enumerate(zip(tokens, prompt_lens, strict=True)):
            assert_float32_close(fused[:, row], tiny_llama.model(ids[None]).logits[0, n : n + steps].float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prompt_lens", [[21], [5, 70, 33]])
def test_the_lm_head_inside_the_step_gives_the_logits_of_the_head_after_it(
    tiny_llama, fused_calls, monkeypatch, dtype, prompt_lens
):
    """The same kernel over the same final-normed rows, rounded alike: equal bit for bit, and the
    head no longer runs as an op of its own."""
    steps = 4
    apart, _ = decode_logits(tiny_llama.model, dtype, prompt_lens, steps)
    head_calls = []
    skinny_linear = cpu_kernels.skinny_linear
    monkeypatch.setattr(
        cpu_kernels,
        "skinny_linear",
        lambda x, w, *a, **k: head_calls.append(w.shape) or skinny_linear(x, w, *a, **k),
    )
    inside, _ = decode_logits(tiny_llama.model, dtype, prompt_lens, steps, head_in_step=True)
    vocab = tiny_llama.model.config.vocab_size
    assert not [shape for shape in head_calls if shape[0] == vocab]
    assert fused_calls == [len(prompt_lens)] * (2 * steps)
    assert torch.equal(inside, apart)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_one_row_step_computes_alike_in_every_walk(tiny_llama, fused_calls, monkeypatch, dtype):
    """At one row the step's matmuls walk the weights, walk them with non-temporal requests ("/nt":
    only cache hints, so the same floats) or run the register tiles (another summation order)."""
    chosen = cpu_kernels.fused_decode_variant
    logits = {}
    for option in ("", "/nt", "/tiles"):
        with monkeypatch.context() as patch:
            patch.setattr(
                cpu_kernels,
                "fused_decode_variant",
                lambda *args, option=option: (
                    None if chosen(*args) is None else chosen(*args).split("/")[0] + option
                ),
            )
            logits[option], _ = decode_logits(tiny_llama.model, dtype, [21], 3)
    if not fused_calls:
        pytest.skip("the calibration gave one-row steps to torch here")
    assert fused_calls == [1] * 9
    assert torch.equal(logits["/nt"], logits[""])
    scale = logits[""].abs().max().item()
    torch.testing.assert_close(logits["/tiles"], logits[""], atol=0.02 * scale, rtol=0.02)


@pytest.mark.parametrize("variant", [None, "amx"])
def test_bfloat16_fused_steps_round_where_the_op_by_op_forward_rounds(
    tiny_llama, fused_calls, monkeypatch, variant
):
    """bf16 values are rounded at the same points; what remains is float32 summation order inside a
    dot product, which a bf16 rounding can turn into one bf16 step of a logit. `variant`: the
    calibration's choice, or the AMX kernels forced (they configure and release their tiles per call,
    inside the step's OpenMP region)."""
    if variant is not None:
        if variant not in cpu_kernels.supported_variants():
            pytest.skip(f"this CPU lacks the instructions of the {variant} variant")
        chosen = cpu_kernels.fused_decode_variant
        monkeypatch.setattr(
            cpu_kernels, "fused_decode_variant", lambda *args: variant if chosen(*args) is not None else None
        )
    prompt_lens, steps = [9, 40], 5
    model = tiny_llama.model
    fused, _ = decode_logits(model, torch.bfloat16, prompt_lens, steps)
    reference = op_by_op(monkeypatch, model, torch.bfloat16, prompt_lens, steps)
    assert fused_calls == [2] * steps
    scale = reference.abs().max().item()
    torch.testing.assert_close(fused, reference, atol=0.02 * scale, rtol=0.02)
    assert torch.equal(fused.argmax(-1), reference.argmax(-1))


@pytest.mark.parametrize("spec", ["int8", "int4-g32", "int4-g64-asym", "int4-g128"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("variant", [None, "avx512vnni-x16"])
def test_quantized_fused_steps_equal_op_by_op(tiny_llama, fused_calls, monkeypatch, spec, threads, variant):
    """A quantized model's step reads the packed codes with the quantized GEMM's kernel, as its
    linear layers do op by op: equal up to summation order, at any thread count. `variant`: the
    calibration's choice, or the int16-input kernel forced (it rounds each thread's inputs itself)."""
    if variant is not None:
        if variant not in cpu_kernels.quant_variants():
            pytest.skip(f"this CPU lacks the instructions of the {variant} variant")
        monkeypatch.setenv("KVLAB_QUANT_VARIANT", variant)
    table = cpu_kernels.calibration()
    monkeypatch.setattr(cpu_kernels, "calibration", lambda: table)
    torch.set_num_threads(threads)
    model = copy.deepcopy(tiny_llama.model)
    quantize_model(model, QuantSpec.parse(spec))
    prompt_lens, steps = [5, 70, 33], 4
    fused, _ = decode_logits(model, torch.float32, prompt_lens, steps)
    assert fused_calls == [3] * steps
    assert_float32_close(fused, op_by_op(monkeypatch, model, torch.float32, prompt_lens, steps))


def test_a_quantized_bfloat16_step_rounds_where_the_op_by_op_forward_rounds(
    tiny_llama, fused_calls, monkeypatch
):
    model = copy.deepcopy(tiny_llama.model)
    quantize_model(model, QuantSpec.parse("int4-g32"))
    prompt_lens, steps = [9, 40], 4
    fused, _ = decode_logits(model, torch.bfloat16, prompt_lens, steps)
    reference = op_by_op(monkeypatch, model, torch.bfloat16, prompt_lens, steps)
    assert fused_calls == [2] * steps
    torch.testing.assert_close(fused, reference, atol=0.02 * reference.abs().max().item(), rtol=0.02)
    assert torch.equal(fused.argmax(-1), reference.argmax(-1))


def test_the_integer_quantized_variant_runs_op_by_op(tiny_llama, fused_calls, monkeypatch):
    if "avx512vnni" not in cpu_kernels.quant_variants():
        pytest.skip("this CPU lacks AVX512-VNNI")
    monkeypatch.setenv("KVLAB_QUANT_VARIANT", "avx512vnni")
    model = copy.deepcopy(tiny_llama.model)
    quantize_model(model, QuantSpec.parse("int8"))
    decode_logits(model, torch.float32, [7], 2)
    assert fused_calls == []


@pytest.mark.parametrize(
    "name, budget",
    [("pyramidkv", Budget(compression_ratio=0.5)), ("streaming_llm", Budget(max_cache_tokens=16))],
)
def test_presses_run_fused_with_their_per_layer_slots(tiny_llama, fused_calls, monkeypatch, name, budget):
    """PyramidKV gives layers different slot counts (per-layer metadata); StreamingLLM writes each new
    token over a ring slot in the middle of the table, not after the last position."""
    press = get_press(name, **({"window": 4} if name == "pyramidkv" else {}))
    prompt = torch.randint(10, 49000, (1, 40), generator=torch.Generator().manual_seed(1))
    fused = generate(tiny_llama.model, prompt, 30, press=press, budget=budget)
    assert fused.path == "native" and len(fused_calls) == 29
    monkeypatch.setenv("KVLAB_FUSED_DECODE", "0")
    assert torch.equal(
        fused.tokens, generate(tiny_llama.model, prompt, 30, press=press, budget=budget).tokens
    )


def test_a_generation_decides_its_one_op_step_once(tiny_llama, fused_calls, monkeypatch):
    """Every decode step of a kvlab.generate call has the first one's shape, so the checks that pick
    the step's variant run once, not per token; the tokens are those of the op-by-op forward."""
    decisions = []
    original = LlamaEngineModel.decode_logits_variant

    def counting(self, *args):
        decisions.append(original(self, *args))
        return decisions[-1]

    monkeypatch.setattr(LlamaEngineModel, "decode_logits_variant", counting)
    prompt = torch.randint(10, 49000, (2, 12), generator=torch.Generator().manual_seed(3))
    fused = generate(tiny_llama.model, prompt, 9)
    assert len(decisions) == 1 and decisions[0] and fused_calls == [2] * 8
    monkeypatch.setenv("KVLAB_FUSED_DECODE", "0")
    assert torch.equal(fused.tokens, generate(tiny_llama.model, prompt, 9).tokens)
    assert set(decisions[1:]) == {None} and len(fused_calls) == 8  # op by op when switched off


def test_a_slot_outside_the_cache_is_refused_before_anything_is_written(tiny_llama):
    model = build_engine_model(tiny_llama.model)
    caches = model.allocate_kv_caches(num_blocks=2, block_size=BLOCK_SIZE)
    metadata = AttentionMetadata.from_lists([1], [3], [[1]], BLOCK_SIZE)
    metadata.slot_mapping = torch.tensor([8])  # 2 blocks x 4 slots: 0..7
    with pytest.raises(
        RuntimeError, match=r"decode_step: slot_mapping\[0\] = 8 is outside the cache's 8 slots"
    ):
        model(torch.tensor([5]), torch.tensor([2]), caches, metadata, get_backend("cpu_paged"))
    assert all(not cache.any() for pair in caches for cache in pair)


@pytest.mark.parametrize("field", ["input_ids", "positions"])
def test_a_token_or_position_outside_its_table_is_refused_before_anything_is_written(tiny_llama, field):
    """The step looks up the embedding and RoPE rows itself: an index past a table is an error."""
    model = build_engine_model(tiny_llama.model)
    caches = model.allocate_kv_caches(num_blocks=2, block_size=BLOCK_SIZE)
    metadata = AttentionMetadata.from_lists([1], [3], [[1]], BLOCK_SIZE)
    bound = model.embed.shape[0] if field == "input_ids" else model.rotary.cos.shape[0]
    inputs = {"input_ids": torch.tensor([5]), "positions": torch.tensor([2])} | {field: torch.tensor([bound])}
    with pytest.raises(
        RuntimeError, match=rf"decode_step: {field}\[0\] = {bound} is outside .* \[0, {bound}\)"
    ):
        model(inputs["input_ids"], inputs["positions"], caches, metadata, get_backend("cpu_paged"))
    assert all(not cache.any() for pair in caches for cache in pair)


def test_metadata_is_one_entry_every_layer_reads_or_one_per_layer(tiny_llama):
    model = build_engine_model(tiny_llama.model)
    caches = model.allocate_kv_caches(num_blocks=2, block_size=BLOCK_SIZE)
    model(
        torch.tensor([5, 6]),
        torch.tensor([0, 1]),
        caches,
        AttentionMetadata.from_lists([2], [2], [[1]], BLOCK_SIZE),
        get_backend("cpu_paged"),
    )
    metadata = AttentionMetadata.from_lists([1], [3], [[1]], BLOCK_SIZE)
    model._step_weights = model._step_weights or model._split_step_weights()
    variant = cpu_kernels.fused_decode_variant(torch.float32, 1)

    def step(per_layer):
        return cpu_kernels.decode_step(
            torch.tensor([7]),
            torch.tensor([2]),
            model.embed,
            (model.rotary.cos, model.rotary.sin),
            model._step_weights,
            model.final_norm,
            cpu_kernels.step_caches(caches),
            per_layer,
            model.num_heads,
            model.eps,
            model.scale,
            variant,
        )

    layers = model.num_layers
    shared = step([metadata] * layers)  # one object for every layer: the op is handed it once
    assert torch.equal(shared, step([copy.copy(metadata) for _ in range(layers)]))
    with pytest.raises(RuntimeError, match=rf"need one entry, or one per layer \({layers}\)"):
        step([copy.copy(metadata) for _ in range(layers + 1)])


def test_new_caches_are_handed_to_the_step_anew(tiny_llama, fused_calls):
    """The step keeps the one-object form of the caches it last read; another cache list (the next
    kvlab.generate call of a long-lived engine model) must not decode against the old buffers."""
    model = build_engine_model(tiny_llama.model)
    backend = get_backend("cpu_paged")
    outputs = []
    for prompt in ([5, 6, 7], [9, 8, 7]):
        caches = model.allocate_kv_caches(num_blocks=2, block_size=BLOCK_SIZE)
        model(
            torch.tensor(prompt),
            torch.arange(3),
            caches,
            AttentionMetadata.from_lists([3], [3], [[1]], BLOCK_SIZE),
            backend,
        )
        metadata = AttentionMetadata.from_lists([1], [4], [[1]], BLOCK_SIZE)
        outputs.append(model(torch.tensor([4]), torch.tensor([3]), caches, metadata, backend))
    fresh = build_engine_model(tiny_llama.model)
    caches = fresh.allocate_kv_caches(num_blocks=2, block_size=BLOCK_SIZE)
    fresh(
        torch.tensor([9, 8, 7]),
        torch.arange(3),
        caches,
        AttentionMetadata.from_lists([3], [3], [[1]], BLOCK_SIZE),
        backend,
    )
    expected = fresh(
        torch.tensor([4]),
        torch.tensor([3]),
        caches,
        AttentionMetadata.from_lists([1], [4], [[1]], BLOCK_SIZE),
        backend,
    )
    assert torch.equal(outputs[1], expected) and not torch.equal(outputs[0], outputs[1])
    assert len(fused_calls) == 3  # every decode step above ran as the one op


def test_metadata_of_one_row_for_several_requests_is_refused(tiny_llama):
    # (1, M) lengths and a (1, width) table passed the numel check, then request 1's length and table
    # were read unchecked past the end of the buffers (a segfault).
    model = build_engine_model(tiny_llama.model)
    caches = model.allocate_kv_caches(num_blocks=2, block_size=BLOCK_SIZE)
    metadata = AttentionMetadata.from_lists([1, 1], [1, 3], [[1], [0]], BLOCK_SIZE)
    metadata.seq_lens = metadata.seq_lens.view(1, 2)
    metadata.block_tables = metadata.block_tables[:1]
    with pytest.raises(RuntimeError, match=r"seq_lens must be \(M,\) and block_tables \(M, width\)"):
        model(torch.tensor([5, 6]), torch.tensor([0, 2]), caches, metadata, get_backend("cpu_paged"))
