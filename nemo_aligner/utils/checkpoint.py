"""CheckpointManager: atomic, resumable training checkpoints with top-k rotation.

Layout of `<checkpoint_dir>/step_<N>/`:
  model/               sharded weights + optimizer state (the engine's DCP checkpoint)
  <name>/              further sharded state, e.g. SPIN's reference weights (`sharded_extras`)
  extra_state.pt       state dicts of the named Statefuls (scheduler, sampler, ...), rank 0
  rng/rank_<r>.pt      Python and torch RNG states of each rank
  trainer_state.json   step, epoch, consumed_samples, monitored metric; written last
and `<checkpoint_dir>/latest`, a one-line file naming the newest complete step directory.
Everything is written into `step_<N>.tmp/` and renamed only after every rank finished, and
`latest` is replaced atomically after that, so a crash mid-save leaves the previous checkpoint
as `latest`. With asynchronous saves the model's state is written in the background while training
goes on; the rename and `latest` wait for every rank's write (at the next save, or `wait()`), and at
most one save is in flight.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from concurrent.futures import Future
from typing import Any, Callable, Mapping, Protocol

import torch
import torch.distributed as dist

from nemo_aligner.utils.distributed import barrier, is_rank0, log_rank0

logger = logging.getLogger(__name__)

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ShardedSaveable(Protocol):
    """What the manager needs from the model: collective sharded save and load."""

    def save(self, path: str) -> None: ...

    def load(self, path: str) -> None: ...


class CheckpointableModel(Protocol):
    """A model whose state can also be written in the background or as HF safetensors, and exported
    (GPTModel)."""

    def save(self, path: str, *, asynchronous: bool = False, weights_format: str = "torch_dist") -> Future | None: ...

    def load(self, path: str) -> None: ...

    def export_hf(self, path: str) -> None: ...


class CheckpointManager:
    """Saves and restores model + optimizer + named Statefuls + RNG + trainer state."""

    def __init__(self, checkpoint_dir: str, *, save_top_k: int, monitor: str, mode: str,
                 asynchronous: bool = False, model_save_format: str = "torch_dist",
                 save_consolidated: bool = False) -> None:
        """`asynchronous`, `model_save_format` and `save_consolidated` need a CheckpointableModel."""
        if mode not in ("min", "max"):
            raise ValueError(f"mode={mode!r} must be 'min' or 'max'")
        self.checkpoint_dir = checkpoint_dir
        self.save_top_k = save_top_k
        self.monitor = monitor
        self.mode = mode
        self.asynchronous = asynchronous
        self.model_save_format = model_save_format
        self.save_consolidated = save_consolidated
        self._pending: tuple[Future, Callable[[], None]] | None = None  # a background write and its completion
        # asynchronous saves: ranks agree that every write finished over a group of their own (gloo, so
        # a host flag needs no device, and training's collectives never interleave with it)
        self._group = dist.new_group(backend="gloo") if asynchronous and dist.is_initialized() else None

    def save(self, step: int, model: ShardedSaveable | CheckpointableModel, statefuls: Mapping[str, Stateful],
             trainer_state: dict[str, Any], metric: float | None = None,
             sharded_extras: Mapping[str, ShardedSaveable] | None = None) -> str:
        """Write checkpoint `step_<step>` collectively; returns its path, which is `latest` once the save
        completed (at once, or for an asynchronous save at the next save or `wait()`)."""
        self.wait()  # at most one save in flight
        final = os.path.join(self.checkpoint_dir, f"step_{step}")
        tmp = final + ".tmp"
        if is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(os.path.join(tmp, "rng"))
        barrier()
        if self.asynchronous or self.model_save_format != "torch_dist":
            written = model.save(os.path.join(tmp, "model"), asynchronous=self.asynchronous,  # type: ignore[call-arg]
                                 weights_format=self.model_save_format)
        else:
            written = model.save(os.path.join(tmp, "model"))
        if self.save_consolidated:  # servable as is: what export_to_hf.py writes
            model.export_hf(os.path.join(tmp, "hf"))  # type: ignore[union-attr]
        for name, extra in (sharded_extras or {}).items():
            extra.save(os.path.join(tmp, name))
        torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{_rank()}.pt"))
        if is_rank0():
            torch.save({name: s.state_dict() for name, s in statefuls.items()}, os.path.join(tmp, "extra_state.pt"))
        state = {**trainer_state, "step": step, "monitor": self.monitor, "metric": metric}

        def complete() -> None:
            barrier()  # every rank's shards are on disk
            if is_rank0():
                with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
                    json.dump(state, f, indent=2)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                _write_atomically(os.path.join(self.checkpoint_dir, LATEST), os.path.basename(final))
                self._rotate(keep=os.path.basename(final))
            barrier()
            log_rank0(logger, "saved checkpoint %s", final)

        if written is None:
            complete()
        else:
            self._pending = (written, complete)
            log_rank0(logger, "writing checkpoint %s in the background", final)
        return final

    def poll(self) -> None:
        """Complete the save in flight if every rank's write has finished (collective; once per step)."""
        if self._pending is None:
            return
        done = torch.tensor([float(self._pending[0].done())])
        if self._group is not None:
            dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self._group)
        if done.item() == 1.0:
            self.wait()

    def wait(self) -> None:
        """Complete the save in flight, if any: wait for this rank's write, then move `latest` to it."""
        if self._pending is not None:
            written, complete = self._pending
            self._pending = None
            written.result()
            complete()

    def latest(self) -> str | None:
        """Path of the newest complete checkpoint, or None when there is none."""
        return latest_checkpoint(self.checkpoint_dir)

    def load(self, path: str, model: ShardedSaveable, statefuls: Mapping[str, Stateful],
             sharded_extras: Mapping[str, ShardedSaveable] | None = None) -> dict[str, Any]:
        """Restore everything `save` wrote into `model` and `statefuls`; returns the trainer state.

        Works across layouts (e.g. saved by 2 ranks, resumed by 1): weights are resharded; a rank
        with no RNG file of its own takes rank 0's.
        """
        with open(os.path.join(path, TRAINER_STATE)) as f:
            trainer_state = json.load(f)
        model.load(os.path.join(path, "model"))
        for name, sharded in (sharded_extras or {}).items():
            sharded.load(os.path.join(path, name))
        extra = torch.load(os.path.join(path, "extra_state.pt"), weights_only=False)
        missing = set(statefuls) - set(extra)
        if missing:
            raise KeyError(f"checkpoint {path} has no state for {sorted(missing)}")
        for name, stateful in statefuls.items():
            stateful.load_state_dict(extra[name])
        rng_file = os.path.join(path, "rng", f"rank_{_rank()}.pt")
        if not os.path.isfile(rng_file):
            rng_file = os.path.join(path, "rng", "rank_0.pt")
        _set_rng_state(torch.load(rng_file, weights_only=False))
        log_rank0(logger, "resumed from %s (step %d, consumed_samples %s)", path, trainer_state["step"],
                  trainer_state.get("consumed_samples"))
        return trainer_state

    def _rotate(self, keep: str) -> None:
        """Keep the `save_top_k` best by the monitored metric, plus `keep` (the newest)."""
        complete = []
        for name in os.listdir(self.checkpoint_dir):
            state_file = os.path.join(self.checkpoint_dir, name, TRAINER_STATE)
            if name.startswith("step_") and os.path.isfile(state_file):
                with open(state_file) as f:
                    state = json.load(f)
                complete.append((name, state["step"], state.get("metric")))
        sign = 1.0 if self.mode == "min" else -1.0

        def rank(item: tuple[str, int, float | None]) -> tuple[float, int]:
            metric = item[2]
            score = sign * metric if metric is not None and math.isfinite(metric) else math.inf
            return score, -item[1]  # ties and unmeasured checkpoints: newer first

        kept = {name for name, _, _ in sorted(complete, key=rank)[: self.save_top_k]} | {keep}
        for name, _, _ in complete:
            if name not in kept:
                shutil.rmtree(os.path.join(self.checkpoint_dir, name))
                logger.info("removed checkpoint %s (outside top %d by %s)", name, self.save_top_k, self.monitor)


def latest_checkpoint(checkpoint_dir: str) -> str | None:
    """The complete checkpoint `<checkpoint_dir>/latest` names, or None when there is no pointer."""
    pointer = os.path.join(checkpoint_dir, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(checkpoint_dir, f.read().strip())
    if not os.path.isfile(os.path.join(path, TRAINER_STATE)):
        raise FileNotFoundError(f"{pointer} names {path}, which is not a complete checkpoint (no {TRAINER_STATE})")
    return path


def checkpoint_step(path: str) -> int:
    """The step a complete checkpoint was saved at."""
    with open(os.path.join(path, TRAINER_STATE)) as f:
        return int(json.load(f)["step"])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _write_atomically(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
