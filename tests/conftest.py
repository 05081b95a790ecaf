"""Shared fixtures: tiny random HF model directories (Llama with tied embeddings, Qwen2 untied, GPT-2)."""

from __future__ import annotations

import sys

import pytest

from helpers import REPO, make_model_dir

if REPO not in sys.path:  # tests import the embedded task from examples/ however pytest is started
    sys.path.insert(0, REPO)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_model_dir(str(tmp_path_factory.mktemp("llama")), "llama")


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_model_dir(str(tmp_path_factory.mktemp("qwen2")), "qwen2")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_model_dir(str(tmp_path_factory.mktemp("gpt2")), "gpt2")
