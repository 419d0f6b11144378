"""Wording shared by error messages across the package."""
from __future__ import annotations

from collections.abc import Sequence


def some(items: Sequence[str], k: int = 5) -> str:
    """The first `k` items joined by commas, and how many were left out: "a, b, c and 4 more"."""
    more = f" and {len(items) - k} more" if len(items) > k else ""
    return ", ".join(items[:k]) + more
