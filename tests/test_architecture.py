"""The package's layering (docs/architecture.md), read from every module's imports.

Each package may import only the packages listed for it; in particular nothing above the engines
imports an engine implementation, config/ imports only the shared types, and utils/ holds no
engine or server code.
"""

from __future__ import annotations

import ast
import os
import pathlib
import tomllib

import pytest

from helpers import REPO

PACKAGE = pathlib.Path(REPO) / "nemo_aligner"

# package -> the packages of nemo_aligner it may import (besides itself); "engines.base" and
# "engines.registry" are the engine interface, "engines.<name>" an implementation.
ALLOWED = {
    "types": set(),
    "config": {"types"},
    "utils": {"types", "config"},
    "data": {"types", "config", "utils"},
    "losses": {"types"},
    "engines": {"types", "config", "utils"},
    "servers": {"types", "config", "utils"},
    "reference": {"types", "config", "utils", "engines.base"},
    "models": {"types", "config", "utils", "data", "losses", "engines.base", "engines.registry", "reference"},
    "algorithms": {"types", "config", "utils", "data", "losses", "reference", "models", "servers"},
}
# NeMo-Aligner's public names, kept importable from their old module: a facade nothing inside imports.
FACADES = {"nemo_aligner.utils.utils": ALLOWED["utils"] | {"engines.base", "reference", "models"}}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return {n for n in names if n.startswith("nemo_aligner.")}


def _layer(module: str) -> str:
    """The ALLOWED key a module belongs to, or the engine interface/implementation it is."""
    parts = module.split(".")
    if parts[1] == "engines" and len(parts) > 2:
        return f"engines.{parts[2]}"
    return parts[1]


MODULES = sorted((p for p in PACKAGE.rglob("*.py")), key=str)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_module_imports_only_the_layers_below_it(path: pathlib.Path) -> None:
    module = _module_name(path)
    if module == "nemo_aligner":
        return
    own = _layer(module).split(".")[0]
    allowed = FACADES.get(module) or ALLOWED[own]
    for name in _imports(path):
        layer = _layer(name)
        if layer.split(".")[0] == own:
            continue
        assert layer in allowed or layer.split(".")[0] in allowed, f"{module} imports {name} (layer {layer})"


def test_nothing_imports_the_public_api_facade() -> None:
    users = [_module_name(p) for p in MODULES if any(n in FACADES for n in _imports(p))]
    assert users == []


def test_packaging_promises_only_engines_that_exist() -> None:
    """An extra or image that installs an engine's dependencies exists only once the engine does."""
    from nemo_aligner.engines.registry import engine_names

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    with open(os.path.join(REPO, "Dockerfile")) as f:
        dockerfile = f.read()
    for engine in ("megatron",):
        if engine not in engine_names():
            assert engine not in extras and engine not in dockerfile.lower(), engine
