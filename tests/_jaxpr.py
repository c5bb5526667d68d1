"""Walking jaxprs in tests: every equation, nested ones (pjit, custom_vjp, while bodies) included."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def all_eqns(jaxpr: Any) -> Iterator[Any]:
    """Yield the equations of ``jaxpr`` (a ``Jaxpr``) and of every jaxpr nested in their params."""
    for e in jaxpr.eqns:
        yield e
        for p in e.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from all_eqns(inner)
