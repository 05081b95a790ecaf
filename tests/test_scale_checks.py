"""The scale-validation script (tests/distributed/scale_checks.py, run on 4-8 GPUs by scale_checks.sh) at the
world size CI has: its layouts and its resume across world sizes agree with one process."""

from __future__ import annotations

import json
import os

from helpers import make_model_dir, torchrun, write_pairs

SCRIPT = "tests/distributed/scale_checks.py"


def test_scale_checks_layouts_and_resume_match_one_process(tmp_path) -> None:
    work = str(tmp_path)
    make_model_dir(os.path.join(work, "llama"), "llama")
    write_pairs(os.path.join(work, "pairs.jsonl"), 96)
    torchrun(1, SCRIPT, "--phase", "reference", "--workdir", work)
    torchrun(2, SCRIPT, "--phase", "layouts", "--workdir", work)
    torchrun(1, SCRIPT, "--phase", "resume", "--saved-at", "2", "--workdir", work)
    out = torchrun(1, SCRIPT, "--phase", "compare", "--workdir", work)
    gaps = json.loads(next(line for line in out.splitlines() if line.startswith("{")))["fp32"]
    assert set(gaps) == {"torch_native_dp_world2", "torch_native_tp2_world2", "sft_world2", "sft_resumed_world2_at1"}
    assert all(value < 1e-5 for value in gaps.values()), gaps
