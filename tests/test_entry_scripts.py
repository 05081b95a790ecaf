"""Entry scripts launched as a user launches them: under torchrun a config error is one line from
rank 0, and the embedded default runs from outside the repository."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import REPO, torchrun_command


def test_under_torchrun_a_config_error_is_one_line_from_rank_0(tmp_path) -> None:
    log_dir = tmp_path / "logs"
    proc = subprocess.run(torchrun_command(2, "examples/nlp/gpt/train_gpt_dpo.py", "trainer.devices=2", "model.optim.lr=-1",
                                           f"exp_manager.explicit_log_dir={log_dir}"),
                          cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if "model.optim.lr=-1.0 is invalid" in line]
    assert ours == ["error: model.optim.lr=-1.0 is invalid: it must be > 0"], proc.stderr[-3000:]
    assert "Error executing job" not in proc.stderr and "ConfigError" not in proc.stderr  # no Hydra or library traceback
    assert not log_dir.exists()


def test_an_entry_script_runs_from_outside_the_repository(tmp_path) -> None:
    """The shipped YAML's ${repo:...} paths and the examples.tiny task_eval target resolve from any directory."""
    script = os.path.join(REPO, "examples", "nlp", "gpt", "train_gpt_rs_actor.py")
    proc = subprocess.run([sys.executable, script, "trainer.rs.max_steps=1", "trainer.precision=fp32", "task_eval.limit=8"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out task_accuracy after 1 rejection sampling steps" in proc.stdout + proc.stderr
    assert (tmp_path / "results" / "rs" / "metrics.jsonl").is_file()


def test_spin_runs_on_the_megatron_engine_from_its_entry_script(tmp_path) -> None:
    """model.engine=megatron through the whole user path: config, rollouts, training, checkpoint, HF export."""
    script = os.path.join(REPO, "examples", "nlp", "gpt", "train_gpt_spin.py")
    proc = subprocess.run([sys.executable, script, "model.engine=megatron", "trainer.spin.max_steps=2",
                           "trainer.spin.save_interval=2", "trainer.precision=fp32", "task_eval.limit=8",
                           f"exp_manager.explicit_log_dir={tmp_path / 'run'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "megatron-core" in proc.stdout + proc.stderr  # the engine line of the log
    assert (tmp_path / "run" / "checkpoints" / "step_2").is_dir()
    assert (tmp_path / "run" / "hf_model" / "config.json").is_file()


def test_dpo_with_lora_from_its_entry_script_and_the_export_script_converts_its_checkpoint(tmp_path) -> None:
    """model.peft.peft_scheme=lora with the adapter-disabled reference: a small adapter-only checkpoint, and
    export_to_hf.py turns it into the same merged model and peft adapter directory the run exported."""
    gpt = os.path.join(REPO, "examples", "nlp", "gpt")
    lora = ["model.peft.peft_scheme=lora", "trainer.precision=fp32"]
    run = subprocess.run([sys.executable, os.path.join(gpt, "train_gpt_dpo.py"), *lora,
                          "model.dpo.reference.strategy=adapters_disabled", "trainer.dpo.max_steps=2",
                          "trainer.dpo.save_interval=2", "task_eval.limit=8", f"exp_manager.explicit_log_dir={tmp_path / 'run'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "reference policy: adapters_disabled" in run.stdout + run.stderr
    checkpoint = tmp_path / "run" / "checkpoints" / "step_2"
    assert sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file()) < 4 * 2**20  # the adapters and their Adam state
    export = subprocess.run([sys.executable, os.path.join(gpt, "export_to_hf.py"), *lora, f"checkpoint_path={checkpoint}",
                             f"output_path={tmp_path / 'export'}"],
                            cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert export.returncode == 0, export.stderr[-3000:]
    for name in ("model.safetensors", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (tmp_path / "export" / name).read_bytes() == (tmp_path / "run" / "hf_model" / name).read_bytes(), name
