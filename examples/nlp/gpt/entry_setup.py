"""Set-up shared by the entry scripts beside this file. Importing it

- puts the repository root on sys.path, so the embedded example's `examples.tiny...` targets
  (task_eval, reward functions) import whatever the working directory;
- registers the `${repo:<path>}` resolver, a path relative to the repository root, which the
  shipped YAMLs use for the embedded model and data, so the defaults work from any directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[3]

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
OmegaConf.register_new_resolver("repo", lambda path: str(REPO_ROOT / path), replace=True)
