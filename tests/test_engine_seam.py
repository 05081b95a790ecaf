"""The engine seam carries: DPO, SPIN and rejection sampling run unchanged on a second engine
(tests/plain_engine.py, plain PyTorch + transformers, sharing no code with torch_native) and give
the same per-step metrics as on torch_native; a run on it resumes exactly."""

from __future__ import annotations

import json
import os
import random

import pytest
from omegaconf import OmegaConf

from helpers import loader_args, write_pairs, write_sft
from nemo_aligner.algorithms.dpo import DPOTrainer
from nemo_aligner.algorithms.rs import RSTrainer
from nemo_aligner.algorithms.spin import SPINTrainer
from nemo_aligner.config.dpo import DPO_VALIDATION_METRICS, DPOJobConfig
from nemo_aligner.config.loader import load_config
from nemo_aligner.config.rs import RS_VALIDATION_METRICS, RSJobConfig
from nemo_aligner.config.spin import SPIN_VALIDATION_METRICS, SPINJobConfig
from nemo_aligner.data.builders import build_preference_loader, build_prompt_loader, build_sft_loader
from nemo_aligner.engines.registry import engine_names, register_engine
from nemo_aligner.models.nlp.gpt.gpt_dpo_model import GPTDPOModel
from nemo_aligner.models.nlp.gpt.gpt_rs_actor import GPTRSActor
from nemo_aligner.models.nlp.gpt.gpt_spin_model import GPTSPINModel
from nemo_aligner.servers.rewards import FunctionReward
from nemo_aligner.utils.metrics import read_metrics
from plain_engine import PlainEngine

if "plain" not in engine_names():
    register_engine("plain", PlainEngine)

TIMING = {"step_time", "tokens_per_sec", "generation_time", "training_time", "rollout_share"}


def _common(model_dir: str, log_dir: str, engine: str, loop: dict) -> dict:
    return {"trainer": {"precision": "fp32", **loop},
            "exp_manager": {"explicit_log_dir": log_dir, "create_tensorboard_logger": False},
            "pretrained_checkpoint": {"restore_from_path": model_dir},
            "model": {"engine": engine, "micro_batch_size": 2, "global_batch_size": 4, "encoder_seq_length": 32,
                      "optim": {"lr": 3e-3, "weight_decay": 0.01, "eps": 1e-4, "sched": {"warmup_steps": 1, "min_lr": 1e-4}}},
            "task_eval": None}


def _merge(*parts: dict) -> OmegaConf:
    return OmegaConf.merge(*[OmegaConf.create(p) for p in parts])


def _dpo(model_dir: str, data: str, log_dir: str, engine: str) -> DPOTrainer:
    raw = _merge(_common(model_dir, log_dir, engine, {"dpo": {"max_epochs": 1, "save_interval": 2, "val_check_interval": 2,
                                                             "limit_val_batches": 1}}),
                 {"model": {"dpo": {"preference_loss": "rpo_bwd_kl", "sft_loss_weight": 0.3,
                                    "log_prob_forward_micro_batch_size": 1},
                            "data": {"data_prefix": {"train": data, "validation": data}}}})
    cfg = load_config(DPOJobConfig, raw)
    policy = GPTDPOModel(cfg.model, cfg.pretrained_checkpoint, cfg.trainer)
    loader = lambda shuffle: build_preference_loader(data, shuffle=shuffle, **loader_args(policy, cfg.model))  # noqa: E731
    return DPOTrainer(model=policy, train_dataloader=loader(True), val_dataloader=loader(False), cfg=cfg.trainer.dpo,
                      exp_manager=cfg.exp_manager, log_every_n_steps=1, config={})


def _spin(model_dir: str, data: str, log_dir: str, engine: str) -> SPINTrainer:
    raw = _merge(_common(model_dir, log_dir, engine, {"spin": {"max_iterations": 2, "max_epochs": 1, "save_interval": 1,
                                                               "val_check_interval": 2, "limit_val_batches": 1}}),
                 {"model": {"spin": {"ref_policy_kl_penalty": [0.3, 0.6], "rollout_micro_batch_size": 3,
                                     "sampling_params": {"use_greedy": True}, "length_params": {"max_length": 4}},
                            "data": {"train_ds": {"file_path": data}, "validation_ds": {"file_path": data}}}})
    cfg = load_config(SPINJobConfig, raw)
    policy = GPTSPINModel(cfg.model, cfg.pretrained_checkpoint, cfg.trainer)
    train = build_sft_loader(data, response_budget=4, shuffle=True, collate=False, **loader_args(policy, cfg.model))
    val = build_sft_loader(data, response_budget=0, shuffle=False, collate=True, **loader_args(policy, cfg.model))
    return SPINTrainer(model=policy, train_dataloader=train, val_dataloader=val, cfg=cfg.trainer.spin, exp_manager=cfg.exp_manager,
                       log_every_n_steps=1, config={})


def digit_reward(prompt: str, response: str) -> float:
    """A reward a random model can earn: how many digits its response holds."""
    return float(sum(c.isdigit() for c in response))


