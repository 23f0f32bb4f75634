"""One generation-bench experiment (one cell of a sweep): measure it and return its `BenchResult`.

The CLI runs the cells one after another, or each as a Ray task (`kvlab bench ... --sweep K=V1,V2
--ray`, kvlab.scale.tasks). Either way the driver writes the reports, so a worker of a remote cluster
never writes into its own filesystem, and the text and its tokens are read once, by the driver.
"""

import dataclasses

from kvlab.bench.core.datasets import Text
from kvlab.bench.generate.config import BenchConfig
from kvlab.bench.generate.runner import BenchResult, run


def measure_experiment(config: BenchConfig, text: Text, tokens) -> BenchResult:
    """`tokens`: `kvlab.bench.eval.perplexity.tokenize(tokenizer, text.text)` of the config's model."""
    ppl_fn = perplexity_of(config, text, tokens) if config.ppl.enabled else None
    return run(config, tokens[0], ppl_fn)


def perplexity_of(config: BenchConfig, text: Text, tokens):
    """A function of a loaded model: its sliding-window PPL under `config.ppl`, as the report stores it."""
    from kvlab.bench.eval.perplexity import bench_perplexity

    def measure(loaded):
        result = bench_perplexity(loaded, text, config.ppl, tokens)
        return dataclasses.asdict(result) | {
            "protocol": result.protocol,
            "tokens_scored": result.num_tokens_scored,
            "dtype": str(loaded.model.dtype).removeprefix("torch."),  # measured at the first dtype only
        }

    return measure
