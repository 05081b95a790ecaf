"""The Slurm batch script builds the right torchrun command (srun and scontrol stubbed)."""

from __future__ import annotations

import os
import subprocess

import pytest

from helpers import REPO

SCRIPT = os.path.join(REPO, "examples", "slurm", "nemo_aligner.sbatch")


def _launch(tmp_path, **env: str) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\necho "srun $*"\n')
    # many nodes: a reader that stops after the first line would make the stub die of SIGPIPE
    (bin_dir / "scontrol").write_text('#!/bin/bash\necho node-a; for i in $(seq 1 20000); do echo node-$i; done\n')
    for stub in ("srun", "scontrol"):
        (bin_dir / stub).chmod(0o755)
    variables = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NNODES": "2",
                 "SLURM_JOB_ID": "42", **env}
    proc = subprocess.run(["bash", SCRIPT, "model.dpo.preference_loss=ipo"], cwd=REPO, env=variables,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("gpus, expected", [("8", "8"), ("h100:4", "4")])
def test_torchrun_gets_the_gpu_count_and_the_checkout_on_the_path(tmp_path, gpus: str, expected: str) -> None:
    command = _launch(tmp_path, SLURM_GPUS_PER_NODE=gpus, CONTAINER="nvcr.io/my/image")
    assert f"--nproc_per_node {expected} " in command and f"trainer.devices={expected} " in command
    assert "--container-image nvcr.io/my/image" in command
    assert f"env PYTHONPATH={REPO} torchrun" in command  # the mounted checkout, not the image's copy
    assert "--rdzv_endpoint node-a:29500" in command and "trainer.num_nodes=2" in command
    assert command.rstrip().endswith("model.dpo.preference_loss=ipo")
