"""Attention over a paged KV cache: explicit metadata and interchangeable backends."""
