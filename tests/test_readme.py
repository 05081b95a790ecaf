"""The README's "Using the library" program runs as written (in a scratch directory that sees the
repository's examples/, so its results/ folder lands there)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from helpers import REPO


def _library_program() -> str:
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("## Using the library"):]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_readme_library_program_runs_as_written(tmp_path) -> None:
    (tmp_path / "readme_example.py").write_text(_library_program())
    os.symlink(os.path.join(REPO, "examples"), tmp_path / "examples")
    proc = subprocess.run([sys.executable, "readme_example.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"loss \d+\.\d+, grad norm \d+\.\d+, answers \[", proc.stdout), proc.stdout
    assert (tmp_path / "results" / "readme_example" / "hf" / "config.json").is_file()
