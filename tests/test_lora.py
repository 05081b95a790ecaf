"""LoRA through peft (model.peft.peft_scheme=lora) on the torch_native engine, one process: the adapter-free
network is the base model exactly; only adapters get gradients and change; the merged export is
base + (alpha / r)·B·A and loads in transformers; the adapter directory loads with peft and gives the same
logits; a checkpoint holds the adapters only and resumes exactly; the DPO reference with the adapters
disabled gives the full model's first step. (DP=2 and TP=2 against one process: tests/test_layouts.py.)"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import FP32, model_cfg, pretrained, right_padded_batch, write_pairs
from nemo_aligner.config.dpo import DataPrefix, DPOLossConfig, DPOModelConfig, PreferenceDataConfig
from nemo_aligner.config.schema import (LoraTuningConfig, PeftConfig, Precision, ReferenceConfig, ReferenceStrategy,
                                        TrainerConfig)
from nemo_aligner.config.spin import SPINConfig
from nemo_aligner.engines.torch_native.engine import ADAPTER_DIR
from nemo_aligner.losses.sft import sft_loss_fn
from nemo_aligner.models.nlp.gpt.gpt_dpo_model import GPTDPOModel
from nemo_aligner.models.nlp.gpt.gpt_model import GPTModel

R, ALPHA = 4, 8.0


def lora(targets: list[str] | None = None, dropout: float = 0.0) -> PeftConfig:
    tuning = LoraTuningConfig(target_modules=targets or ["all-linear"], adapter_dim=R, alpha=ALPHA, adapter_dropout=dropout)
    return PeftConfig(peft_scheme="lora", lora_tuning=tuning)


def lora_model(model_dir: str, trainer: TrainerConfig = FP32, **peft: object) -> GPTModel:
    model = GPTModel(model_cfg(peft=lora(**peft)), pretrained(model_dir), trainer)  # type: ignore[arg-type]
    model.setup_optimizer(max_steps=8)
    return model


def train(model: GPTModel, steps: int, seed: int = 0) -> list[float]:
    losses = []
    for step in range(steps):
        batch = right_padded_batch(4, 8, 48, seed=seed + step)
        metrics = model.forward_backward(batch, functools.partial(sft_loss_fn, global_num_tokens=batch["loss_mask"][:, 1:].sum()))
        model.optimizer_step(1.0)
        losses.append(float(metrics["loss"]))
    return losses


def probe(model: GPTModel) -> torch.Tensor:
    return model.engine.logprobs([right_padded_batch(4, 8, 48, seed=99)])


def adapters(model: GPTModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.engine.module.named_parameters() if ".lora_" in n}


def test_adapter_free_network_is_the_base_model_and_only_adapters_train(llama_dir: str) -> None:
    base = GPTModel(model_cfg(), pretrained(llama_dir), FP32)
    model = lora_model(llama_dir)
    module = model.engine.module
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if ".lora_" not in n}
    assert frozen and all(not module.get_parameter(n).requires_grad for n in frozen)
    assert torch.equal(probe(model), probe(base))  # B = 0: training starts from the base model
    batch = right_padded_batch(4, 8, 48, seed=0)
    model.forward_backward(batch, functools.partial(sft_loss_fn, global_num_tokens=batch["loss_mask"][:, 1:].sum()))
    grads = model.engine.replicated.gradients()
    assert set(grads) == {n for n, _ in module.named_parameters() if ".lora_" in n}
    assert all(grads[n].abs().sum() > 0 for n in grads if ".lora_B." in n)  # A's gradient is B^T·… = 0 at first
    model.optimizer_step(1.0)
    train(model, 2, seed=1)
    assert all(torch.equal(frozen[n], module.get_parameter(n)) for n in frozen)
    trained = probe(model)
    assert not torch.allclose(trained, probe(base))
    with model.engine.adapters_disabled():
        assert torch.equal(probe(model), probe(base))
        assert set(model.engine.allocate_weights("host")) == set(grads)  # what trains does not change inside
    assert torch.equal(probe(model), trained)  # enabled again


def test_merged_export_is_base_plus_scaled_BA_and_the_adapter_directory_loads_with_peft(llama_dir: str, tmp_path) -> None:
    model = lora_model(llama_dir)
    train(model, 3)
    out = str(tmp_path / "hf")
    model.export_hf(out)
    base, merged = load_file(os.path.join(llama_dir, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    weights = adapters(model)
    assert set(merged) == set(base)
    for name, path in ((n, n.removesuffix(".lora_A.default.weight")) for n in weights if ".lora_A." in n):
        a, b = weights[name], weights[f"{path}.lora_B.default.weight"]
        hf = path.replace(".base_layer", "") + ".weight"
        torch.testing.assert_close(merged[hf], base[hf] + (ALPHA / R) * b @ a, atol=1e-6, rtol=0)
    untouched = [n for n in base if "norm" in n or "embed" in n]
    assert untouched and all(torch.equal(merged[n], base[n]) for n in untouched)
    probe_batch = right_padded_batch(4, 8, 48, seed=99)
    ids = probe_batch["input_ids"]
    hf_merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32),
                                           os.path.join(out, ADAPTER_DIR))
    with torch.no_grad():
        expected = hf_merged(ids, attention_mask=probe_batch["attention_mask"]).logits
        torch.testing.assert_close(peft_model(ids, attention_mask=probe_batch["attention_mask"]).logits, expected,
                                   atol=1e-5, rtol=0)
    scored = probe_batch["loss_mask"][:, 1:].bool()  # our policy's log-probs of the same tokens, where it scores
    logprobs = torch.log_softmax(expected[:, :-1].double(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(probe(model).double()[scored], logprobs[scored], atol=1e-5, rtol=0)


def test_checkpoint_holds_the_adapters_only_and_resumes_exactly(llama_dir: str, tmp_path) -> None:
    model = lora_model(llama_dir)
    train(model, 2)
    path = str(tmp_path / "ckpt")
    model.save(path)
    state = model.state_dict()
    expected = train(model, 2, seed=2)
    saved = torch.distributed.checkpoint.FileSystemReader(path).read_metadata().state_dict_metadata
    weights = {k.removeprefix("model.") for k in saved if k.startswith("model.")}
    assert weights == set(adapters(model))
    resumed = lora_model(llama_dir)
    resumed.load(path)
    resumed.load_state_dict(state)
    assert train(resumed, 2, seed=2) == expected


def test_bf16_holds_the_frozen_base_in_bf16_and_fp32_masters_of_the_adapters_only(llama_dir: str) -> None:
    model = lora_model(llama_dir, TrainerConfig(devices=1, num_nodes=1, precision=Precision.bf16))
    params = dict(model.engine.module.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in params.values())
    masters = model.engine.replicated.masters
    assert {m.dtype for m in masters} == {torch.float32}
    assert sum(m.numel() for m in masters) == sum(p.numel() for n, p in params.items() if ".lora_" in n)
    train(model, 2)


def test_target_modules_by_nemo_or_hf_names_and_unknown_ones_refused(llama_dir: str) -> None:
    def targets(model: GPTModel) -> set[str]:
        return {n.split(".")[-4] for n, _ in model.engine.module.named_parameters() if ".lora_A." in n}

    assert targets(lora_model(llama_dir, targets=["attention_qkv"])) == {"q_proj", "k_proj", "v_proj"}
    assert targets(lora_model(llama_dir, targets=["o_proj", "mlp_fc2"])) == {"o_proj", "down_proj"}
    with pytest.raises(ValueError, match="target_modules=.*query_key_value.*linear layers: .*q_proj"):
        lora_model(llama_dir, targets=["query_key_value"])


def test_adapter_dropout_acts_in_training_only(llama_dir: str) -> None:
    model = lora_model(llama_dir, dropout=0.5)
    train(model, 1)  # B != 0 from here on, so dropout on the adapters' input changes the output
    assert torch.equal(probe(model), probe(model))  # no-grad log-probs: no dropout
    batch = right_padded_batch(4, 8, 48, seed=5)
    loss = functools.partial(sft_loss_fn, global_num_tokens=batch["loss_mask"][:, 1:].sum())
    losses = {float(model.forward_backward(batch, loss)["loss"]) for _ in range(2)}
    assert len(losses) == 2


def dpo_policy(model_dir: str, data: str, peft: PeftConfig, strategy: ReferenceStrategy) -> GPTDPOModel:
    cfg = DPOModelConfig(micro_batch_size=2, global_batch_size=4, seed=7, encoder_seq_length=32, peft=peft,
                         dpo=DPOLossConfig(reference=ReferenceConfig(strategy=strategy)),
                         data=PreferenceDataConfig(data_prefix=DataPrefix(train=data, validation=data)))
    policy = GPTDPOModel(cfg, pretrained(model_dir), FP32)
    policy.setup_optimizer(max_steps=2)
    return policy


def test_dpo_reference_with_adapters_disabled_gives_the_full_models_first_step(llama_dir: str, tmp_path) -> None:
    from helpers import loader_args
    from nemo_aligner.data.builders import build_preference_loader

    data = write_pairs(str(tmp_path / "pairs.jsonl"), 8)
    full = dpo_policy(llama_dir, data, PeftConfig(), ReferenceStrategy.swap)
    adapted = dpo_policy(llama_dir, data, lora(), ReferenceStrategy.adapters_disabled)
    assert adapted.reference.name == "adapters_disabled"
    batch = build_preference_loader(data, shuffle=False, micro_batch_size=2, **loader_args(full, full.cfg)).next_batch()[0]
    ours, theirs = adapted.loss_and_metrics(batch, forward_only=False), full.loss_and_metrics(batch, forward_only=False)
    assert ours.keys() == theirs.keys()
    for name in ours:  # policy = reference = the base model at the first step, in both
        torch.testing.assert_close(torch.tensor(ours[name]), torch.tensor(theirs[name]), atol=1e-6, rtol=0, msg=name)
    adapted.optimizer_step(1.0)
    full.optimizer_step(1.0)
    assert not torch.allclose(adapted.sequence_logps(batch), full.reference_logps(batch))  # the policy moved ...
    torch.testing.assert_close(adapted.reference_logps(batch), full.reference_logps(batch), atol=1e-6, rtol=0)  # not its reference


def test_configurations_lora_cannot_serve_are_refused(llama_dir: str) -> None:
    with pytest.raises(ValueError, match="model.spin.reference.strategy"):
        SPINConfig(reference=ReferenceConfig(strategy=ReferenceStrategy.adapters_disabled))
    with pytest.raises(ValueError, match="needs LoRA adapters"):
        from nemo_aligner.reference.adapters_disabled import AdaptersDisabledReference
        AdaptersDisabledReference(GPTModel(model_cfg(), pretrained(llama_dir), FP32).engine)
    with pytest.raises(ValueError, match="model.peft.peft_scheme"):
        PeftConfig(peft_scheme="qlora")
    with pytest.raises(ValueError, match="model.peft.lora_tuning.adapter_dim"):
        LoraTuningConfig(adapter_dim=0)
