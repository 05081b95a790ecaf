"""The log-directory policy: a fresh start never overwrites or interleaves with an earlier run, a
resume keeps exactly one metrics row per step (also after a torn line) and keeps a changed config."""

from __future__ import annotations

import json
import logging
import os

import pytest
from omegaconf import OmegaConf

from helpers import loader_args, write_pairs
from nemo_aligner.algorithms.dpo import DPOTrainer
from nemo_aligner.data.builders import build_preference_loader
from nemo_aligner.models.nlp.gpt.gpt_dpo_model import GPTDPOModel
from nemo_aligner.utils.log_dir import truncate_step_log
from nemo_aligner.utils.metrics import read_metrics
from test_dpo_trainer import _config

PAIRS = 24  # global batch 8: 3 steps per epoch, 6 steps over 2 epochs


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_pairs(str(tmp_path_factory.mktemp("pairs") / "pairs.jsonl"), PAIRS)


def _run(model_dir: str, data: str, log_dir: str, *, die_at: int | None = None, lr: float = 1e-3, **exp: object) -> None:
    cfg = _config(model_dir, data, log_dir, save_interval=2, val_check_interval=3)
    raw = OmegaConf.merge(OmegaConf.structured(cfg), {"exp_manager": exp, "model": {"optim": {"lr": lr}}})
    cfg = OmegaConf.to_object(raw)
    policy = GPTDPOModel(cfg.model, cfg.pretrained_checkpoint, cfg.trainer)
    loader = lambda shuffle: build_preference_loader(data, shuffle=shuffle, **loader_args(policy, cfg.model))  # noqa: E731
    trainer = DPOTrainer(model=policy, train_dataloader=loader(True), val_dataloader=loader(False), cfg=cfg.trainer.dpo,
                         exp_manager=cfg.exp_manager, log_every_n_steps=1, config=OmegaConf.to_container(raw))
    if die_at is not None:
        real = trainer.train_step

        def step(batch: dict) -> dict:
            if trainer.state.step + 1 == die_at:
                trainer.checkpoints.wait()  # killed once the last checkpoint is complete (saves are asynchronous)
                raise KeyboardInterrupt("killed")
            return real(batch)

        trainer.train_step = step
        with pytest.raises(KeyboardInterrupt):
            trainer.fit()
        return
    trainer.fit()


def _steps(log_dir: str) -> list[int]:
    return [r["step"] for r in read_metrics(os.path.join(log_dir, "metrics.jsonl"), "train")]


def test_a_fresh_start_moves_an_earlier_run_aside(llama_dir: str, pairs: str, tmp_path, caplog) -> None:
    log_dir = str(tmp_path / "run")
    _run(llama_dir, pairs, log_dir, die_at=2)  # killed before its first checkpoint (at step 2)
    assert _steps(log_dir) == [1]
    with caplog.at_level(logging.WARNING):
        _run(llama_dir, pairs, log_dir)  # the same command again: nothing to resume
    assert "it holds no complete checkpoint to resume from" in caplog.text
    assert _steps(log_dir) == [1, 2, 3, 4, 5, 6]  # no duplicated step 1
    earlier = os.path.join(log_dir, "previous_runs", "0")
    assert _steps(earlier) == [1] and os.path.isfile(os.path.join(earlier, "config.yaml"))

    _run(llama_dir, pairs, log_dir, resume_if_exists=False)  # a full run with checkpoints, started over
    assert _steps(log_dir) == [1, 2, 3, 4, 5, 6]
    kept = os.path.join(log_dir, "previous_runs", "1")
    assert _steps(kept) == [1, 2, 3, 4, 5, 6]
    assert sorted(d for d in os.listdir(os.path.join(kept, "checkpoints")) if d.startswith("step_")) == ["step_4", "step_6"]


def test_a_resume_keeps_one_row_per_step_despite_a_torn_line_and_keeps_a_changed_config(
        llama_dir: str, pairs: str, tmp_path, caplog) -> None:
    log_dir = str(tmp_path / "run")
    _run(llama_dir, pairs, log_dir, die_at=4)  # checkpoint at 2, step 3 logged, killed in step 4
    with open(os.path.join(log_dir, "metrics.jsonl"), "a") as f:
        f.write('{"split": "train", "step": 4, "lo')  # the write the kill cut short
    with caplog.at_level(logging.WARNING):
        _run(llama_dir, pairs, log_dir, lr=2e-3)
    assert "dropped 1 line(s) that are not valid JSON" in caplog.text
    assert "model.optim.lr: 0.001 -> 0.002" in caplog.text
    assert _steps(log_dir) == [1, 2, 3, 4, 5, 6]
    assert OmegaConf.load(os.path.join(log_dir, "config.until_step_2.yaml")).model.optim.lr == 1e-3
    assert OmegaConf.load(os.path.join(log_dir, "config.yaml")).model.optim.lr == 2e-3


def test_truncating_keeps_earlier_rows_of_every_split(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [{"split": "train", "step": 1}, {"split": "val", "step": 1}, {"split": "train", "step": 2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    truncate_step_log(str(path), 1)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:2]
