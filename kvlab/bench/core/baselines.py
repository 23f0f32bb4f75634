"""The Hugging Face baselines every bench compares against, timed the same way everywhere.

`run_baseline`: `model.generate()` with its defaults (DynamicCache) on one batch, each token
timestamped by a streamer. `hf_static`: HF static batching of a request list (left-padded batches in
arrival order, each running to its longest requested output), the serving bench's baseline.
"""

import time
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from kvlab.bench.core.metrics import synchronize
from kvlab.cache import kv_cache_bytes
from kvlab.models.loader import LoadedModel


class TimingStreamer(BaseStreamer):
    """Timestamps each token `model.generate` emits; its first `put` is the prompt, not a token."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = 0.0
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        synchronize(self.device)
        self.times.append(time.perf_counter() - self.start)

    def end(self) -> None:
        pass


def run_baseline(
    loaded: LoadedModel, input_ids: torch.Tensor, new_tokens: int
) -> tuple[list[float], torch.Tensor, int, str]:
    device = input_ids.device
    streamer = TimingStreamer(device)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    synchronize(device)
    streamer.start = time.perf_counter()
    with torch.inference_mode():
        out = loaded.model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            streamer=streamer,
            return_dict_in_generate=True,
            pad_token_id=pad,
        )
    return streamer.times, out.sequences[:, input_ids.shape[1] :], kv_cache_bytes(out.cache), "hf"


def hf_static(loaded: LoadedModel, requests: list, batch_size: int) -> dict[str, Any]:
    """`model.generate` on left-padded batches in arrival order; each batch runs to its longest output.
    requests: items with `prompt_ids` (list of token ids) and `output_len` (tokens requested)."""
    model, device = loaded.model, loaded.model.device
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    tokens, kv_bytes, generated = [], [], 0
    start = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        batch = requests[i : i + batch_size]
        width, new = max(len(r.prompt_ids) for r in batch), max(r.output_len for r in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, request in enumerate(batch):
            input_ids[row, width - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            mask[row, width - len(request.prompt_ids) :] = 1
        with torch.inference_mode():
            out = model.generate(
                input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=pad,
                return_dict_in_generate=True,
            )
        rows = out.sequences[:, width:].tolist()
        tokens += [row[: r.output_len] for row, r in zip(rows, batch, strict=True)]
        kv_bytes.append(kv_cache_bytes(out.cache))
        generated += len(batch) * new
    return {
        "wall_s": time.perf_counter() - start,
        "generated_tokens": generated,
        "peak_kv_bytes": max(kv_bytes),
        "tokens": tokens,
    }
