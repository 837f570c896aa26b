"""recsys: next-watch recommendations from viewing logs, one folder per pipeline stage.

``recsys.data`` (ingest -> sessions -> split) -> ``recsys.model`` (GRU4Rec) -> ``recsys.training`` (train,
evaluate, baselines, tune) -> ``recsys.tracking`` (MLflow runs, registry, promotion) -> ``recsys.serving``
(histories, scoring, export). Each stage package re-exports its public names lazily, so
``from recsys.serving import read_recs`` does not import torch and ``import recsys`` imports nothing heavy.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__version__ = "0.1.0"


def lazy_exports(package: str, names: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for a stage package: ``names`` maps a public name to its module.

    A name is imported from its module on first use (PEP 562), so a package can list its whole public
    surface without paying for torch or mlflow until one of those names is asked for.
    """

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{names[name]}"), name)

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__
