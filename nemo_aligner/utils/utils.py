"""NeMo-Aligner's public utility names, so existing user code imports unchanged.

retrieve_model_state_dict_in_cpu and cpu_weight_swap delegate to the reference-policy code
(nemo_aligner/reference/weight_copy.py) through the model's engine; load_from_nemo builds one of our
model classes from an HF directory or one of our training checkpoints. Nothing inside the library
imports this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Protocol, TypeVar

import torch
from omegaconf import OmegaConf

from nemo_aligner.config.loader import ConfigError, load_config
from nemo_aligner.config.schema import ModelConfig, PretrainedCheckpointConfig, TrainerConfig
from nemo_aligner.reference.weight_copy import copy_of_weights
from nemo_aligner.utils.checkpoint import TRAINER_STATE, latest_checkpoint
from nemo_aligner.utils.log_dir import CHECKPOINTS, CONFIG_FILE

if TYPE_CHECKING:
    from nemo_aligner.engines.base import Engine
    from nemo_aligner.models.nlp.gpt.gpt_model import GPTModel

M = TypeVar("M", bound="GPTModel")


class HasEngine(Protocol):
    """A model built on an engine, e.g. GPTModel and its DPO / SPIN / RS subclasses."""

    engine: Engine


def retrieve_model_state_dict_in_cpu(model: HasEngine, megatron_amp_O2: bool = True) -> dict[str, torch.Tensor]:  # noqa: N803
    """A detached host copy of every parameter (this rank's shards), pinned on CUDA hosts.

    Tied parameters appear once. The copy is independent of later updates to the model.
    `megatron_amp_O2` is accepted and changes nothing: in NeMo-Aligner it converts the keys of O2
    mixed precision, where the module's weights are bf16 copies of fp32 masters kept in the optimizer.
    Here too the copy holds the weights the forward computes with: bf16 under replicated bf16
    training (O2's scheme), the fp32 weights under FSDP (which casts them in each forward).
    """
    return copy_of_weights(model.engine, "host")


@contextlib.contextmanager
def cpu_weight_swap(model: HasEngine, ref_state_dict: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block the model holds `ref_state_dict`'s weights; on exit (also on error) the
    training weights are restored bit for bit. Optimizer state and gradients are untouched."""
    with model.engine.swapped_weights(ref_state_dict):
        yield


def load_from_nemo(cls: type[M], model_cfg: ModelConfig | Mapping[str, Any], trainer: TrainerConfig | Mapping[str, Any],
                   strict: bool = True, modify_config_fn: Callable[..., Any] | None = None, restore_path: str | None = None,
                   load_base_model_only: bool = False, return_updated_cfg: bool = False) -> M | tuple[M, ModelConfig]:
    """Build `cls` (e.g. MegatronGPTDPOModel) from a local checkpoint, as NeMo-Aligner's load_from_nemo does.

    Args:
        cls: one of our model classes.
        model_cfg: the `model` section (its schema, cls.config_class, or a mapping validated against it).
        trainer: our TrainerConfig or the `trainer` section (devices, num_nodes, precision) in place of
            a Lightning Trainer.
        strict: must be True (every weight is loaded, names checked).
        modify_config_fn, load_base_model_only: must be None / False (an HF directory's config.json is
            the architecture; model_cfg is used as given).
        restore_path: an HF model directory, or one of our training checkpoints (a step_<N> folder,
            or a checkpoints folder with its `latest`), whose run's config.yaml names the base model.
        return_updated_cfg: also return the model config used.
    """
    if not strict or modify_config_fn is not None or load_base_model_only:
        raise ValueError("load_from_nemo supports strict=True, modify_config_fn=None and load_base_model_only=False: "
                         "an HF model directory's config.json defines the architecture and every weight is loaded")
    if restore_path is None or not os.path.exists(restore_path):
        raise FileNotFoundError(f"load_from_nemo: restore_path={restore_path!r} does not exist")
    config = model_cfg if isinstance(model_cfg, cls.config_class) else load_config(cls.config_class, _plain(model_cfg))
    checkpoint = _training_checkpoint(restore_path)
    pretrained = _run_base_model(checkpoint) if checkpoint else PretrainedCheckpointConfig(restore_from_path=restore_path)
    model = cls(config, pretrained, _trainer_config(trainer))
    if checkpoint:
        model.load(os.path.join(checkpoint, "model"), with_optimizer=False)
    return (model, config) if return_updated_cfg else model


def _plain(section: Any) -> Any:
    return OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else section


def _trainer_config(trainer: Any) -> TrainerConfig:
    if isinstance(trainer, TrainerConfig):
        return trainer
    if not isinstance(trainer, Mapping) and not OmegaConf.is_config(trainer):
        raise TypeError(f"load_from_nemo: trainer={type(trainer).__name__}; pass our TrainerConfig (devices, num_nodes, "
                        "precision) or the trainer config section: no Lightning Trainer is used here")
    section = _plain(trainer)
    known = {field.name for field in dataclasses.fields(TrainerConfig)}
    unknown = set(section) - known - {"dpo", "spin", "rs"}  # the algorithms' loop sections are not the model's
    if unknown:
        raise ConfigError(f"unknown config key(s) trainer.{sorted(unknown)}")
    return load_config(TrainerConfig, {key: value for key, value in section.items() if key in known})


def _training_checkpoint(path: str) -> str | None:
    """The step folder `path` names (itself, or a checkpoints folder's latest), or None for an HF directory."""
    if os.path.isfile(os.path.join(path, TRAINER_STATE)):
        return path
    return latest_checkpoint(path)


def _run_base_model(checkpoint: str) -> PretrainedCheckpointConfig:
    """The base model of the run that wrote `checkpoint` (<log_dir>/checkpoints/step_N), from its config.yaml."""
    config_file = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint))), CONFIG_FILE)
    if os.path.basename(os.path.dirname(os.path.abspath(checkpoint))) != CHECKPOINTS or not os.path.isfile(config_file):
        raise FileNotFoundError(f"{checkpoint} is a training checkpoint without its run's {CONFIG_FILE} beside the "
                                f"{CHECKPOINTS} folder, so its base model is unknown; build the model from the base HF "
                                "directory and call model.load(<checkpoint>/model, with_optimizer=False)")
    run = OmegaConf.to_container(OmegaConf.load(config_file), resolve=True)
    if "pretrained_checkpoint" not in run:
        raise ConfigError(f"{config_file} has no pretrained_checkpoint section naming the run's base model")
    return load_config(PretrainedCheckpointConfig, run["pretrained_checkpoint"])
