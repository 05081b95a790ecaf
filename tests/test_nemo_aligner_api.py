"""NeMo-Aligner's public names, used only as NeMo-Aligner's documentation shows them: DPO trains and
validates through DPOTrainer built with the seed's keyword arguments (and equals our own API's run),
the reference's log-probs, RS's infer, the CPU state dict, and SPIN's reference round trip."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from helpers import REPO, right_padded_batch, write_pairs, write_sft
from nemo_aligner.algorithms.dpo import DPOTrainer, dpo_custom_collate
from nemo_aligner.data.builders import build_preference_loader
from nemo_aligner.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel
from nemo_aligner.models.nlp.gpt.megatron_gpt_rs_actor import MegatronGPTRSModel
from nemo_aligner.models.nlp.gpt.megatron_gpt_spin_model import MegatronGPTSPINModel
from nemo_aligner.utils.metrics import read_metrics
from nemo_aligner.utils.utils import cpu_weight_swap, load_from_nemo, retrieve_model_state_dict_in_cpu

CONF = os.path.join(REPO, "examples", "nlp", "gpt", "conf")


def _cfg(name: str, model_dir: str, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return compose(config_name=name, overrides=[f"pretrained_checkpoint.restore_from_path={model_dir}",
                                                    "trainer.precision=fp32", "model.micro_batch_size=2",
                                                    "model.global_batch_size=4", "model.encoder_seq_length=32",
                                                    "task_eval=null", *overrides])


def _load(cls: type, cfg: DictConfig):
    return load_from_nemo(cls, cfg.model, cfg.trainer, strict=True, restore_path=cfg.pretrained_checkpoint.restore_from_path)


def _dpo_cfg(model_dir: str, pairs: str, log_dir: str) -> DictConfig:
    return _cfg("gpt_dpo", model_dir, f"model.data.data_prefix.train={pairs}", f"model.data.data_prefix.validation={pairs}",
                "model.dpo.log_prob_forward_micro_batch_size=2", "trainer.dpo.max_epochs=1", "trainer.dpo.save_interval=2",
                f"exp_manager.explicit_log_dir={log_dir}", "exp_manager.create_tensorboard_logger=false")


def _loaders(model, cfg: DictConfig):
    loader = partial(build_preference_loader, cfg.model.data.data_prefix.train, tokenizer=model.tokenizer,
                     data=model.cfg.data, max_seq_length=cfg.model.encoder_seq_length,
                     global_batch_size=cfg.model.global_batch_size, data_parallel=model.data_parallel)
    return loader(shuffle=True), loader(shuffle=False)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_pairs(str(tmp_path_factory.mktemp("pairs") / "pairs.jsonl"), 12)


def test_dpo_trains_and_validates_through_the_seed_trainer_arguments(llama_dir: str, pairs: str, tmp_path) -> None:
    cfg = _dpo_cfg(llama_dir, pairs, str(tmp_path / "seed"))
    ptl_model = _load(MegatronGPTDPOModel, cfg)
    ptl_model.ref_policy_state_dict = retrieve_model_state_dict_in_cpu(ptl_model, megatron_amp_O2=False)
    train_dataloader, val_dataloader = _loaders(ptl_model, cfg)
    trainer = DPOTrainer(cfg=cfg.trainer.dpo, model=ptl_model, optimizer=None, scheduler=None,
                         train_dataloader=train_dataloader, val_dataloader=val_dataloader, test_dataloader=None,
                         collate_fn=partial(dpo_custom_collate, eos_id=ptl_model.tokenizer.eos_token_id), logger=None,
                         ckpt_callback=None, run_timer=None, exp_manager=cfg.exp_manager, config=OmegaConf.to_container(cfg))
    trainer.fit()
    loss, metrics = trainer.run_validation()
    assert loss == metrics["loss"] and {"acc", "rewards_chosen_mean", "rewards_rejected_mean"} <= metrics.keys()
    seed_steps = read_metrics(str(tmp_path / "seed" / "metrics.jsonl"), "train")
    assert len(seed_steps) == 3
    assert {"loss", "sft_loss", "preference_loss", "acc", "rewards_chosen_mean", "rewards_rejected_mean"} <= seed_steps[0].keys()

    # the same run through our own names: a thin layer, the same losses
    ours_cfg = _dpo_cfg(llama_dir, pairs, str(tmp_path / "ours"))
    from nemo_aligner.config.dpo import DPOJobConfig
    from nemo_aligner.config.loader import load_config
    from nemo_aligner.models.nlp.gpt.gpt_dpo_model import GPTDPOModel

    job = load_config(DPOJobConfig, ours_cfg)
    model = GPTDPOModel(job.model, job.pretrained_checkpoint, job.trainer)
    train, val = _loaders(model, ours_cfg)
    DPOTrainer(cfg=job.trainer.dpo, model=model, train_dataloader=train, val_dataloader=val,
               exp_manager=job.exp_manager).fit()
    ours_steps = read_metrics(str(tmp_path / "ours" / "metrics.jsonl"), "train")
    assert [s["loss"] for s in seed_steps] == pytest.approx([s["loss"] for s in ours_steps], abs=1e-6)

    # and the checkpoint the seed-style run saved loads back through load_from_nemo
    restored = load_from_nemo(MegatronGPTDPOModel, cfg.model, cfg.trainer, restore_path=str(tmp_path / "seed" / "checkpoints"))
    probe = right_padded_batch(4, 10, 48, seed=5)
    torch.testing.assert_close(restored.get_logprobs(probe), ptl_model.get_logprobs(probe), atol=0, rtol=0)


def test_seed_arguments_without_a_counterpart_are_refused_by_name(llama_dir: str, pairs: str, tmp_path) -> None:
    cfg = _dpo_cfg(llama_dir, pairs, str(tmp_path / "run"))
    ptl_model = _load(MegatronGPTDPOModel, cfg)
    train, val = _loaders(ptl_model, cfg)
    for name in ("optimizer", "scheduler", "logger", "ckpt_callback", "run_timer"):
        with pytest.raises(ValueError, match=rf"^{name}=object is not supported: .*; pass {name}=None"):
            DPOTrainer(cfg=cfg.trainer.dpo, model=ptl_model, train_dataloader=train, val_dataloader=val, **{name: object()})
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=r"dpo_custom_collate\(reset_position_ids=True\) is not supported"):
        dpo_custom_collate([], eos_id=2, reset_position_ids=True)
    with pytest.raises(ValueError, match="supports strict=True"):
        load_from_nemo(MegatronGPTDPOModel, cfg.model, cfg.trainer, strict=False, restore_path=llama_dir)
    with pytest.raises(TypeError, match="no Lightning Trainer is used here"):
        load_from_nemo(MegatronGPTDPOModel, cfg.model, object(), restore_path=llama_dir)


def test_get_ref_policy_logprobs_equals_the_reference_computed_directly(llama_dir: str, pairs: str, tmp_path) -> None:
    cfg = _dpo_cfg(llama_dir, pairs, str(tmp_path / "run"))
    model = _load(MegatronGPTDPOModel, cfg)
    initial = retrieve_model_state_dict_in_cpu(model, megatron_amp_O2=False)
    batch = _loaders(model, cfg)[1].next_batch()[0]
    model.setup_optimizer(max_steps=1)
    loss, metrics = model.get_loss_and_metrics(batch, forward_only=False)  # a step: the policy moves away
    assert loss == metrics["loss"]
    model.optimizer_step(1.0)
    with cpu_weight_swap(model, initial):
        direct = model.get_logprobs(batch, micro_batch_size=2)
    torch.testing.assert_close(model.get_ref_policy_logprobs(batch), direct, atol=0, rtol=0)
    assert not torch.equal(model.get_logprobs(batch, micro_batch_size=2), direct)


def test_retrieve_model_state_dict_in_cpu_equals_the_model_weights(llama_dir: str, tmp_path, pairs: str) -> None:
    model = _load(MegatronGPTDPOModel, _dpo_cfg(llama_dir, pairs, str(tmp_path / "run")))
    state = retrieve_model_state_dict_in_cpu(model, megatron_amp_O2=False)
    params = {name: p.to_local() if hasattr(p, "to_local") else p for name, p in model.engine.module.named_parameters()}
    assert state.keys() == params.keys()
    for name, tensor in state.items():
        assert tensor.device.type == "cpu" and not tensor.requires_grad
        torch.testing.assert_close(tensor, params[name].detach(), atol=0, rtol=0)


def test_infer_returns_the_documented_keys_and_shapes(llama_dir: str) -> None:
    model = _load(MegatronGPTRSModel, _cfg("gpt_rs_actor", llama_dir, "model.rs.num_rollout_samples=4",
                                           "model.rs.length_params.max_length=5", "model.rs.sampling_params.use_greedy=true"))
    prompts = [[1, 5, 9, 13], [1, 30], [1, 7, 7]]
    text = torch.tensor([p + [0] * (4 - len(p)) for p in prompts])  # right-padded, as NeMo-Aligner passes them
    out = model.infer({"text": text, "length": torch.tensor([len(p) for p in prompts])})
    assert set(out) == {"response_tokens", "response_lengths", "prompt_lengths"}
    assert out["prompt_lengths"].tolist() == [4, 2, 3]
    assert out["response_tokens"].shape == (3, int(out["response_lengths"].max()))
    new = out["response_lengths"] - out["prompt_lengths"]
    assert bool(((new >= 1) & (new <= 5)).all())
    for row, prompt in enumerate(prompts):
        assert out["response_tokens"][row, : len(prompt)].tolist() == prompt
    model.setup_optimizer(max_steps=2)
    # independently: each row's token-mean NLL over its response tokens (positions prompt_len .. len-1)
    expected = []
    for row, (n_prompt, n_all) in enumerate(zip(out["prompt_lengths"].tolist(), out["response_lengths"].tolist())):
        tokens = out["response_tokens"][row : row + 1, :n_all].cpu()
        mask = torch.zeros_like(tokens, dtype=torch.float32)
        mask[:, n_prompt:] = 1
        logprobs = model.get_logprobs({"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "loss_mask": mask})
        expected.append(-logprobs[0, n_prompt - 1 :].mean().item())
    loss, metrics = model.get_loss_and_metrics(out, forward_only=False)
    assert metrics == {"loss": loss}
    assert loss == pytest.approx(sum(expected) / len(expected), abs=1e-5)
    model.optimizer_step(1.0)
    states = [v.to_local() if hasattr(v, "to_local") else v for s in model.engine.optimizer.state.values() for v in s.values() if v.dim() > 0]
    model.prepare_for_inference()  # offloads (model.rs.offload_adam_states is true in the shipped YAML)
    assert all(t.untyped_storage().size() == 0 for t in states)
    model.finish_inference()
    model.prepare_for_training()
    assert all(t.untyped_storage().size() > 0 for t in states)


def test_spin_reference_survives_sharded_state_dict_and_on_load_checkpoint(llama_dir: str, tmp_path) -> None:
    sft = write_sft(str(tmp_path / "sft.jsonl"), 4)
    model = _load(MegatronGPTSPINModel, _cfg("gpt_spin", llama_dir, f"model.data.train_ds.file_path={sft}"))
    model.set_KL_penalty_by_iteration(1)
    prompts = [torch.tensor([1, 5, 9]), torch.tensor([1, 7])]
    pairs = model.pair_batch(prompts, [torch.tensor([11, 2]), torch.tensor([12, 13, 2])], model.generate_rejected(prompts))
    reference_before = model.get_ref_policy_logprobs(pairs)
    saved = model.sharded_state_dict()
    model.setup_optimizer(max_steps=1)
    loss, metrics = model.get_loss_and_metrics(pairs, forward_only=False)
    assert {"loss", "acc", "rewards_actual_mean", "rewards_generated_mean", "rewards_all_mean", "rewards_all_std"} <= metrics.keys()
    model.optimizer_step(1.0)
    model.update_reference_policy()  # the reference moves to the trained weights
    assert not torch.equal(model.get_ref_policy_logprobs(pairs), reference_before)
    model.on_load_checkpoint(saved)
    torch.testing.assert_close(model.get_ref_policy_logprobs(pairs), reference_before, atol=0, rtol=0)
    sft_loss, sft_metrics = model.get_loss_and_metrics_vanilla_sft(right_padded_batch(4, 10, 48, seed=3))
    assert sft_loss == sft_metrics["loss"] > 0


def test_the_nemo_aligner_style_example_script_runs(tmp_path) -> None:
    log_dir = tmp_path / "custom"
    proc = subprocess.run([sys.executable, "examples/nlp/gpt/custom_dpo_script.py", "trainer.dpo.max_steps=2",
                           f"exp_manager.explicit_log_dir={log_dir}", "trainer.precision=fp32"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation loss" in proc.stdout + proc.stderr
    assert len(read_metrics(str(log_dir / "metrics.jsonl"), "train")) == 2
