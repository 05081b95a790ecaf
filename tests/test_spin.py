"""SPIN: loss values, the per-iteration beta, the reference update at the iteration boundary,
greedy generation against a step-by-step transformers decode, exact resume mid-iteration,
optimizer-state offload during generation, empty generations."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from helpers import REPO, loader_args, write_sft
from nemo_aligner.algorithms.spin import SPINTrainer
from nemo_aligner.config.loader import load_config
from nemo_aligner.config.spin import SPINJobConfig
from nemo_aligner.data.builders import build_sft_loader
from nemo_aligner.losses.reward_metrics import finalize_reward_metrics
from nemo_aligner.losses.spin import spin_loss_fn
from nemo_aligner.models.nlp.gpt.gpt_spin_model import GPTSPINModel
from nemo_aligner.utils.metrics import read_metrics

PROMPTS, GBS = 24, 8  # 3 steps per epoch


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_sft(str(tmp_path_factory.mktemp("sft") / "sft.jsonl"), PROMPTS)


def _config(model_dir: str, data: str, log_dir: str, *, greedy: bool = False, **loop: object) -> SPINJobConfig:
    raw = {
        "trainer": {"precision": "fp32", "spin": {"max_iterations": 2, "max_epochs": 1, "save_interval": 2,
                                                  "val_check_interval": 3, "limit_val_batches": 1, **loop}},
        "exp_manager": {"explicit_log_dir": log_dir, "create_tensorboard_logger": False},
        "pretrained_checkpoint": {"restore_from_path": model_dir},
        "model": {"micro_batch_size": 2, "global_batch_size": GBS, "encoder_seq_length": 32,
                  "optim": {"lr": 1e-3, "sched": {"warmup_steps": 1, "min_lr": 1e-4}},
                  "spin": {"ref_policy_kl_penalty": [0.3, 0.7], "rollout_micro_batch_size": 3,
                           "sampling_params": {"use_greedy": greedy, "temperature": 1.3},
                           "length_params": {"max_length": 5}},
                  "data": {"train_ds": {"file_path": data}, "validation_ds": {"file_path": data}}},
        "task_eval": None,
    }
    return load_config(SPINJobConfig, OmegaConf.create(raw))


def _trainer(cfg: SPINJobConfig, **kwargs: object) -> SPINTrainer:
    policy = GPTSPINModel(cfg.model, cfg.pretrained_checkpoint, cfg.trainer)
    data, budget = cfg.model.data, cfg.model.spin.length_params.max_length
    train = build_sft_loader(data.train_ds.file_path, response_budget=budget, shuffle=True, collate=False,
                             **loader_args(policy, cfg.model))
    val = build_sft_loader(data.validation_ds.file_path, response_budget=0, shuffle=False, collate=True,
                           **loader_args(policy, cfg.model))
    return SPINTrainer(model=policy, train_dataloader=train, val_dataloader=val, cfg=cfg.trainer.spin, exp_manager=cfg.exp_manager,
                       log_every_n_steps=1, config={}, **kwargs)


def test_spin_loss_against_hand_computed_values() -> None:
    # rows: actual 0, generated 0 (EOS only), actual 1, generated 1
    logprobs = torch.tensor([[-1.0, -2.0], [-3.0, -0.5], [-0.5, -0.5], [-1.0, -4.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -1.5], [-2.0, -1.0], [-1.0, -1.0], [-1.0, -2.0]], dtype=torch.float64)
    loss_mask = torch.tensor([[0, 1, 1], [0, 0, 1], [0, 1, 1], [0, 1, 1]], dtype=torch.float64)
    # R: actual0 = 0.5 - 0.5 = 0; generated0 = 0.5 (EOS only); actual1 = 0.5 + 0.5 = 1; generated1 = 0 - 2 = -2
    loss, sums = spin_loss_fn(logprobs, {"loss_mask": loss_mask, "ref_logps": (ref * loss_mask[:, 1:]).sum(-1)}, beta=0.5,
                              global_pairs=torch.tensor(2.0, dtype=torch.float64))
    expected = (math.log1p(math.exp(0.5 * 0.5)) + math.log1p(math.exp(-0.5 * 3))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    metrics = finalize_reward_metrics(sums)
    assert metrics["acc"] == 0.5
    assert metrics["rewards_actual_mean"] == pytest.approx(0.25) and metrics["rewards_generated_mean"] == pytest.approx(-0.375)
    rewards = [0.0, 0.25, 0.5, -1.0]
    mean = sum(rewards) / 4
    assert metrics["rewards_all_std"] == pytest.approx(math.sqrt(sum((r - mean) ** 2 for r in rewards) / 4))


def test_reference_changes_exactly_at_iteration_boundaries_and_beta_follows(llama_dir: str, sft_file: str, tmp_path) -> None:
    cfg = _config(llama_dir, sft_file, str(tmp_path / "run"))
    trainer = _trainer(cfg)
    probe = trainer.val_dataloader.first_batches(1)[0]
    reference_logprobs, policy_logprobs = [], []
    after = trainer.after_train_step

    def record() -> None:
        after()
        reference_logprobs.append(trainer.model.reference_logprobs(probe))
        policy_logprobs.append(trainer.model.get_logprobs(probe))

    trainer.after_train_step = record
    trainer.fit()
    assert trainer.steps_per_iteration == 3 and len(reference_logprobs) == 6
    initial = GPTSPINModel(cfg.model, cfg.pretrained_checkpoint, cfg.trainer).get_logprobs(probe)
    for step in (1, 2):  # iteration 0: the initial model
        torch.testing.assert_close(reference_logprobs[step - 1], initial, atol=0, rtol=0)
    torch.testing.assert_close(reference_logprobs[2], policy_logprobs[2], atol=0, rtol=0)  # step 3 ends iteration 0
    for step in (4, 5):
        torch.testing.assert_close(reference_logprobs[step - 1], policy_logprobs[2], atol=0, rtol=0)
    assert not torch.equal(reference_logprobs[3], initial)
    betas = [r["kl_penalty"] for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl"), "train")]
    assert betas == [0.3, 0.3, 0.3, 0.7, 0.7, 0.7]


def test_greedy_generation_equals_a_step_by_step_transformers_decode(llama_dir: str, sft_file: str, tmp_path) -> None:
    trainer = _trainer(_config(llama_dir, sft_file, str(tmp_path / "run"), greedy=True))
    policy = trainer.model
    policy.setup_optimizer(max_steps=1)
    prompts = [torch.tensor([1, 5, 9, 13, 4]), torch.tensor([1, 30]), torch.tensor([1, 7, 7, 40, 41, 42, 3])]
    ours = policy.generate_rejected(prompts)
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    eos = policy.tokenizer.eos_token_id
    for prompt, got in zip(prompts, ours):
        sequence, new = prompt.tolist(), []
        with torch.no_grad():
            while len(new) < 5:
                token = int(hf(input_ids=torch.tensor([sequence])).logits[0, -1].argmax())
                sequence.append(token)
                new.append(token)
                if token == eos:
                    break
        assert got.tolist() == new


def test_generation_offloads_and_restores_optimizer_state_exactly(llama_dir: str, sft_file: str, tmp_path) -> None:
    trainer = _trainer(_config(llama_dir, sft_file, str(tmp_path / "run"), max_steps=1))
    trainer.fit()  # one step: the optimizer has state
    policy = trainer.model
    states = [v.to_local() if hasattr(v, "to_local") else v for s in policy.engine.optimizer.state.values() for v in s.values()]
    before = [t.clone() for t in states]
    seen_sizes = []
    generate = policy.generate

    def spy(*args: object, **kwargs: object):
        seen_sizes.append(sum(t.untyped_storage().size() for t in states if t.dim() > 0))
        return generate(*args, **kwargs)

    policy.generate = spy
    policy.generate_rejected([torch.tensor([1, 5, 9])] * 4)
    assert seen_sizes and all(size == 0 for size in seen_sizes)  # offloaded while generating
    assert all(torch.equal(a, b) for a, b in zip(before, states))


def test_resume_mid_iteration_equals_uninterrupted_run(llama_dir: str, sft_file: str, tmp_path, monkeypatch) -> None:
    straight = str(tmp_path / "straight")
    _trainer(_config(llama_dir, sft_file, straight)).fit()
    killed = str(tmp_path / "killed")
    real_step = SPINTrainer.train_step

    def die_at_step_5(self: SPINTrainer, batch: dict) -> dict:
        if self.state.step == 4:  # checkpoint at 4 is inside iteration 1, with iteration 1's reference
            self.checkpoints.wait()  # killed once that checkpoint is complete (saves are asynchronous)
            raise KeyboardInterrupt("killed")
        return real_step(self, batch)

    monkeypatch.setattr(SPINTrainer, "train_step", die_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        _trainer(_config(llama_dir, sft_file, killed)).fit()
    monkeypatch.setattr(SPINTrainer, "train_step", real_step)
    _trainer(_config(llama_dir, sft_file, killed)).fit()
    losses = lambda d: [(r["step"], r["loss"]) for r in read_metrics(os.path.join(d, "metrics.jsonl"), "train")]  # noqa: E731
    assert [s for s, _ in losses(killed)] == list(range(1, 7))
    assert [l for _, l in losses(killed)] == pytest.approx([l for _, l in losses(straight)], abs=1e-6)


def test_entry_script_rejects_bad_sft_lines_before_writing(llama_dir: str, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "1+1=", "output": "2"}\n{"input": "1+2="}\n'
                   '{"messages": [{"role": "user", "content": "1+3="}]}\n')
    log_dir = tmp_path / "logs"
    cmd = [sys.executable, "examples/nlp/gpt/train_gpt_spin.py", f"pretrained_checkpoint.restore_from_path={llama_dir}",
           f"model.data.train_ds.file_path={bad}", f"exp_manager.explicit_log_dir={log_dir}", "task_eval=null"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert f"{bad}:2: field 'output'" in proc.stderr and f"{bad}:3: field 'messages'" in proc.stderr, proc.stderr[-2000:]
    assert not log_dir.exists()
