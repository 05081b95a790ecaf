"""Engines by name (`model.engine`): the built-in ones as import paths, loaded only when chosen, so
nothing above the engines imports an engine implementation; others are added with register_engine."""

from __future__ import annotations

import importlib

from nemo_aligner.config.schema import ModelConfig, PretrainedCheckpointConfig, TrainerConfig
from nemo_aligner.engines.base import Engine, EngineBuilder
from nemo_aligner.types import require

_BUILT_IN = {"torch_native": "nemo_aligner.engines.torch_native.engine:build_torch_native_engine",
             "megatron": "nemo_aligner.engines.megatron.engine:build_megatron_engine"}
_REGISTERED: dict[str, EngineBuilder] = {}


def register_engine(name: str, builder: EngineBuilder) -> None:
    """Make `builder` the engine `name`; a name can be taken once."""
    if name in _BUILT_IN or name in _REGISTERED:
        raise ValueError(f"engine '{name}' is already registered")
    _REGISTERED[name] = builder


def engine_names() -> list[str]:
    return sorted({*_BUILT_IN, *_REGISTERED})


def build_engine(model: ModelConfig, pretrained: PretrainedCheckpointConfig, trainer: TrainerConfig) -> Engine:
    """The engine `model.engine` names, built from the three config sections."""
    require(model.engine in _BUILT_IN or model.engine in _REGISTERED, "model.engine", model.engine,
            f"one of {engine_names()}")
    if model.engine in _REGISTERED:
        return _REGISTERED[model.engine](model, pretrained, trainer)
    module, function = _BUILT_IN[model.engine].split(":")
    return getattr(importlib.import_module(module), function)(model, pretrained, trainer)
