"""NeMo-Aligner's MegatronGPTRSModel: our GPTRSActor with NeMo-Aligner's method names.

Rollout batches are NeMo-Aligner's: `infer` takes {"text": [B, P] right-padded prompt ids,
"length": [B]} and returns {"response_tokens": [B, T] prompt + response (right-padded),
"response_lengths": [B] (prompt + response), "prompt_lengths": [B]}, which get_loss_and_metrics takes.
"""

from __future__ import annotations

from typing import Mapping

import torch

from nemo_aligner.models.nlp.gpt.gpt_rs_actor import GPTRSActor
from nemo_aligner.models.nlp.gpt.nemo_aligner_api import AdamOffloadMethods


class MegatronGPTRSModel(AdamOffloadMethods, GPTRSActor):
    @torch.no_grad()
    def infer(self, inference_batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Generate one response per prompt with model.rs.sampling_params / length_params."""
        lengths = inference_batch["length"].cpu()
        prompts = [row[:n] for row, n in zip(inference_batch["text"].cpu(), lengths.tolist())]
        responses = self.generate_responses(prompts, self.rs.sampling_params, self.rs.length_params,
                                            micro_batch_size=self.rs.rollout_micro_batch_size,
                                            memory_fraction=self.rs.rollout_memory_fraction, offload_optimizer=False)
        sequences = [torch.cat([prompt, response]) for prompt, response in zip(prompts, responses)]
        tokens = torch.full((len(sequences), max(map(len, sequences))), self.tokenizer.pad_token_id, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            tokens[row, : len(sequence)] = sequence
        return {"response_tokens": tokens.to(self.device),
                "response_lengths": torch.tensor([len(s) for s in sequences], device=self.device),
                "prompt_lengths": lengths.to(self.device)}

    def get_loss_and_metrics(self, batch: Mapping[str, torch.Tensor], forward_only: bool) -> tuple[float, dict[str, float]]:
        """(loss, {"loss": loss}): the mean over sequences of each response's token-mean NLL on a
        rollout batch as infer returns it; gradients unless forward_only."""
        tokens = batch["response_tokens"].cpu()
        positions = torch.arange(tokens.shape[1])[None, :]
        attention = positions < batch["response_lengths"].cpu()[:, None]
        loss_mask = (positions >= batch["prompt_lengths"].cpu()[:, None]) & attention
        metrics = self.loss_and_metrics({"input_ids": tokens * attention, "attention_mask": attention.long(),
                                         "loss_mask": loss_mask.float()}, forward_only=forward_only)
        return metrics["loss"], {"loss": metrics["loss"]}

    def prepare_for_inference(self) -> None:
        """Before generating: the optimizer state waits in host memory when model.rs.offload_adam_states."""
        if self.rs.offload_adam_states:
            self.offload_adam_states()

    def finish_inference(self) -> None:
        """After generating: nothing to undo here (prepare_for_training brings the optimizer state back)."""

    def prepare_for_training(self) -> None:
        """Before training steps: the optimizer state back on the device."""
        self.onload_adam_states()