def _rs(model_dir: str, data: str, log_dir: str, engine: str) -> RSTrainer:
    raw = _merge(_common(model_dir, log_dir, engine, {"rs": {"max_epochs": 1, "save_interval": 2, "val_check_interval": 2,
                                                             "limit_val_batches": 1}}),
                 {"model": {"rs": {"num_rollout_samples": 4, "num_val_samples": 4, "num_rollouts_per_prompt": 2,
                                   "top_n_rollouts": 2, "rollout_micro_batch_size": 3,
                                   "sampling_params": {"use_greedy": True}, "length_params": {"max_length": 4}},
                            "data": {"data_prefix": {"train": data, "validation": data}}},
                  "exp_manager": {"checkpoint_callback_params": {"monitor": "val_reward_mean", "mode": "max"}}})
    cfg = load_config(RSJobConfig, raw)
    policy = GPTRSActor(cfg.model, cfg.pretrained_checkpoint, cfg.trainer)
    loader = lambda shuffle: build_prompt_loader(data, prompts_per_step=4, response_budget=4, shuffle=shuffle,  # noqa: E731
                                                 **loader_args(policy, cfg.model, global_batch=False))
    return RSTrainer(model=policy, train_dataloader=loader(True), val_dataloader=loader(False), cfg=cfg.trainer.rs,
                     exp_manager=cfg.exp_manager, log_every_n_steps=1, config={}, reward=FunctionReward(digit_reward),
                     rs=cfg.model.rs)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    work = tmp_path_factory.mktemp("seam")
    prompts = work / "prompts.jsonl"
    rng = random.Random(0)
    prompts.write_text("".join(json.dumps({"text": f"{rng.randint(1, 99)}+{rng.randint(1, 99)}="}) + "\n" for _ in range(12)))
    return {"dpo": write_pairs(str(work / "pairs.jsonl"), 12), "spin": write_sft(str(work / "sft.jsonl"), 8),
            "rs": str(prompts)}


def _records(log_dir: str) -> list[dict]:
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def _assert_same_metrics(a: list[dict], b: list[dict], tol: float) -> None:
    assert [(r["split"], r["step"]) for r in a] == [(r["split"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra:
            if key != "split":
                assert ra[key] == pytest.approx(rb[key], abs=tol), (ra["split"], ra["step"], key)


@pytest.mark.parametrize("algorithm", ["dpo", "spin", "rs"])
def test_algorithms_give_the_same_metrics_on_the_plain_engine(algorithm: str, llama_dir: str,
                                                              data_files: dict[str, str], tmp_path) -> None:
    build = {"dpo": _dpo, "spin": _spin, "rs": _rs}[algorithm]
    logs = {}
    for engine in ("torch_native", "plain"):
        logs[engine] = str(tmp_path / engine)
        trainer = build(llama_dir, data_files[algorithm], logs[engine], engine)
        assert type(trainer.model.engine).__name__ == {"plain": "PlainEngine", "torch_native": "TorchNativeEngine"}[engine]
        trainer.fit()
    plain, native = _records(logs["plain"]), _records(logs["torch_native"])
    assert len([r for r in plain if r["split"] == "train"]) >= 3
    declared = {"dpo": DPO_VALIDATION_METRICS, "spin": SPIN_VALIDATION_METRICS, "rs": RS_VALIDATION_METRICS}[algorithm]
    for record in (r for r in plain if r["split"] == "val"):  # what a checkpoint monitor may name, checked at start-up
        assert set(record) - {"split", "step"} == set(declared)
    _assert_same_metrics(plain, native, tol=2e-5)
    assert os.path.isfile(os.path.join(logs["plain"], "hf_model", "config.json"))


def test_a_run_on_the_plain_engine_resumes_exactly(llama_dir: str, data_files: dict[str, str], tmp_path,
                                                   monkeypatch) -> None:
    straight = str(tmp_path / "straight")
    _spin(llama_dir, data_files["spin"], straight, "plain").fit()
    killed = str(tmp_path / "killed")
    real_step = SPINTrainer.train_step

    def die_at_step_4(self: SPINTrainer, batch: list) -> dict:
        if self.state.step == 3:  # checkpoint at 3, inside iteration 1 with its own reference
            self.checkpoints.wait()  # killed once that checkpoint is complete (saves may be asynchronous)
            raise KeyboardInterrupt("killed")
        return real_step(self, batch)

    monkeypatch.setattr(SPINTrainer, "train_step", die_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        _spin(llama_dir, data_files["spin"], killed, "plain").fit()
    monkeypatch.setattr(SPINTrainer, "train_step", real_step)
    _spin(llama_dir, data_files["spin"], killed, "plain").fit()
    train = lambda d: read_metrics(os.path.join(d, "metrics.jsonl"), "train")  # noqa: E731
    assert [r["step"] for r in train(killed)] == [1, 2, 3, 4]
    assert [r["loss"] for r in train(killed)] == pytest.approx([r["loss"] for r in train(straight)], abs=1e-6)
