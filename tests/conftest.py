"""Shared fixtures: tiny random HF model directories (Llama with tied embeddings, Qwen2 untied, GPT-2)."""

from __future__ import annotations

import os
import sys
from typing import Callable

import pytest

from helpers import REPO, make_model_dir

if REPO not in sys.path:  # tests import the embedded task from examples/ however pytest is started
    sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "examples", "nlp", "gpt"))
import entry_setup  # noqa: E402,F401  (the ${repo:...} resolver of the shipped YAMLs)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_model_dir(str(tmp_path_factory.mktemp("llama")), "llama")


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_model_dir(str(tmp_path_factory.mktemp("qwen2")), "qwen2")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_model_dir(str(tmp_path_factory.mktemp("gpt2")), "gpt2")


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    """family -> a tiny random model directory of that family (made once per session)."""
    made: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in made:
            made[family] = make_model_dir(str(tmp_path_factory.mktemp(family)), family)
        return made[family]

    return get
