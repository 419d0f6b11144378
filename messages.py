"""Wording shared by error messages across the package."""
from __future__ import annotations

from collections.abc import Sequence


def some(items: Sequence[str], k: int = 5) -> str:
    """The first `k` items joined by commas, and how many were left out: "a, b, c and 4 more"."""
    more = f" and {len(items) - k} more" if len(items) > k else ""
    return ", ".join(items[:k]) + more


DISTRIBUTION = "backdrop-diffusion"  # pip's name for this package (the import name is backdrop)


def require(what: str, extra: str, *modules: str) -> None:
    """ModuleNotFoundError naming the pip extra that installs what `what` needs, if any of `modules` is missing
    ("a|b": either will do)."""
    from importlib.util import find_spec

    missing = [m.split("|")[0] for m in modules if not any(find_spec(alt) for alt in m.split("|"))]
    if missing:
        raise ModuleNotFoundError(f"{what} needs {', '.join(missing)}: pip install '{DISTRIBUTION}[{extra}]'",
                                  name=missing[0])
