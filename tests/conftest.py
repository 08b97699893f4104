"""Shared test helpers."""

from __future__ import annotations

import os

from hypothesis import settings

# Hypothesis: deterministic in CI, a moderate number of examples everywhere.
settings.register_profile("ci", derandomize=True, max_examples=60, deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def enumerate_pyramid(D: int, K: int) -> list[list[int]]:
    """Every point of P(D, K) by direct recursion (independent of the codec)."""
    if D == 0:
        return [[]] if K == 0 else []
    out = []
    for v in range(-K, K + 1):
        for rest in enumerate_pyramid(D - 1, K - abs(v)):
            out.append([v, *rest])
    return out
