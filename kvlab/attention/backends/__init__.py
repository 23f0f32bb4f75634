"""Attention backends over the paged KV cache; pick one with `registry.get_backend(name)`."""
