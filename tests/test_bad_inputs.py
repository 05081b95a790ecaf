"""Every entry script, started with a wrong config value or a bad data file, stops at start-up with
exit code 1 and one message naming the key or file:line, and writes nothing (tests/entry_checks.py
runs them all in one process; tests/test_entry_scripts.py launches them for real)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO

DPO, SPIN, RS = "train_gpt_dpo", "train_gpt_spin", "train_gpt_rs_actor"
EXPORT, SERVE = "export_to_hf", "serve_reward_model"


def _bad_files(work: str) -> dict[str, str]:
    files = {
        "pairs": '{"prompt": "1+1=", "chosen_response": "2", "rejected_response": "3"}\n'
                 '{"prompt": "1+2=", "chosen_response": 3, "rejected_response": "4"}\nnot json\n',
        "sft": '{"input": "1+1=", "output": "2"}\n{"input": "1+2="}\n',
        "prompts": '{"text": "1+1="}\n{"text": 5}\n',
    }
    paths = {}
    for name, text in files.items():
        paths[name] = os.path.join(work, f"bad_{name}.jsonl")
        with open(paths[name], "w") as f:
            f.write(text)
    paths["missing"] = os.path.join(work, "missing.jsonl")
    return paths


def _cases(work: str) -> list[dict]:
    bad = _bad_files(work)
    train = [  # (script, overrides, what the message must contain)
        (DPO, ["model.optim.lr=-1"], "model.optim.lr=-1.0 is invalid: it must be > 0"),
        (DPO, ["+model.optim.lrr=1"], "unknown config key 'model.optim.lrr'"),
        (DPO, ["trainer.precision=fp16"], "'trainer.precision'"),
        (DPO, ["model.dpo.preference_loss=kto"], "model.dpo.preference_loss='kto' is invalid: it must be one of"),
        (DPO, ["model.engine=jax"], "model.engine='jax' is invalid: it must be one of"),
        (DPO, ["model.global_batch_size=20"], "model.global_batch_size=20 must be a multiple of model.micro_batch_size"),
        (DPO, ["model.tensor_model_parallel_size=3"], "model.tensor_model_parallel_size (3) x "),
        (DPO, ["model.tensor_model_parallel_size=2", "trainer.devices=2"], "trainer.devices (2) x trainer.num_nodes (1) = 2, but 1"),
        (DPO, ["model.pipeline_model_parallel_size=2", "trainer.devices=2", "model.global_batch_size=16"],
         "model.pipeline_model_parallel_size=2 is not supported"),
        (DPO, ["trainer.devices=2"], "trainer.devices (2) x trainer.num_nodes (1) = 2, but 1 processes"),
        (DPO, ["model.attn_implementation=bogus"], "model.attn_implementation='bogus'"),
        (DPO, [f"pretrained_checkpoint.restore_from_path={work}/no_model"], f"model directory '{work}/no_model' does not exist"),
        (DPO, [f"model.data.data_prefix.train={bad['pairs']}"], f"{bad['pairs']}:2: field 'chosen_response'"),
        (DPO, [f"model.data.data_prefix.validation={bad['missing']}"], bad["missing"]),
        (DPO, ["model.encoder_seq_length=4", "model.data.length_policy=drop"], "are longer than max_seq_length=4"),
        (DPO, ["exp_manager.checkpoint_callback_params.monitor=val_bogus"], "monitor='val_bogus' is invalid"),
        (DPO, ["trainer.dpo.val_check_interval=1.5"], "trainer.dpo.val_check_interval=1.5 is invalid"),
        (DPO, ["model.engine=megatron", "trainer.precision=fp32", "exp_manager.checkpoint_callback_params.model_save_format=safetensors"],
         "model_save_format='safetensors' is invalid: it must be one of ['torch_dist'] with this model.engine"),
        (DPO, ["model.dpo.preference_loss=simpo", "model.dpo.reference.strategy=swap"], "simpo is reference-free"),
        (DPO, ["model.peft.peft_scheme=lora", "model.peft.lora_tuning.target_modules=[qkv]"],
         "model.peft.lora_tuning.target_modules=['qkv']"),
        (SPIN, ["model.peft.peft_scheme=lora", "model.spin.reference.strategy=adapters_disabled"], "model.spin.reference.strategy"),
        (DPO, ["task_eval._target_=examples.tiny.nope.Accuracy"], "task_eval: Error locating target 'examples.tiny.nope"),
        (SPIN, ["model.spin.ref_policy_kl_penalty=[0.1]"], "ref_policy_kl_penalty has 1 values but trainer.spin.max_iterations=4"),
        (SPIN, ["model.spin.sampling_params.top_p=0"], "sampling_params.top_p=0.0 is invalid"),
        (SPIN, [f"model.data.train_ds.file_path={bad['sft']}"], f"{bad['sft']}:2: field 'output'"),
        (SPIN, ["trainer.spin.save_interval=0"], "trainer.spin.save_interval=0 is invalid"),
        (RS, ["model.rs.top_n_rollouts=17"], "model.rs.top_n_rollouts=17 is invalid"),
        (RS, ["model.rs.num_rollout_samples=8"], "kept sequences per step must be a multiple of model.global_batch_size"),
        (RS, [f"model.data.data_prefix.train={bad['prompts']}"], f"{bad['prompts']}:2: field 'text'"),
        (RS, ["reward.function._target_=examples.tiny.task.nope"], "reward.function: Error locating target"),
        (RS, ["reward.source=remote", "remote_rm.reward_model.ip=127.0.0.1", "remote_rm.reward_model.port=9",
              "remote_rm.timeout_s=0.5"], "reward server http://127.0.0.1:9 was not healthy within 0.5s"),
    ]
    cases = []
    for index, (script, overrides, expect) in enumerate(train):
        log_dir = os.path.join(work, "logs", str(index))
        quiet = [] if any(o.startswith("task_eval") for o in overrides) else ["task_eval=null"]  # no held-out eval
        cases.append({"script": script, "overrides": [*overrides, *quiet, f"exp_manager.explicit_log_dir={log_dir}"],
                      "expect": expect, "must_not_exist": log_dir})
    export = os.path.join(work, "export")
    for overrides, expect in [([f"checkpoint_path={work}/no_checkpoints"], f"checkpoint_path '{work}/no_checkpoints' is neither"),
                              ([f"pretrained_checkpoint.restore_from_path={work}/nope"], f"model directory '{work}/nope'")]:
        cases.append({"script": EXPORT, "overrides": [*overrides, f"output_path={export}"], "expect": expect,
                      "must_not_exist": export})
    for overrides, expect in [(["port=0"], "port=0 is invalid"),
                              (["reward_model.mode=sequence_classification"], "reward_model.model_path=None is invalid")]:
        cases.append({"script": SERVE, "overrides": overrides, "expect": expect, "must_not_exist": os.path.join(work, "none")})
    return cases


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    work = str(tmp_path_factory.mktemp("bad_inputs"))
    cases_file, out = os.path.join(work, "cases.json"), os.path.join(work, "results.json")
    with open(cases_file, "w") as f:
        json.dump(_cases(work), f)
    proc = subprocess.run([sys.executable, "tests/entry_checks.py", "--workdir", work, "--cases", cases_file, "--out", out],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


@pytest.mark.parametrize("script", [DPO, SPIN, RS, EXPORT, SERVE])
def test_bad_inputs_stop_with_one_message_naming_the_key_or_line_and_write_nothing(results: list[dict], script: str) -> None:
    cases = [r for r in results if r["script"] == script]
    assert cases
    for case in cases:
        where = f"{script} {case['overrides'][:-1]}: {case['stderr'] or case['exit_code']}"
        assert case["exit_code"] == 1, where
        errors = [line for line in case["stderr"].splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and case["expect"] in case["stderr"], where
        assert "Traceback" not in case["stderr"], where
        assert not case["written"], where
