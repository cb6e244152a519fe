"""Import a script of benchmarks/ as a module (they are scripts, not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_benchmark(name: str, register: bool = False) -> ModuleType:
    """``benchmarks/NAME.py`` as the module ``NAME_bench``; ``register``: also put it in
    ``sys.modules`` (what its worker processes need to unpickle its functions)."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", REPO / f"benchmarks/{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod
