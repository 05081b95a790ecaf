"""The run's log directory: whether a run resumes there or starts fresh, and what it keeps of earlier runs.

Policy (no run ever overwrites, interleaves with or deletes another's files):
- Resume: with exp_manager.resume_if_exists and a complete checkpoint under `<log_dir>/checkpoints`,
  the run continues from it. The step-keyed logs (metrics.jsonl, rollouts.jsonl) drop the rows
  of steps after the checkpoint, which are about to be redone, and any line a crash cut short
  (reported); if the config changed, each changed key is logged and the old config is kept as
  `config.until_step_<N>.yaml`.
- Fresh start in a directory that holds an earlier run's files (a run killed before its first
  checkpoint, or resume_if_exists=false): those files are moved, untouched, into
  `<log_dir>/previous_runs/<k>/`. Files this library does not write are left where they are.
The decision is taken before anything is written, the same on every rank; rank 0 moves and writes.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping

from omegaconf import OmegaConf

from nemo_aligner.utils.checkpoint import checkpoint_step, latest_checkpoint
from nemo_aligner.utils.distributed import barrier, is_rank0, log_rank0

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
CHECKPOINTS = "checkpoints"
METRICS_FILE = "metrics.jsonl"
ROLLOUTS_FILE = "rollouts.jsonl"
STEP_LOGS = (METRICS_FILE, ROLLOUTS_FILE)  # JSONL files whose rows carry a "step"
RUN_FILES = (CONFIG_FILE, *STEP_LOGS, CHECKPOINTS, "tensorboard", "hf_model", "wandb")
PREVIOUS_RUNS = "previous_runs"
KEPT_CONFIG_PREFIX = "config.until_step_"  # the config a resumed run trained with up to that step


@dataclass(frozen=True)
class RunStart:
    """How a run begins in its log directory.

    Attributes:
        resume_from: the checkpoint the run continues from, or None for a fresh start.
        resume_step: that checkpoint's step (None for a fresh start).
    """

    resume_from: str | None
    resume_step: int | None


def start_run(log_dir: str, *, resume_if_exists: bool, config: Mapping[str, Any]) -> RunStart:
    """Apply the policy above to `log_dir` and write `config` as its config.yaml; collective."""
    checkpoint_dir = os.path.join(log_dir, CHECKPOINTS)
    resume_from = latest_checkpoint(checkpoint_dir) if resume_if_exists else None
    start = RunStart(resume_from, checkpoint_step(resume_from) if resume_from else None)
    barrier()  # every rank has read the directory before rank 0 changes it
    if is_rank0():
        os.makedirs(log_dir, exist_ok=True)
        if start.resume_step is None:
            _move_previous_run(log_dir, reason="exp_manager.resume_if_exists=false" if not resume_if_exists
                               else "it holds no complete checkpoint to resume from")
        else:
            for name in STEP_LOGS:
                truncate_step_log(os.path.join(log_dir, name), start.resume_step)
            _keep_changed_config(log_dir, config, start.resume_step)
        OmegaConf.save(OmegaConf.create(dict(config)), os.path.join(log_dir, CONFIG_FILE))
    barrier()
    return start


def truncate_step_log(path: str, step: int) -> None:
    """Keep the rows of `path` (JSONL, a "step" per row) up to `step`; drop the later ones and any
    line that is not valid JSON (a write cut short by a crash), saying how many."""
    if not os.path.isfile(path):
        return
    kept, later, torn = [], 0, []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                torn.append(number)
                continue
            if row["step"] <= step:
                kept.append(json.dumps(row) + "\n")
            else:
                later += 1
    if torn:
        logger.warning("%s: dropped %d line(s) that are not valid JSON (cut short by a crash?): line %s", path,
                       len(torn), ", ".join(map(str, torn[:10])))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
    log_rank0(logger, "%s: kept %d rows up to step %d, dropped %d of later steps (redone now)", path, len(kept), step,
              later)


def _move_previous_run(log_dir: str, *, reason: str) -> None:
    present = [name for name in RUN_FILES if os.path.lexists(os.path.join(log_dir, name))]
    present += sorted(name for name in os.listdir(log_dir) if name.startswith(KEPT_CONFIG_PREFIX))
    if not present:
        return
    archive_root = os.path.join(log_dir, PREVIOUS_RUNS)
    os.makedirs(archive_root, exist_ok=True)
    index = len(os.listdir(archive_root))
    while os.path.lexists(os.path.join(archive_root, str(index))):
        index += 1
    archive = os.path.join(archive_root, str(index))
    os.makedirs(archive)
    for name in present:
        os.replace(os.path.join(log_dir, name), os.path.join(archive, name))
    logger.warning("%s holds an earlier run and this one starts fresh (%s): the earlier run's files (%s) were moved "
                   "to %s", log_dir, reason, ", ".join(present), archive)


def _keep_changed_config(log_dir: str, config: Mapping[str, Any], step: int) -> None:
    path = os.path.join(log_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return
    previous = OmegaConf.to_container(OmegaConf.load(path))
    changes = _changed_keys(previous, dict(config))
    if not changes:
        return
    kept = os.path.join(log_dir, f"{KEPT_CONFIG_PREFIX}{step}.yaml")
    suffix = 1
    while os.path.exists(kept):
        kept, suffix = os.path.join(log_dir, f"{KEPT_CONFIG_PREFIX}{step}.{suffix}.yaml"), suffix + 1
    os.replace(path, kept)
    logger.warning("resuming at step %d with a changed config (the earlier one is kept as %s):\n%s", step, kept,
                   "\n".join(f"  {key}: {old!r} -> {new!r}" for key, old, new in changes))


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        changes = []
        for key in sorted({*old, *new}, key=str):
            changes += _changed_keys(old.get(key, "<absent>"), new.get(key, "<absent>"), f"{prefix}{key}.")
        return changes
    return [] if old == new else [(prefix.rstrip("."), old, new)]
