"""Configs: shipped YAMLs match their schemas key for key; bad keys/values fail naming the key;
entry scripts validate before writing anything."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from dataclasses import fields, is_dataclass

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from helpers import FP32, REPO, model_cfg, pretrained, right_padded_batch
from nemo_aligner.config.dpo import DPOJobConfig
from nemo_aligner.config.jobs import ExportToHFConfig
from nemo_aligner.config.reward_server import RewardServerConfig
from nemo_aligner.config.rs import RSJobConfig
from nemo_aligner.config.spin import SPINJobConfig
from nemo_aligner.config.loader import ConfigError, load_config
from nemo_aligner.config.schema import ModelConfig, OptimConfig
from nemo_aligner.losses.sft import sft_loss_fn
from nemo_aligner.models.nlp.gpt.gpt_model import GPTModel
from nemo_aligner.utils.checkpoint import CheckpointManager

CONF_DIR = os.path.join(REPO, "examples", "nlp", "gpt", "conf")
SCHEMAS = {"export_to_hf": ExportToHFConfig, "gpt_dpo": DPOJobConfig, "gpt_spin": SPINJobConfig,
           "serve_reward_model": RewardServerConfig, "gpt_rs_actor": RSJobConfig}
OPAQUE = {"pretrained_checkpoint.model_config", "task_eval", "reward_model.function", "reward.function"}  # free-form dicts: only the key itself is schema


def _schema_keys(schema: type, prefix: str = "") -> set[str]:
    keys = set()
    for f in fields(schema):
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys |= _schema_keys(type(default), f"{prefix}{f.name}.")
        else:
            keys.add(f"{prefix}{f.name}")
    return keys


def _yaml_keys(node: object, prefix: str = "") -> set[str]:
    if not isinstance(node, dict) or prefix.rstrip(".") in OPAQUE:
        return {prefix.rstrip(".")}
    keys = set()
    for key, value in node.items():
        keys |= _yaml_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
    return keys


def _compose(name: str, overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name=name, overrides=overrides or [])


def test_every_shipped_yaml_has_a_schema() -> None:
    shipped = {f[:-5] for f in os.listdir(CONF_DIR) if f.endswith(".yaml")}
    assert shipped == set(SCHEMAS)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_shipped_yaml_lists_every_schema_key_and_loads(name: str) -> None:
    raw = _compose(name)
    yaml_keys = _yaml_keys(OmegaConf.to_container(raw))
    assert yaml_keys == _schema_keys(SCHEMAS[name]), "YAML and schema differ"
    load_config(SCHEMAS[name], raw)


@pytest.mark.parametrize("override, message", [
    ("+model.optim.lrr=1", r"unknown config key 'model.optim.lrr'"),
    ("trainer.precision=fp16", r"'trainer.precision'.*expected one of \[bf16, bf16_pure, fp32\]"),
    ("model.micro_batch_size=0", r"model.micro_batch_size=0 is invalid: it must be >= 1"),
    ("model.optim.sched.min_lr=1.0", r"model.optim.sched.min_lr=1.0 is invalid: it must be <= model.optim.lr"),
    ("pretrained_checkpoint.model_config={model_type: llama}", r"exactly one of pretrained_checkpoint.restore_from_path"),
])
def test_invalid_config_fails_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(ExportToHFConfig, _compose("export_to_hf", [override]))


@pytest.mark.parametrize("override, message", [
    ("model.data.length_policy=cut", r"'model.data.length_policy'.*expected one of \[truncate_prompt_left, drop\]"),
    ("trainer.dpo.val_check_interval=1.5", r"trainer.dpo.val_check_interval=1.5 is invalid"),
    ("exp_manager.checkpoint_callback_params.monitor=val_bogus",
     r"monitor='val_bogus' is invalid: it must be one of this algorithm's validation metrics \['val_loss', "),
    ("+trainer.dpo.max_step=3", r"unknown config key 'trainer.dpo.max_step'"),
])
def test_invalid_dpo_config_fails_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(DPOJobConfig, _compose("gpt_dpo", [override]))


@pytest.mark.parametrize("override, message", [
    ("trainer.spin.max_iterations=3", r"ref_policy_kl_penalty has 4 values but trainer.spin.max_iterations=3"),
    ("model.spin.ref_policy_kl_penalty=-1", r"model.spin.ref_policy_kl_penalty=-1 is invalid"),
    ("model.spin.sampling_params.top_p=0", r"sampling_params.top_p=0.0 is invalid: it must be in \(0, 1\]"),
    ("model.spin.length_params.min_length=9", r"length_params.min_length=9 is invalid"),
    ("trainer.spin.save_interval=0", r"trainer.spin.save_interval=0 is invalid"),
    ("exp_manager.checkpoint_callback_params.monitor=val_acc", r"monitor='val_acc' is invalid.*\['val_loss'\]"),
    ("model.spin.rollout_micro_batch_size=0", r"model.spin.rollout_micro_batch_size=0 is invalid: it must be null or >= 1"),
    ("model.spin.rollout_memory_fraction=1.5", r"model.spin.rollout_memory_fraction=1.5 is invalid: it must be in \(0, 1\]"),
])
def test_invalid_spin_config_fails_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(SPINJobConfig, _compose("gpt_spin", [override]))


@pytest.mark.parametrize("override, message", [
    (dict(engine="jax"), r"model.engine='jax' is invalid: it must be one of \[.*'torch_native'.*\]"),
    (dict(pipeline_model_parallel_size=2), r"pipeline_model_parallel_size=2 is not supported: the torch_native engine"),
])
def test_engine_name_and_layout_fail_when_the_model_is_built(llama_dir: str, override: dict, message: str) -> None:
    """Names in registries (engines, losses) and layout limits of an engine are checked by the code
    that owns them, first thing when the model is built; the entry scripts build it before writing."""
    with pytest.raises(ValueError, match=message):
        GPTModel(model_cfg(**override), pretrained(llama_dir), FP32)


def test_rollout_micro_batch_size_null_means_as_many_as_fit() -> None:
    for schema, name, section in ((SPINJobConfig, "gpt_spin", "spin"), (RSJobConfig, "gpt_rs_actor", "rs")):
        cfg = load_config(schema, _compose(name, [f"model.{section}.rollout_micro_batch_size=null"]))
        assert getattr(cfg.model, section).rollout_micro_batch_size is None


def test_unknown_key_in_a_nested_dataclass() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'optim.sched.nme'"):
        load_config(ModelConfig, {"optim": {"sched": {"nme": "x"}}})
    assert load_config(OptimConfig, {"lr": 0.1}).lr == 0.1


def _run_export(*overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "examples/nlp/gpt/export_to_hf.py", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_export_script_rejects_bad_input_before_writing(tmp_path) -> None:
    out = tmp_path / "export"
    proc = _run_export("model.optim.lrr=1", f"output_path={out}")
    assert proc.returncode != 0 and "Could not override 'model.optim.lrr'" in proc.stderr
    proc = _run_export(f"pretrained_checkpoint.restore_from_path={tmp_path}/missing", f"output_path={out}")
    assert proc.returncode != 0 and f"model directory '{tmp_path}/missing' does not exist" in proc.stderr
    assert not out.exists() and not (tmp_path / "outputs").exists()


def test_export_script_turns_a_checkpoint_into_a_transformers_model(llama_dir: str, tmp_path) -> None:
    model = GPTModel(model_cfg(), pretrained(llama_dir), FP32)
    model.setup_optimizer(max_steps=2)
    batch = right_padded_batch(4, 9, 48, seed=1)
    model.forward_backward(batch, functools.partial(sft_loss_fn, global_num_tokens=batch["loss_mask"][:, 1:].sum()))
    model.optimizer_step(1.0)
    CheckpointManager(str(tmp_path / "ckpts"), save_top_k=1, monitor="val_loss", mode="min").save(1, model, {}, {})
    proc = _run_export(f"pretrained_checkpoint.restore_from_path={llama_dir}", f"checkpoint_path={tmp_path}/ckpts",
                       f"output_path={tmp_path}/hf", "trainer.precision=fp32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    ids = batch["input_ids"]
    expected = torch.log_softmax(hf(input_ids=ids).logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(model.get_logprobs(batch), expected * batch["loss_mask"][:, 1:], atol=1e-5, rtol=0)
