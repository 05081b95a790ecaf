"""The one fit loop every algorithm shares: step accounting, validation and save intervals,
resume, metric logging, progress display and the final HF export.

An algorithm subclasses BaseTrainer and supplies `train_step(batch)` and
`validation_step(batch)`, each returning metrics already reduced over ranks.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Optional

from tqdm import tqdm

from nemo_aligner.config.loader import load_config
from nemo_aligner.config.schema import ExpManagerConfig, LoopConfig, resolve_count
from nemo_aligner.data.loader import StepDataLoader
from nemo_aligner.models.nlp.gpt.gpt_model import GPTModel
from nemo_aligner.types import require
from nemo_aligner.utils.checkpoint import CheckpointManager, ShardedSaveable, Stateful
from nemo_aligner.utils.distributed import is_rank0, log_rank0
from nemo_aligner.utils.log_dir import CHECKPOINTS, start_run
from nemo_aligner.utils.metrics import MetricsLogger

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A step produced a NaN/inf loss or gradient; the run stops and nothing is saved from it."""


@dataclass
class TrainerState:
    """What the loop itself must remember across a resume."""

    step: int = 0
    best_metric: Optional[float] = None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.best_metric = state["best_metric"]


class BaseTrainer:
    """Runs `train_step` until max_steps, with validation, checkpoints and logging around it."""

    algorithm = "base"
    loop_config: type[LoopConfig] = LoopConfig  # the schema of `cfg` (each algorithm's own section)

    def __init__(self, *, cfg: LoopConfig | Mapping[str, Any], model: GPTModel, train_dataloader: StepDataLoader,
                 val_dataloader: StepDataLoader | None, exp_manager: ExpManagerConfig | Mapping[str, Any] | None = None,
                 log_every_n_steps: int = 10, config: Mapping[str, Any] | None = None,
                 test_dataloader: StepDataLoader | None = None, collate_fn: Callable[[list[Any]], Any] | None = None,
                 optimizer: None = None, scheduler: None = None, logger: None = None, ckpt_callback: None = None,
                 run_timer: None = None, epoch_callback: Callable[[int, GPTModel], Any] | None = None) -> None:
        """The keyword names are NeMo-Aligner's (`DPOTrainer(cfg=cfg.trainer.dpo, model=..., ...)`).

        Args:
            cfg: this algorithm's loop section (trainer.dpo / .spin / .rs): its schema or a mapping.
            model: the policy.
            train_dataloader, val_dataloader, test_dataloader: loaders from nemo_aligner.data.builders
                (test_dataloader is kept, not used, as in NeMo-Aligner).
            exp_manager: where logs and checkpoints go (the exp_manager section; default: its schema's
                defaults); it does what NeMo's logger and checkpoint callback do.
            log_every_n_steps: a metric line in the log every N steps.
            config: the job's whole config, written as <log_dir>/config.yaml (and to W&B).
            collate_fn: turns a batch's examples into the model's batch, replacing the loaders' own.
            optimizer, scheduler, logger, ckpt_callback, run_timer: NeMo-Aligner's Lightning-era
                objects; here the engine builds the optimizer and schedule, exp_manager drives logging
                and checkpoints, and max_steps bounds a run, so each must be None.
            epoch_callback: called as (epoch, model) when a training epoch ends, e.g. to report a task
                metric per epoch (the entry scripts' held-out accuracy).
        """
        _check_none(optimizer=optimizer, scheduler=scheduler, logger=logger, ckpt_callback=ckpt_callback,
                    run_timer=run_timer)
        loop = cfg if isinstance(cfg, self.loop_config) else load_config(self.loop_config, cfg)
        exp = exp_manager if isinstance(exp_manager, ExpManagerConfig) else load_config(ExpManagerConfig, exp_manager or {})
        if collate_fn is not None:
            for loader in (train_dataloader, val_dataloader, test_dataloader):
                if loader is not None:
                    loader.collate = collate_fn
        self.model, self.train_dataloader, self.val_dataloader = model, train_dataloader, val_dataloader
        self.test_dataloader = test_dataloader
        self.epoch_callback = epoch_callback
        self.cfg, self.exp_manager, self.log_every_n_steps = loop, exp, log_every_n_steps
        self.state = TrainerState()
        per_epoch = train_dataloader.sampler.batches_per_epoch
        epochs_steps = loop.max_epochs * per_epoch
        self.max_steps = epochs_steps if loop.max_steps == -1 else min(loop.max_steps, epochs_steps)
        self.val_interval = resolve_count(loop.val_check_interval, per_epoch)
        self.val_batches = 0 if val_dataloader is None else resolve_count(loop.limit_val_batches,
                                                                          val_dataloader.sampler.batches_per_epoch)
        self.log_dir = exp.explicit_log_dir
        ckpt = exp.checkpoint_callback_params
        formats = model.checkpoint_formats
        require(ckpt.model_save_format in formats, "exp_manager.checkpoint_callback_params.model_save_format",
                ckpt.model_save_format, f"one of {list(formats)} with this model.engine")
        self.checkpoints = CheckpointManager(os.path.join(self.log_dir, CHECKPOINTS), save_top_k=ckpt.save_top_k,
                                             monitor=ckpt.monitor, mode=ckpt.mode, asynchronous=ckpt.async_save,
                                             model_save_format=ckpt.model_save_format,
                                             save_consolidated=ckpt.save_consolidated)
        # The first write to the log directory: everything above (and the caller's data) is validated.
        config = dict(config or {})
        self.start = start_run(self.log_dir, resume_if_exists=exp.resume_if_exists, config=config)
        self.metrics = MetricsLogger(self.log_dir, tensorboard=exp.create_tensorboard_logger, wandb=exp.create_wandb_logger,
                                     wandb_kwargs=asdict(exp.wandb_logger_kwargs), config=config)
        self.last_val: dict[str, float] = {}

    # --------------------------------------------------------------- to supply
    def train_step(self, batch: Any) -> dict[str, float]:
        """One step on this rank's share of a global batch; metrics reduced over ranks, including
        `num_tokens` (all tokens the step's forward/backward passes processed, over all ranks)."""
        raise NotImplementedError

    def validation_step(self, batch: Any) -> dict[str, float]:
        raise NotImplementedError

    def optimizer_steps(self) -> int:
        """Optimizer steps of the whole run, the LR schedule's horizon: one per train step unless an
        algorithm's step takes several (rejection sampling)."""
        return self.max_steps

    def statefuls(self) -> dict[str, Stateful]:
        """Small state a checkpoint restores (rank 0's copy); algorithms may add entries."""
        return {"policy": self.model, "train_data": self.train_dataloader, "trainer": self.state}

    def sharded_statefuls(self) -> dict[str, ShardedSaveable]:
        """Sharded state beyond the policy's weights and optimizer (SPIN: its reference weights)."""
        return {}

    def before_fit(self) -> None:
        """Hook run when fit() starts, before a resume loads a checkpoint (DPO: precompute the reference)."""

    def before_train_step(self) -> None:
        """Hook run before each step (SPIN: pick this iteration's beta)."""

    def after_train_step(self) -> None:
        """Hook run after each step's bookkeeping, before validation and saving (SPIN: iteration end)."""

    # -------------------------------------------------------------------- loop
    def fit(self) -> dict[str, float]:
        """Train to max_steps (resuming first if a checkpoint exists); returns the last val metrics."""
        self.before_fit()
        self.model.setup_optimizer(max_steps=self.optimizer_steps())
        if self.start.resume_from is not None:
            self.checkpoints.load(self.start.resume_from, self.model, self.statefuls(), self.sharded_statefuls())
        log_rank0(logger, "%s: %d steps (%d per epoch), validation every %d steps on %d batches, resuming at step %d",
                  self.algorithm, self.max_steps, self.train_dataloader.sampler.batches_per_epoch, self.val_interval,
                  self.val_batches, self.state.step)
        bar = tqdm(total=self.max_steps, initial=self.state.step, desc=self.algorithm, unit="step",
                   disable=not is_rank0(), dynamic_ncols=True)
        while self.state.step < self.max_steps:
            self.before_train_step()
            metrics = self._run_train_step()
            self.after_train_step()
            self.checkpoints.poll()  # an asynchronous save that finished becomes `latest`
            per_epoch = self.train_dataloader.sampler.batches_per_epoch
            if self.epoch_callback is not None and self.state.step % per_epoch == 0:
                self.epoch_callback(self.state.step // per_epoch - 1, self.model)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_sec']:.0f}")
            step = self.state.step
            if step % self.log_every_n_steps == 0:
                log_rank0(logger, "step %d: %s", step, _fmt(metrics))
            if step % self.val_interval == 0 or step == self.max_steps:
                self.run_validation()
            if step % self.cfg.save_interval == 0 or step == self.max_steps:
                self.save()
        bar.close()
        self.checkpoints.wait()  # the last checkpoint is complete (and `latest`) before the run ends
        if self.exp_manager.checkpoint_callback_params.save_nemo_on_train_end:
            self.model.export_hf(os.path.join(self.log_dir, "hf_model"))
            log_rank0(logger, "exported the trained policy to %s", os.path.join(self.log_dir, "hf_model"))
        self.metrics.close()
        return self.last_val

    def _run_train_step(self) -> dict[str, float]:
        batch, indices = self.train_dataloader.next_batch()
        start = time.perf_counter()
        try:
            metrics = self.train_step(batch)
        except FloatingPointError as err:
            self.checkpoints.wait()  # a save in flight holds an earlier, finite state: complete it (every rank is here)
            raise NonFiniteLossError(
                f"{self.algorithm} step {self.state.step + 1} (epoch {self.train_dataloader.sampler.epoch}, this rank's "
                f"dataset indices {indices}): {err}; stopping without saving"
            ) from err
        elapsed = time.perf_counter() - start
        self.state.step += 1
        sampler = self.train_dataloader.sampler
        metrics.update(step_time=elapsed, tokens_per_sec=metrics.pop("num_tokens") / elapsed,
                       consumed_samples=sampler.consumed_samples, epoch=sampler.epoch)
        if "generation_time" in metrics:  # SPIN, RS: the rollout phase's share of the step
            metrics["rollout_share"] = metrics["generation_time"] / elapsed
        if sampler.token_imbalance is not None:  # packing over several data-parallel ranks
            metrics["dp_token_imbalance"] = sampler.token_imbalance
        self.metrics.log("train", metrics, self.state.step)
        return metrics

    def run_validation(self) -> tuple[float | None, dict[str, float]]:
        """Validate on the first limit_val_batches batches; returns (loss, metrics) as NeMo-Aligner's
        trainers do (loss: metrics["loss"], None for an algorithm whose validation has no loss)."""
        if self.val_dataloader is None:
            return None, {}
        totals: dict[str, float] = {}
        batches = self.val_dataloader.first_batches(self.val_batches)
        for batch in batches:
            metrics = self.validation_step(batch)
            metrics.pop("num_tokens")
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + value / len(batches)
        self.last_val = totals
        self.metrics.log("val", totals, self.state.step)
        log_rank0(logger, "validation at step %d: %s", self.state.step, _fmt(totals))
        return totals.get("loss"), totals

    def save(self) -> None:
        monitor = self.exp_manager.checkpoint_callback_params.monitor
        metric = None
        if self.last_val:
            key = monitor.removeprefix("val_")
            if key not in self.last_val:
                raise ValueError(f"exp_manager.checkpoint_callback_params.monitor={monitor!r} is not a validation "
                                 f"metric; available: {sorted('val_' + k for k in self.last_val)}")
            metric = self.last_val[key]
        sampler = self.train_dataloader.sampler
        self.checkpoints.save(self.state.step, self.model, self.statefuls(),
                              {"epoch": sampler.epoch, "consumed_samples": sampler.consumed_samples}, metric=metric,
                              sharded_extras=self.sharded_statefuls())


def _check_none(**arguments: object) -> None:
    """NeMo-Aligner's trainer arguments that have no counterpart object here must be None."""
    instead = {
        "optimizer": "the model's engine builds AdamW from model.optim when fit() starts",
        "scheduler": "the model's engine builds the LR schedule from model.optim.sched when fit() starts",
        "logger": "metrics go to <exp_manager.explicit_log_dir>/metrics.jsonl, TensorBoard and W&B as exp_manager says",
        "ckpt_callback": "checkpoints follow exp_manager.checkpoint_callback_params",
        "run_timer": "there is no wall-clock limit; bound the run with the loop's max_steps",
    }
    for name, value in arguments.items():
        if value is not None:
            raise ValueError(f"{name}={type(value).__name__} is not supported: {instead[name]}; pass {name}=None")


def _fmt(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
