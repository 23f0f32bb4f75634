"""Weights in huge pages: every CPU tensor of a loaded model moves into one advised mapping, unchanged
in value and sharing; a module swap (quantization) leaves no stale arena behind."""

import copy
import gc
import re

import pytest
import torch

from kvlab.models import huge_pages
from kvlab.models.native import build_engine_model
from kvlab.quant.formats import QuantSpec
from kvlab.quant.modules import quantize_model

needs_thp = pytest.mark.skipif(not huge_pages.enabled(), reason="transparent huge pages are off here")


def model_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def advised_huge(address: int) -> bool:
    """Whether the mapping holding `address` carries MADV_HUGEPAGE ("hg" in its smaps VmFlags)."""
    text = open("/proc/self/smaps").read()
    for header, flags in re.findall(r"^([0-9a-f]+-[0-9a-f]+) .*?^VmFlags:(.*?)$", text, re.M | re.S):
        start, end = (int(part, 16) for part in header.split("-"))
        if start <= address < end:
            return " hg" in flags
    raise AssertionError(f"no mapping holds {address:#x}")


@needs_thp
def test_a_loaded_model_lives_in_one_advised_arena(tiny_model):
    tensors = model_tensors(tiny_model.model)
    assert all(huge_pages.is_placed(t) for t in tensors)
    assert all(advised_huge(t.data_ptr()) for t in tensors)
    assert all(t.data_ptr() % huge_pages.ALIGNMENT == 0 for t in tensors)


@needs_thp
def test_placing_keeps_values_ties_and_outputs(pristine_tiny_llama):
    model = copy.deepcopy(pristine_tiny_llama.model)  # deep copies are plain heap tensors again
    assert not any(huge_pages.is_placed(t) for t in model_tensors(model))
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(1))
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with torch.no_grad():
        logits = model(ids).logits
    moved = huge_pages.place_module(model)
    assert moved == sum(
        t.numel() * t.element_size() for t in {t.data_ptr(): t for t in model_tensors(model)}.values()
    )
    assert all(huge_pages.is_placed(t) for t in model_tensors(model))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    if pristine_tiny_llama.model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert (
            model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        )
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)


def test_switched_off_nothing_moves(pristine_tiny_llama, monkeypatch):
    monkeypatch.setenv("KVLAB_HUGE_PAGES", "0")
    model = copy.deepcopy(pristine_tiny_llama.model)
    pointers = [t.data_ptr() for t in model_tensors(model)]
    assert huge_pages.place_module(model) == 0
    assert [t.data_ptr() for t in model_tensors(model)] == pointers
    assert huge_pages.empty(10, torch.float32).shape == (10,)


def arenas_holding(tensors: list[torch.Tensor]) -> list:
    """Weak references to the arenas (mappings) the tensors live in."""
    return [
        ref
        for ref, start, end in huge_pages._arenas
        if ref() is not None and any(start <= t.data_ptr() < end for t in tensors)
    ]


@needs_thp
def test_quantizing_moves_the_codes_and_frees_the_float_arena(tiny_llama):
    huge_pages.place_module(tiny_llama.model)  # tiny_llama is a deep copy: plain heap tensors
    float_arenas = arenas_holding(model_tensors(tiny_llama.model))
    assert len(float_arenas) == 1
    quantize_model(tiny_llama.model, QuantSpec.parse("int8"))
    gc.collect()
    assert float_arenas[0]() is None  # nothing kept the replaced float weights' mapping alive
    tensors = model_tensors(tiny_llama.model)
    assert all(huge_pages.is_placed(t) for t in tensors)
    assert len(arenas_holding(tensors)) == 1
    head, embedding = tiny_llama.model.get_output_embeddings(), tiny_llama.model.get_input_embeddings()
    if tiny_llama.model.config.tie_word_embeddings:
        assert head.qweight is embedding.qweight


@needs_thp
def test_the_engine_places_the_matrices_it_fuses(tiny_model):
    engine_model = build_engine_model(tiny_model.model)
    weights = engine_model.matmul_weights()
    for weight in weights:
        for tensor in weight.tensors() if hasattr(weight, "tensors") else [weight]:
            assert huge_pages.is_placed(tensor)


@needs_thp
def test_empty_is_advised():
    tensor = huge_pages.empty(3 * 2**20, torch.float32)
    assert tensor.shape == (3 * 2**20,) and tensor.data_ptr() % huge_pages.HUGE_PAGE_BYTES == 0
    assert advised_huge(tensor.data_ptr())


@needs_thp
def test_zeros_are_zero_resident_tensors_of_one_advised_arena():
    tensors = huge_pages.zeros([(3, 5), (7,), (2, 4, 6)], torch.bfloat16)
    assert [tuple(t.shape) for t in tensors] == [(3, 5), (7,), (2, 4, 6)]
    assert all(t.dtype == torch.bfloat16 and not t.any() for t in tensors)
    assert all(huge_pages.is_placed(t) and t.data_ptr() % huge_pages.ALIGNMENT == 0 for t in tensors)
    assert advised_huge(tensors[0].data_ptr())
    tensors[1].fill_(1)  # neighbours do not overlap
    assert not tensors[0].any() and not tensors[2].any()


def test_zeros_switched_off_are_torch_zeros(monkeypatch):
    monkeypatch.setenv("KVLAB_HUGE_PAGES", "0")
    (tensor,) = huge_pages.zeros([(4, 4)], torch.float32)
    assert not huge_pages.is_placed(tensor) and not tensor.any()


@needs_thp
def test_the_engine_pool_lives_in_huge_pages(tiny_model):
    """A decode step reads each request's blocks scattered over the pool: no TLB miss per block."""
    caches = build_engine_model(tiny_model.model).allocate_kv_caches(num_blocks=8, block_size=4)
    assert all(huge_pages.is_placed(t) and not t.any() for pair in caches for t in pair)
    assert len({t.data_ptr() for pair in caches for t in pair}) == 2 * len(caches)
