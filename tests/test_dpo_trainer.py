"""DPOTrainer end to end on a tiny random model: exact resume after a kill, every sample once
per epoch, NaN handling, metrics files, and the entry script's bad-input behaviour."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from helpers import REPO, loader_args, write_pairs
from nemo_aligner.algorithms.dpo import DPOTrainer
from nemo_aligner.algorithms.loop import NonFiniteLossError
from nemo_aligner.config.dpo import DPOJobConfig
from nemo_aligner.config.loader import load_config
from nemo_aligner.data.builders import build_preference_loader
from nemo_aligner.models.nlp.gpt.gpt_dpo_model import GPTDPOModel
from nemo_aligner.utils.metrics import read_metrics

PAIRS, GBS = 40, 8  # 5 steps per epoch


@pytest.fixture(scope="module")
def preference_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_pairs(str(tmp_path_factory.mktemp("pref") / "pairs.jsonl"), PAIRS)


def _config(model_dir: str, data: str, log_dir: str, async_save: bool = True, **loop: object) -> DPOJobConfig:
    raw = {
        "trainer": {"precision": "fp32", "log_every_n_steps": 1,
                    "dpo": {"max_epochs": 2, "save_interval": 3, "val_check_interval": 5, "limit_val_batches": 1, **loop}},
        "exp_manager": {"explicit_log_dir": log_dir, "create_tensorboard_logger": False,
                        "checkpoint_callback_params": {"async_save": async_save}},
        "pretrained_checkpoint": {"restore_from_path": model_dir},
        "model": {"micro_batch_size": 2, "global_batch_size": GBS, "encoder_seq_length": 32,
                  "optim": {"lr": 1e-3, "sched": {"warmup_steps": 1, "min_lr": 1e-4}},
                  "dpo": {"log_prob_forward_micro_batch_size": 2, "sft_loss_weight": 0.1},
                  "data": {"data_prefix": {"train": data, "validation": data}}},
        "task_eval": None,
    }
    return load_config(DPOJobConfig, OmegaConf.create(raw))


def _trainer(cfg: DPOJobConfig, seen: list[list[int]]) -> DPOTrainer:
    policy = GPTDPOModel(cfg.model, cfg.pretrained_checkpoint, cfg.trainer)
    data = cfg.model.data
    train = build_preference_loader(data.data_prefix.train, shuffle=True, **loader_args(policy, cfg.model))
    val = build_preference_loader(data.data_prefix.validation, shuffle=False, **loader_args(policy, cfg.model))
    take = train.sampler.next_batch
    train.sampler.next_batch = lambda: seen.append(take()) or seen[-1]  # record what each step trained on
    return DPOTrainer(model=policy, train_dataloader=train, val_dataloader=val, cfg=cfg.trainer.dpo, exp_manager=cfg.exp_manager,
                      log_every_n_steps=1, config={})


def _losses(log_dir: str) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(os.path.join(log_dir, "metrics.jsonl"), "train")]


@pytest.mark.parametrize("async_save", [False, True])
def test_killed_and_resumed_run_equals_uninterrupted_run(llama_dir: str, preference_file: str, tmp_path, monkeypatch,
                                                         async_save: bool) -> None:
    """Killed after the checkpoint of step 6 is complete (for an asynchronous save: once it is written)."""
    straight_seen: list[list[int]] = []
    _trainer(_config(llama_dir, preference_file, str(tmp_path / "straight"), async_save), straight_seen).fit()
    straight = _losses(str(tmp_path / "straight"))
    assert [s for s, _ in straight] == list(range(1, 11))

    killed_dir = str(tmp_path / "killed")
    seen: list[list[int]] = []
    trainer = _trainer(_config(llama_dir, preference_file, killed_dir, async_save), seen)
    real_step = DPOTrainer.train_step

    def die_at_step_8(self: DPOTrainer, batch: dict) -> dict:
        if self.state.step == 7:  # steps 1-7 done, checkpoint at 6: 7 must be redone after resume
            self.checkpoints.wait()
            raise KeyboardInterrupt("killed")
        return real_step(self, batch)

    monkeypatch.setattr(DPOTrainer, "train_step", die_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    monkeypatch.setattr(DPOTrainer, "train_step", real_step)
    assert [s for s, _ in _losses(killed_dir)] == list(range(1, 8))
    seen = seen[:6]  # batches of steps 7 and 8 were taken by the killed process after the checkpoint
    _trainer(_config(llama_dir, preference_file, killed_dir, async_save), seen).fit()

    resumed = _losses(killed_dir)
    assert [s for s, _ in resumed] == list(range(1, 11))  # step 7 logged once: the killed run's line was dropped
    assert [l for _, l in resumed] == pytest.approx([l for _, l in straight], abs=1e-6)
    assert seen == straight_seen
    per_epoch = PAIRS // GBS
    for epoch in range(2):
        samples = [i for batch in seen[epoch * per_epoch:(epoch + 1) * per_epoch] for i in batch]
        assert sorted(samples) == list(range(PAIRS))  # every sample exactly once per epoch
    assert os.path.isfile(os.path.join(killed_dir, "hf_model", "config.json"))
    val = read_metrics(os.path.join(killed_dir, "metrics.jsonl"), "val")
    assert [r["step"] for r in val] == [5, 10] and {"acc", "rewards_margin_mean", "rewards_all_std"} <= val[0].keys()
    train_keys = read_metrics(os.path.join(killed_dir, "metrics.jsonl"), "train")[0].keys()
    assert {"loss", "preference_loss", "sft_loss", "acc", "rewards_chosen_mean", "rewards_rejected_mean",
            "rewards_margin_mean", "rewards_all_mean", "rewards_all_std", "grad_norm", "lr", "consumed_samples",
            "tokens_per_sec", "step_time"} <= train_keys


def test_nan_loss_stops_with_step_and_batch_and_saves_nothing(llama_dir: str, preference_file: str, tmp_path) -> None:
    log_dir = str(tmp_path / "nan")
    trainer = _trainer(_config(llama_dir, preference_file, log_dir, save_interval=1), [])
    real = trainer.model.reference_logps
    calls = {"n": 0}

    def poisoned(batch: dict) -> torch.Tensor:
        calls["n"] += 1
        out = real(batch)
        return out * float("nan") if calls["n"] == 3 else out

    trainer.model.reference_logps = poisoned
    with pytest.raises(NonFiniteLossError, match=r"dpo step 3 \(epoch 0, this rank's dataset indices \[\d+"):
        trainer.fit()
    checkpoints = sorted(d for d in os.listdir(os.path.join(log_dir, "checkpoints")) if d.startswith("step_"))
    assert checkpoints == ["step_1", "step_2"]
    assert not os.path.exists(os.path.join(log_dir, "hf_model"))


def test_entry_script_rejects_bad_data_and_an_unknown_loss_before_writing(llama_dir: str, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "chosen_response": "2", "rejected_response": "3"}\n'
                   '{"prompt": "1+2=", "chosen_response": 3, "rejected_response": "4"}\n'
                   'not json\n')
    log_dir = tmp_path / "logs"
    cmd = [sys.executable, "examples/nlp/gpt/train_gpt_dpo.py", f"pretrained_checkpoint.restore_from_path={llama_dir}",
           f"model.data.data_prefix.train={bad}", f"exp_manager.explicit_log_dir={log_dir}", "task_eval=null"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert f"{bad}:2: field 'chosen_response'" in proc.stderr and f"{bad}:3:" in proc.stderr
    assert not log_dir.exists()
    cmd = [*cmd[:3], "model.dpo.preference_loss=kto", *cmd[4:]]  # good data, unknown loss name
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "model.dpo.preference_loss='kto' is invalid: it must be one of ['aot', 'aot_pair', 'apo_down'" in proc.stderr, proc.stderr[-2000:]
    assert not log_dir.exists()


def test_reference_pass_chunks_whatever_rows_it_gets(llama_dir: str, preference_file: str, tmp_path) -> None:
    """micro 4 / global 8 with reference chunks of 16 pairs (more than a rank's 8), 3 (no divisor)
    and 1: the same reference log-probs, and a training step runs (it crashed at step 1 before)."""
    logprobs = {}
    for chunk in (16, 3, 1):
        raw = OmegaConf.merge(OmegaConf.structured(_config(llama_dir, preference_file, str(tmp_path / f"run{chunk}"))),
                              {"model": {"micro_batch_size": 4, "dpo": {"log_prob_forward_micro_batch_size": chunk,
                                                                        "reference": {"strategy": "swap"}}}})
        cfg = load_config(DPOJobConfig, raw)
        policy = GPTDPOModel(cfg.model, cfg.pretrained_checkpoint, cfg.trainer)
        policy.setup_optimizer(max_steps=1)
        batch = build_preference_loader(preference_file, shuffle=False, **loader_args(policy, cfg.model)).next_batch()[0]
        logprobs[chunk] = policy.reference_logprobs(batch)
        assert logprobs[chunk].shape == (16, batch["input_ids"].shape[1] - 1)
        assert policy.loss_and_metrics(batch, forward_only=False)["loss"] > 0
    torch.testing.assert_close(logprobs[16], logprobs[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(logprobs[3], logprobs[1], atol=1e-5, rtol=0)


_KILLED_DURING_WRITE = """
import os, sys, time
sys.path[:0] = [{tests!r}]
from torch.distributed.checkpoint import FileSystemWriter
import test_dpo_trainer as t
real_write = FileSystemWriter.write_data

def slow_write(self, plan, planner):  # the checkpoint of step 6 takes its time; training goes on meanwhile
    if "step_6.tmp" in str(self.path):
        open({marker!r}, "w").close()
        time.sleep(120)
    return real_write(self, plan, planner)

FileSystemWriter.write_data = slow_write
t._trainer(t._config({model!r}, {data!r}, {log_dir!r}), []).fit()
"""


def test_kill_9_during_an_asynchronous_save_keeps_the_previous_checkpoint(llama_dir: str, preference_file: str,
                                                                          tmp_path) -> None:
    """While step 6's checkpoint is being written in the background, training goes on to later steps; a
    kill -9 then leaves step 3 as `latest`, intact, and the rerun resumes from it to the uninterrupted losses."""
    straight = str(tmp_path / "straight")
    _trainer(_config(llama_dir, preference_file, straight), []).fit()
    log_dir, marker = str(tmp_path / "killed"), str(tmp_path / "writing")
    script = _KILLED_DURING_WRITE.format(tests=os.path.dirname(__file__), marker=marker, model=llama_dir,
                                         data=preference_file, log_dir=log_dir)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = os.path.join(log_dir, "metrics.jsonl")
    deadline = time.time() + 120
    while not (os.path.exists(marker) and os.path.exists(metrics) and len(_losses(log_dir)) >= 8):
        assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before the test could kill it"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # steps 7 and 8 trained while step 6 was being written
    proc.wait()
    checkpoints = os.path.join(log_dir, "checkpoints")
    assert open(os.path.join(checkpoints, "latest")).read().strip() == "step_3"
    assert os.path.isfile(os.path.join(checkpoints, "step_3", "trainer_state.json"))
    assert not os.path.exists(os.path.join(checkpoints, "step_6"))
    _trainer(_config(llama_dir, preference_file, log_dir), []).fit()
    assert [loss for _, loss in _losses(log_dir)] == pytest.approx([loss for _, loss in _losses(straight)], abs=1e-6)
