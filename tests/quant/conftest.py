import copy
import dataclasses

import pytest

from kvlab.models.loader import load_model


@pytest.fixture(scope="session")
def pristine_tiny_llama():
    return load_model("tiny-llama")


@pytest.fixture
def tiny_llama(pristine_tiny_llama):
    """A private copy of tiny-llama (random weights, seed 0) that a test may quantize in place;
    copying is much cheaper than building the model and its tokenizer again."""
    return dataclasses.replace(pristine_tiny_llama, model=copy.deepcopy(pristine_tiny_llama.model))
