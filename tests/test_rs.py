"""Rejection sampling: top-n selection per example (duplicate prompts included), reward checks,
exact resume, bad prompt files."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from omegaconf import OmegaConf

from helpers import loader_args

from nemo_aligner.algorithms.rs import RSTrainer
from nemo_aligner.config.loader import load_config
from nemo_aligner.config.rs import RSJobConfig
from nemo_aligner.data.builders import build_prompt_loader
from nemo_aligner.data.jsonl import DataFormatError
from nemo_aligner.algorithms.rs import select_top_n
from nemo_aligner.models.nlp.gpt.gpt_rs_actor import GPTRSActor
from nemo_aligner.utils.metrics import read_metrics
from nemo_aligner.servers.rewards import FunctionReward, RewardError

PROMPTS = 16  # 4 prompts per step -> 4 steps per epoch


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    with open(path, "w") as f:
        for _ in range(PROMPTS):
            f.write(json.dumps({"text": f"{rng.randint(1, 99)}+{rng.randint(1, 99)}="}) + "\n")
    return str(path)


def length_reward(prompt: str, response: str) -> float:
    """A deterministic reward a random model can earn: shorter responses score higher."""
    return -float(len(response)) + 0.01 * len(prompt)


def _config(model_dir: str, data: str, log_dir: str, packing: bool = False, **loop: object) -> RSJobConfig:
    raw = {
        "trainer": {"precision": "fp32", "rs": {"max_epochs": 2, "save_interval": 3, "val_check_interval": 4,
                                                "limit_val_batches": 1, "rollout_log_samples": 2, **loop}},
        "exp_manager": {"explicit_log_dir": log_dir, "create_tensorboard_logger": False,
                        "checkpoint_callback_params": {"monitor": "val_reward_mean", "mode": "max"}},
        "pretrained_checkpoint": {"restore_from_path": model_dir},
        "model": {"micro_batch_size": 2, "global_batch_size": 4, "encoder_seq_length": 32,
                  "optim": {"lr": 1e-3, "sched": {"warmup_steps": 1, "min_lr": 1e-4}},
                  "rs": {"num_rollout_samples": 4, "num_val_samples": 4, "num_rollouts_per_prompt": 3,
                         "top_n_rollouts": 2, "rollout_micro_batch_size": 5, "length_params": {"max_length": 5}},
                  "data": {"data_prefix": {"train": data, "validation": data}, "packing": packing}},
        "reward": {"function": {"_target_": "test_rs.length_reward", "_partial_": True}},
        "task_eval": None,
    }
    return load_config(RSJobConfig, OmegaConf.create(raw))


def _trainer(cfg: RSJobConfig, reward=FunctionReward(length_reward)) -> RSTrainer:
    policy = GPTRSActor(cfg.model, cfg.pretrained_checkpoint, cfg.trainer)
    rs, data = cfg.model.rs, cfg.model.data
    loader = lambda n, shuffle: build_prompt_loader(data.data_prefix.train, prompts_per_step=n,  # noqa: E731
                                                    response_budget=rs.length_params.max_length, shuffle=shuffle,
                                                    **loader_args(policy, cfg.model, global_batch=False))
    return RSTrainer(model=policy, train_dataloader=loader(rs.num_rollout_samples, True), val_dataloader=loader(rs.num_val_samples, False),
                     cfg=cfg.trainer.rs, exp_manager=cfg.exp_manager, log_every_n_steps=1, config={}, reward=reward, rs=rs)


def test_select_top_n_per_row_with_ties() -> None:
    rewards = torch.tensor([[0.1, 0.9, 0.5, 0.9], [0.3, 0.3, 0.2, 0.4]])
    assert select_top_n(rewards, 2).tolist() == [[1, 3], [3, 0]]
    assert select_top_n(rewards, 1).tolist() == [[1], [3]]


def test_kept_rollouts_come_from_each_rows_own_generations_with_duplicate_prompts(llama_dir: str, prompt_file: str, tmp_path) -> None:
    trainer = _trainer(_config(llama_dir, prompt_file, str(tmp_path / "run")))
    trainer.model.setup_optimizer(max_steps=1)
    same = {"prompt_ids": torch.tensor([1, 5, 6]), "prompt_text": "5+6="}
    batch = [same, dict(same), {"prompt_ids": torch.tensor([1, 7]), "prompt_text": "7="}, dict(same)]
    # rollout j of row i is the token sequence [10 + i, 20 + j]; its reward prefers a row-specific j
    trainer.model.generate_rollouts = lambda prompts, k: [torch.tensor([10 + i, 20 + j]) for i in range(len(prompts)) for j in range(k)]
    preferred = {0: 2, 1: 0, 2: 1, 3: 1}
    trainer.model.tokenizer.batch_decode = lambda seqs, skip_special_tokens: [f"{int(s[0])} {int(s[1])}" for s in seqs]

    def reward(prompts, responses):
        rows = [(int(r.split()[0]) - 10, int(r.split()[1]) - 20) for r in responses]
        return [2.0 if j == preferred[i] else (1.0 if j == (preferred[i] + 1) % 3 else 0.0) for i, j in rows]

    trainer.reward = reward
    seen = {}
    trainer.fine_tune = lambda kept: seen.setdefault("kept", kept) and [{"loss": 0.0, "num_tokens": 1.0, "grad_norm": 0.0, "lr": 0.0}]
    metrics = trainer.train_step(batch)
    kept = [(p.tolist(), r.tolist()) for p, r in seen["kept"]]
    expected = []
    for i, ex in enumerate(batch):
        for j in (preferred[i], (preferred[i] + 1) % 3):
            expected.append((ex["prompt_ids"].tolist(), [10 + i, 20 + j]))
    assert kept == expected
    assert metrics["kept_reward_mean"] == pytest.approx(1.5) and metrics["reward_max"] == 2.0 and metrics["reward_min"] == 0.0


@pytest.mark.parametrize("bad, message", [
    (lambda p, r: [0.0] * (len(r) - 1), r"rs step 1 \(12 responses\): the reward source returned 11 scores for 12 responses"),
    (lambda p, r: [float("nan")] + [0.0] * (len(r) - 1), r"rs step 1 \(12 responses\): non-finite rewards at positions \[0\]"),
])
def test_bad_rewards_stop_before_training_and_saving(llama_dir: str, prompt_file: str, tmp_path, bad, message) -> None:
    log_dir = tmp_path / "run"
    trainer = _trainer(_config(llama_dir, prompt_file, str(log_dir), save_interval=1), reward=bad)
    with pytest.raises(RewardError, match=message):
        trainer.fit()
    assert not (log_dir / "checkpoints").exists() or not any(d.startswith("step_") for d in os.listdir(log_dir / "checkpoints"))


@pytest.mark.parametrize("packing", [False, True])
def test_resume_equals_uninterrupted_run(llama_dir: str, prompt_file: str, tmp_path, monkeypatch, packing: bool) -> None:
    straight = str(tmp_path / "straight")
    _trainer(_config(llama_dir, prompt_file, straight, packing)).fit()
    killed = str(tmp_path / "killed")
    real_step = RSTrainer.train_step

    def die_at_step_5(self: RSTrainer, batch: list) -> dict:
        if self.state.step == 4:  # checkpoint at 3; step 4 must be redone
            self.checkpoints.wait()  # killed once that checkpoint is complete (saves are asynchronous)
            raise KeyboardInterrupt("killed")
        return real_step(self, batch)

    monkeypatch.setattr(RSTrainer, "train_step", die_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        _trainer(_config(llama_dir, prompt_file, killed, packing)).fit()
    monkeypatch.setattr(RSTrainer, "train_step", real_step)
    resumed = _trainer(_config(llama_dir, prompt_file, killed, packing))
    resumed.fit()
    records = lambda d: read_metrics(os.path.join(d, "metrics.jsonl"), "train")  # noqa: E731
    assert [r["step"] for r in records(killed)] == list(range(1, 9))
    for a, b in zip(records(killed), records(straight)):
        for key in ("loss", "reward_mean", "kept_reward_mean", "lr", "consumed_samples"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)
    assert resumed.model.engine.scheduler.last_epoch == 8 * resumed.updates_per_step
    rollouts = [json.loads(line) for line in open(os.path.join(straight, "rollouts.jsonl"))]
    assert len(rollouts) == 8 * 2 and {"prompt", "response", "reward", "step"} <= rollouts[0].keys()


def test_prompt_file_with_bad_lines_names_file_line_and_field(llama_dir: str, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "1+1="}\n{"text": 5}\n{"text": "1=", "messages": [{"role": "user", "content": "x"}]}\n')
    cfg = _config(llama_dir, str(bad), str(tmp_path / "run"))
    policy = GPTRSActor(cfg.model, cfg.pretrained_checkpoint, cfg.trainer)
    with pytest.raises(DataFormatError) as err:
        build_prompt_loader(str(bad), prompts_per_step=4, response_budget=5, shuffle=True,
                            **loader_args(policy, cfg.model, global_batch=False))
    assert f"{bad}:2: field 'text'" in str(err.value) and f"{bad}:3: field 'text'" in str(err.value)


def test_packed_sft_steps_equal_padded_ones(llama_dir: str, prompt_file: str, tmp_path) -> None:
    """model.data.packing changes how the rollouts' SFT batches run, not what they compute."""
    runs = {}
    for packing in (False, True):
        log_dir = str(tmp_path / f"packing_{packing}")
        _trainer(_config(llama_dir, prompt_file, log_dir, packing, max_epochs=1)).fit()
        runs[packing] = read_metrics(os.path.join(log_dir, "metrics.jsonl"), "train")
    assert len(runs[True]) == len(runs[False]) > 0
    assert all(0 < r["rollout_share"] < 1 for r in runs[True])  # generation's share of each step is reported
    for padded, packed in zip(runs[False], runs[True]):
        for key in ("loss", "reward_mean", "kept_reward_mean", "grad_norm"):
            assert packed[key] == pytest.approx(padded[key], abs=1e-5), (padded["step"], key)
