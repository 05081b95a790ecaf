"""A second, minimal engine for tests: one process, fp32, the Hugging Face module as it is.

It implements nemo_aligner.engines.base.Engine with plain PyTorch and transformers (log_softmax
over full logits, clip_grad_norm_, transformers' own `generate`, torch.save checkpoints) and shares
no code with the torch_native engine, so GPTModel and everything above it running on it unchanged
proves that the engine seam carries. tests/test_engine_seam.py registers it as "plain".
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Iterator, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nemo_aligner.config.schema import ModelConfig, OptimConfig, Precision, PretrainedCheckpointConfig, TrainerConfig
from nemo_aligner.engines.base import ReduceOp
from nemo_aligner.types import Batch, DataParallel, Generations, LengthParams, LossFn, SamplingParams
from nemo_aligner.utils.lr_schedule import build_scheduler

STATE_FILE = "state.pt"


class PlainEngine:
    """One process, one CPU device, no parallelism, fp32 only."""

    def __init__(self, model: ModelConfig, pretrained: PretrainedCheckpointConfig, trainer: TrainerConfig) -> None:
        if trainer.devices * trainer.num_nodes != 1 or model.tensor_model_parallel_size != 1 \
                or model.pipeline_model_parallel_size != 1:
            raise ValueError("the plain engine runs one process without model parallelism")
        if trainer.precision is not Precision.fp32 or pretrained.restore_from_path is None:
            raise ValueError("the plain engine trains in fp32 from an HF model directory")
        path = pretrained.restore_from_path
        self.module = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(pretrained.tokenizer_path or path, local_files_only=True)
        self.device = torch.device("cpu")
        self.compute_dtype = torch.float32
        self.data_parallel = DataParallel(rank=0, size=1)
        self.model_parallel_group = None
        self.seed = model.seed
        self.optimizer: torch.optim.AdamW | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.generation_calls = 0

    has_adapters = False
    checkpoint_formats = ("torch_dist",)

    def adapters_disabled(self) -> contextlib.AbstractContextManager[None]:
        raise RuntimeError("the plain test engine has no adapters")

    def describe(self) -> str:
        return f"{type(self.module).__name__} on the plain test engine: {self.num_parameters()} parameters"

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    # ----------------------------------------------------------------- training
    def setup_optimizer(self, cfg: OptimConfig, *, max_steps: int) -> None:
        params = list(self.module.parameters())
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
        self.scheduler = build_scheduler(self.optimizer, cfg, max_steps=max_steps)

    def _logprobs(self, mb: Batch) -> torch.Tensor:
        ids = mb["input_ids"]
        logits = self.module(input_ids=ids).logits.float()
        return torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)

    def forward_backward(self, micro_batches: Sequence[Batch], loss_fn: LossFn, *,
                         forward_only: bool) -> dict[str, torch.Tensor]:
        totals: dict[str, torch.Tensor] = {}
        for mb in micro_batches:
            with torch.set_grad_enabled(not forward_only):
                loss, metrics = loss_fn(self._logprobs(mb), mb)
                if not forward_only:
                    loss.backward()
            for name, value in {"loss": loss, **metrics, "num_tokens": mb["attention_mask"].sum()}.items():
                totals[name] = totals.get(name, 0) + value.detach().float()
        return totals

    @torch.no_grad()
    def logprobs(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        return torch.cat([self._logprobs(mb) for mb in micro_batches])

    def optimizer_step(self, max_grad_norm: float) -> tuple[float, float]:
        assert self.optimizer is not None and self.scheduler is not None
        norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_grad_norm or float("inf")))
        if not torch.isfinite(torch.tensor(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"gradient norm is {norm}; the step was not applied")
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, lr

    def reduce_data_parallel(self, tensor: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        return tensor.detach().clone()  # one rank: the sum and the max are the value itself

    # --------------------------------------------------------------- generation
    @torch.no_grad()
    def generation_rows_that_fit(self, positions: int, memory_fraction: float) -> int | None:
        return None

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: SamplingParams,
                 length: LengthParams) -> Generations:
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + self.generation_calls)
            self.generation_calls += not sampling.use_greedy
            tokens = self.module.generate(
                input_ids=input_ids, attention_mask=attention_mask, do_sample=not sampling.use_greedy,
                temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                max_new_tokens=length.max_length, min_new_tokens=length.min_length, eos_token_id=eos,
                pad_token_id=pad)
        new = tokens[:, input_ids.shape[1]:]
        is_eos = (new == eos).long()
        ended = is_eos.cumsum(dim=1) > 0
        response_lengths = (~ended).sum(dim=1) + is_eos.max(dim=1).values  # new tokens up to and including the first EOS
        return Generations(tokens=tokens, prompt_lengths=attention_mask.sum(dim=1), response_lengths=response_lengths)

    def offload_optimizer_state(self) -> None:
        """The optimizer state already lives in host memory."""

    def onload_optimizer_state(self) -> None:
        """The optimizer state already lives in host memory."""

    # ----------------------------------------------------------- weight buffers
    def allocate_weights(self, where: str, *, compute_dtype: bool = False) -> dict[str, torch.Tensor]:
        return {name: torch.empty_like(p) for name, p in self.module.named_parameters()}  # host and device: the CPU

    @torch.no_grad()
    def copy_weights_to(self, buffers: dict[str, torch.Tensor]) -> None:
        for name, p in self._checked(buffers).items():
            buffers[name].copy_(p)

    @contextlib.contextmanager
    def swapped_weights(self, buffers: dict[str, torch.Tensor]) -> Iterator[None]:
        params = self._checked(buffers)
        stash = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(buffers[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(stash[name])

    def weights_fingerprint(self) -> str:
        digest = hashlib.sha256()
        for name, p in self.module.named_parameters():
            digest.update(name.encode() + p.detach().numpy().tobytes())
        return digest.hexdigest()

    def _checked(self, host: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        params = dict(self.module.named_parameters())
        if params.keys() != host.keys() or any(p.shape != host[n].shape for n, p in params.items()):
            raise KeyError("host weights do not match the model")
        return params

    # -------------------------------------------------------------- checkpoints
    def save(self, path: str, *, asynchronous: bool = False, weights_format: str = "torch_dist") -> None:
        """Always synchronous, always torch.save (the seam needs no more)."""
        assert self.optimizer is not None
        os.makedirs(path, exist_ok=True)
        torch.save({"model": self.module.state_dict(), "optim": self.optimizer.state_dict()},
                   os.path.join(path, STATE_FILE))

    def load(self, path: str, *, with_optimizer: bool) -> None:
        state = torch.load(os.path.join(path, STATE_FILE), weights_only=True)
        self.module.load_state_dict(state["model"])
        if with_optimizer:
            assert self.optimizer is not None
            self.optimizer.load_state_dict(state["optim"])

    def save_weights(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        torch.save({"model": self.module.state_dict()}, os.path.join(path, STATE_FILE))

    def export_hf(self, path: str) -> None:
        self.module.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def state_dict(self) -> dict[str, object]:
        assert self.scheduler is not None  # checkpoints are taken once training has begun
        return {"scheduler": self.scheduler.state_dict(), "generation_calls": self.generation_calls}

    def load_state_dict(self, state: dict[str, object]) -> None:
        assert self.scheduler is not None
        self.scheduler.load_state_dict(state["scheduler"])  # type: ignore[arg-type]
        self.generation_calls = int(state["generation_calls"])  # type: ignore[arg-type]
