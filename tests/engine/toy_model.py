"""A one-layer attention LM speaking the engine-native model contract, with a dense twin.

It lets the runner and scheduler be tested against exact dense greedy decoding without depending on
the real model modules: positions enter through a learned table (so wrong positions change logits)
and attention reads the paged cache through a real backend (so wrong slots or tables do too).

Initialised so that the next token depends on the context: an untied output head (a tied one scores
the current token's own embedding highest, and greedy decoding then repeats one token) and sharp
attention (queries and keys at twice the 1/sqrt(dim) scale). test_toy_model.py checks that greedy
outputs vary along a sequence and across prompts, so an equality test on this model can fail.
"""

import torch
from torch import nn

VOCAB, DIM, HEADS, KV_HEADS, HEAD_DIM, MAX_POS = 61, 32, 4, 2, 8, 256


class ToyModel(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.embed = nn.Parameter(torch.randn(VOCAB, DIM, generator=generator))
        self.pos = nn.Parameter(torch.randn(MAX_POS, DIM, generator=generator))
        self.q = nn.Parameter(torch.randn(DIM, HEADS * HEAD_DIM, generator=generator) * 2 / DIM**0.5)
        self.k = nn.Parameter(torch.randn(DIM, KV_HEADS * HEAD_DIM, generator=generator) * 2 / DIM**0.5)
        self.v = nn.Parameter(torch.randn(DIM, KV_HEADS * HEAD_DIM, generator=generator) / DIM**0.5)
        self.o = nn.Parameter(torch.randn(HEADS * HEAD_DIM, DIM, generator=generator) / DIM**0.5)
        self.head = nn.Parameter(torch.randn(DIM, VOCAB, generator=generator) / DIM**0.5)
        self.num_layers = 1

    def forward(self, input_ids, positions, kv_caches, metadata, backend):
        x = self.embed[input_ids] + self.pos[positions]
        q = (x @ self.q).view(-1, HEADS, HEAD_DIM)
        k = (x @ self.k).view(-1, KV_HEADS, HEAD_DIM)
        v = (x @ self.v).view(-1, KV_HEADS, HEAD_DIM)
        key_cache, value_cache = kv_caches[0]
        backend.write_kv(k, v, key_cache, value_cache, metadata.slot_mapping)
        out = backend.forward(q, key_cache, value_cache, metadata, HEAD_DIM**-0.5)
        return x + out.reshape(-1, HEADS * HEAD_DIM) @ self.o

    def compute_logits(self, hidden):
        return hidden @ self.head

    def decode_logits(self, input_ids, positions, kv_caches, metadata, backend):
        return self.compute_logits(self(input_ids, positions, kv_caches, metadata, backend))

    @torch.no_grad()
    def dense_greedy(self, token_ids: list[int], max_tokens: int) -> list[int]:
        """Reference: full causal attention over the whole sequence, recomputed every token."""
        tokens = list(token_ids)
        for _ in range(max_tokens):
            ids = torch.tensor(tokens)
            x = self.embed[ids] + self.pos[torch.arange(len(tokens))]
            q = (x @ self.q).view(-1, HEADS, HEAD_DIM).transpose(0, 1)
            k = (x @ self.k).view(-1, KV_HEADS, HEAD_DIM).transpose(0, 1).repeat_interleave(2, 0)
            v = (x @ self.v).view(-1, KV_HEADS, HEAD_DIM).transpose(0, 1).repeat_interleave(2, 0)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            hidden = x + out.transpose(0, 1).reshape(-1, HEADS * HEAD_DIM) @ self.o
            tokens.append(int(self.compute_logits(hidden[-1]).argmax()))
        return tokens[len(token_ids) :]
