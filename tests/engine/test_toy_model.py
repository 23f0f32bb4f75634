"""The toy model's greedy output depends on the context (issue 10, defect 10): an engine test that
compares against `dense_greedy` must be able to fail on a wrong slot, table or position."""

from .toy_model import MAX_POS, VOCAB, ToyModel


def test_toy_model_greedy_outputs_vary_along_the_sequence_and_across_prompts():
    model = ToyModel()
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 20, 30, 40], [5, 4, 3, 2, 1], [2, 3, 4, 5]]
    outputs = [model.dense_greedy(p, 16) for p in prompts]
    for prompt, output in zip(prompts, outputs, strict=True):
        assert len(set(output)) >= 8, f"greedy output of {prompt} is (nearly) constant: {output}"
        assert all(0 <= t < VOCAB for t in output)
    assert len({tuple(o) for o in outputs}) == len(outputs), "two prompts decode the same tokens"
    # Same prompt, other seed: the weights matter, not a fixed point of the architecture.
    assert ToyModel(seed=1).dense_greedy(prompts[0], 16) != outputs[0]
    assert MAX_POS >= 64
