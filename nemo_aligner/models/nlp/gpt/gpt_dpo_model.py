"""GPTDPOModel: the policy trained with a preference loss against a frozen reference.

Batches hold preference pairs in the pair layout (nemo_aligner/types.py), so an example is two
rows and micro-batches keep pairs whole. The reference is the initial model (a ReferencePolicy,
nemo_aligner/reference/), used to score each batch.
"""

from __future__ import annotations

import functools
from dataclasses import asdict

import torch

from nemo_aligner.config.dpo import DPOLossConfig, DPOModelConfig
from nemo_aligner.config.schema import PretrainedCheckpointConfig, ReferenceStrategy, TrainerConfig
from nemo_aligner.losses.dpo import dpo_loss_fn, dpo_step_pairs, finalize_dpo_metrics
from nemo_aligner.losses.preference import PAIR_TENSORS, STATE_PARAMETERS, PreferencePairs, PreferenceTerm, build_preference_terms
from nemo_aligner.models.nlp.gpt.gpt_model import GPTModel
from nemo_aligner.reference import ReferencePolicy, build_reference_policy, sum_over_scored
from nemo_aligner.types import ROWS_PER_PAIR, Batch, pair_rows


def build_dpo_loss_fn(dpo: DPOLossConfig) -> functools.partial:
    """dpo_loss_fn with model.dpo's values bound (all but global_pairs and the loss state); an unknown loss
    name fails here."""
    terms = build_preference_terms(dpo.preference_losses, dpo.weights, asdict(dpo.loss_params), key="model.dpo.preference_loss")
    return functools.partial(
        dpo_loss_fn, preference_terms=terms, beta=dpo.ref_policy_kl_penalty,
        preference_weight=dpo.preference_loss_weight, sft_weight=dpo.sft_loss_weight,
        average_log_probs=dpo.preference_average_log_probs, sft_average_log_probs=dpo.sft_average_log_probs,
        gt_reward_scale=dpo.gt_reward_scale)


class GPTDPOModel(GPTModel):
    """DPO / IPO / RPO policy. micro_batch_size and global_batch_size count pairs."""

    rows_per_example = ROWS_PER_PAIR
    config_class = DPOModelConfig
    auto_reference_precomputed = True  # reference.strategy=auto: precompute (the reference never changes)

    def __init__(self, cfg: DPOModelConfig, pretrained: PretrainedCheckpointConfig, trainer: TrainerConfig) -> None:
        self.loss_fn = build_dpo_loss_fn(cfg.dpo)  # checks the loss name before anything is built
        terms: list[PreferenceTerm] = self.loss_fn.keywords["preference_terms"]
        self.reference_free = all(term.reference_free for term in terms)
        self.step_level = any(term.step_level for term in terms)  # AOT: the step's pairs are scored first
        if self.reference_free and cfg.dpo.reference.strategy is not ReferenceStrategy.auto:
            raise ValueError(f"model.dpo.reference.strategy={cfg.dpo.reference.strategy.value}: model.dpo.preference_loss="
                             f"{cfg.dpo.preference_loss} is reference-free and computes no reference; set it to auto")
        # the losses' state parameters (STATE_PARAMETERS, e.g. BCO's δ): {name: (running mean, training steps)}
        self.loss_state = {name: (0.0, 0) for term in terms for name in term.state}
        super().__init__(cfg, pretrained, trainer)
        self.dpo = cfg.dpo
        self.reference: ReferencePolicy = build_reference_policy(cfg.dpo.reference.strategy, self.engine,
                                                                 precomputable=self.auto_reference_precomputed,
                                                                 reference_free=self.reference_free)

    def reference_logprobs(self, batch: Batch) -> torch.Tensor:
        """Per-token log-probs [2P, T-1] under the reference (initial) weights (weight-holding strategies)."""
        return self.reference.logprobs(self.micro_batches(batch, self.dpo.log_prob_forward_micro_batch_size))

    def reference_logps(self, batch: Batch) -> torch.Tensor:
        """The reference's Σ_t log-probs of each row's response, [2P] (every strategy)."""
        return self.reference.sequence_logps(
            batch, functools.partial(self.micro_batches, micro_batch_size=self.dpo.log_prob_forward_micro_batch_size))

    @torch.no_grad()
    def sequence_logps(self, batch: Batch, micro_batch_size: int | None = None) -> torch.Tensor:
        """Σ_t log-probs of each row's response under the current weights, [2P], without gradients, in forwards
        of `micro_batch_size` pairs (default: model.dpo.log_prob_forward_micro_batch_size)."""
        micro_batches = self.micro_batches(batch, micro_batch_size or self.dpo.log_prob_forward_micro_batch_size)
        return sum_over_scored(self.engine.logprobs(micro_batches), micro_batches)

    def loss_and_metrics(self, batch: Batch, *, forward_only: bool) -> dict[str, float]:
        """Score the batch against the reference, run forward(/backward), return reduced metrics."""
        batch = self.on_device(batch)
        if not self.reference_free:
            batch["ref_logps"] = self.reference_logps(batch)
        state = {name: value for name, (value, _) in self.loss_state.items()}
        step_pairs = None
        if self.step_level:
            step_pairs, batch["pair_index"] = self.step_pairs(batch)
        loss_fn = functools.partial(self.loss_fn, global_pairs=self.global_examples(batch), loss_state=state,
                                    step_pairs=step_pairs)
        sums = self.forward_backward(batch, loss_fn, forward_only=forward_only)
        metrics = {**finalize_dpo_metrics(sums), **state}  # reported with the values this step used
        if not forward_only:  # each state parameter: the running mean of its metric over the training steps
            for name, (mean, steps) in self.loss_state.items():
                self.loss_state[name] = ((mean * steps + metrics[STATE_PARAMETERS[name]]) / (steps + 1), steps + 1)
        return metrics

    def step_pairs(self, batch: Batch) -> tuple[PreferencePairs, torch.Tensor]:
        """Every pair of this optimizer step, on every data-parallel rank, under the current weights and
        without gradients (one extra forward of the policy, in the training micro-batches, which fit and
        score each pair as the training forward will), in rank order; and each row's pair index in it [2P].
        The step-level losses (AOT) rank the pairs by these."""
        pairs = dpo_step_pairs(self.sequence_logps(batch, self.cfg.micro_batch_size), batch,
                               average_log_probs=self.dpo.preference_average_log_probs,
                               gt_reward_scale=self.dpo.gt_reward_scale)
        local = len(pairs.gt_margin)
        gathered = {f: self.gather_data_parallel(getattr(pairs, f)) for f in PAIR_TENSORS}
        index = pair_rows(torch.arange(local) + self.data_parallel.rank * local)
        return PreferencePairs(**gathered, averaged=pairs.averaged), index.to(batch["input_ids"].device)

    def state_dict(self) -> dict[str, object]:
        """The engine's training state, and the losses' state parameters (BCO's running reward mean)."""
        return {**super().state_dict(), "loss_state": {name: list(value) for name, value in self.loss_state.items()}}

    def load_state_dict(self, state: dict[str, object]) -> None:
        state = dict(state)
        saved = state.pop("loss_state", {})
        self.loss_state.update({name: (float(value), int(seen)) for name, (value, seen) in saved.items()  # type: ignore[union-attr]
                                if name in self.loss_state})
        super().load_state_dict(state)
