"""The small strategies every part of the generator draws with, engines'
fragments included: a leaf module, so that anything may import it."""

from __future__ import annotations

from functools import cache

from hypothesis import strategies as st

LOW_PRECISION = ("bfloat16", "float16")
"""Both run forward and backward on CPU with gloo under either engine (torch 2.13, measured)."""


@cache
def chance(times: int, out_of: int) -> st.SearchStrategy[bool]:
    """True about ``times`` in ``out_of`` draws; shrinks to False."""
    return st.integers(1, out_of).map(lambda drawn: drawn > out_of - times)


@cache
def sometimes(values: tuple, one_in: int) -> st.SearchStrategy:
    """One of ``values`` about once in ``one_in`` draws, else ``None``; one
    choice either way; shrinks to ``None``."""
    return st.sampled_from((None,) * (len(values) * (one_in - 1)) + values)
