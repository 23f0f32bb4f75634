"""The load bench's requests: prompts cut from real text and output lengths, both seeded (the paged
bench's mixed workload, `kvlab.bench.serving.workloads.mixed_requests`), plus seeded client aborts."""

import random
from dataclasses import dataclass

from kvlab.bench.loadgen.config import LoadBenchConfig, LoadWorkload
from kvlab.bench.serving.config import MixedWorkload
from kvlab.bench.serving.workloads import mixed_requests


@dataclass(frozen=True, slots=True)
class LoadRequest:
    index: int
    prompt_ids: list[int]
    max_tokens: int
    abort_after: int | None  # chunks with tokens the client reads before it disconnects; None: all


def load_requests(token_ids: list[int], workload: LoadWorkload, seed: int) -> list[LoadRequest]:
    """`workload.num_requests` requests; exactly `workload.num_aborts` of them (a seeded choice) are
    left by their client after a seeded 1..max_tokens-1 chunks, i.e. always before the request ends."""
    mixed = MixedWorkload(
        num_requests=workload.num_requests,
        prompt_len_min=workload.prompt_len_min,
        prompt_len_max=workload.prompt_len_max,
        output_len_min=workload.output_len_min,
        output_len_max=workload.output_len_max,
    )
    drawn = mixed_requests(token_ids, mixed, seed)
    rng = random.Random(seed + 3)  # its own stream: the lengths do not change with abort_fraction
    aborted = set(rng.sample(range(len(drawn)), workload.num_aborts))
    return [
        LoadRequest(
            index=i,
            prompt_ids=request.prompt_ids,
            max_tokens=request.output_len,
            abort_after=rng.randint(1, request.output_len - 1) if i in aborted else None,
        )
        for i, request in enumerate(drawn)
    ]


def load_token_ids(config: LoadBenchConfig, tokenizer) -> tuple[list[int], str]:
    """Token ids of the config's dataset (a leading part, with margin, tokenised) and its description."""
    from kvlab.bench.core.datasets import load_text
    from kvlab.bench.eval.perplexity import tokenize

    text = load_text(config.dataset, split=config.split, data_dir=config.data_dir)
    needed = config.load.num_requests * config.load.prompt_len_max
    ids, _ = tokenize(tokenizer, text.text[: 16 * needed])
    if ids.numel() < needed:
        ids, _ = tokenize(tokenizer, text.text)
    return ids.tolist(), text.description
