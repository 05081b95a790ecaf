"""Train a policy with DPO / IPO / RPO on preference pairs.

    torchrun --nproc_per_node 8 examples/nlp/gpt/train_gpt_dpo.py \
        pretrained_checkpoint.restore_from_path=/models/my-hf-model \
        model.data.data_prefix.train=/data/train.jsonl model.data.data_prefix.validation=/data/val.jsonl \
        model.dpo.preference_loss=ipo trainer.devices=8

With no arguments it aligns the embedded tiny model (examples/tiny) on CPU.
"""

from __future__ import annotations

import functools

import entry_setup  # noqa: F401  (repository-relative paths; the embedded example importable)
import hydra
from omegaconf import DictConfig, OmegaConf

from nemo_aligner.algorithms.dpo import DPOTrainer
from nemo_aligner.config.dpo import DPOJobConfig
from nemo_aligner.config.loader import instantiate_target, load_config
from nemo_aligner.data.builders import build_preference_loader
from nemo_aligner.models.nlp.gpt.gpt_dpo_model import GPTDPOModel
from nemo_aligner.utils.errors import report_input_errors
from nemo_aligner.utils.task_eval import report_task_eval


@hydra.main(config_path="conf", config_name="gpt_dpo", version_base=None)
@report_input_errors
def main(raw: DictConfig) -> None:
    cfg = load_config(DPOJobConfig, raw)
    policy = GPTDPOModel(cfg.model, cfg.pretrained_checkpoint, cfg.trainer)
    data = cfg.model.data
    loader = functools.partial(build_preference_loader, tokenizer=policy.tokenizer, data=data,
                               max_seq_length=cfg.model.encoder_seq_length, global_batch_size=cfg.model.global_batch_size,
                               data_parallel=policy.data_parallel, micro_batch_size=cfg.model.micro_batch_size)
    train = loader(data.data_prefix.train, shuffle=True)
    val = loader(data.data_prefix.validation, shuffle=False)
    task_eval = instantiate_target(cfg.task_eval, key="task_eval") if cfg.task_eval else None
    # Every input is validated: the trainer prepares the log directory (utils/log_dir.py).
    def report(epoch: int, model: GPTDPOModel) -> None:
        report_task_eval(task_eval(model), f"after epoch {epoch} ({trainer.state.step} DPO steps)")

    trainer = DPOTrainer(cfg=cfg.trainer.dpo, model=policy, train_dataloader=train, val_dataloader=val,
                         exp_manager=cfg.exp_manager, log_every_n_steps=cfg.trainer.log_every_n_steps,
                         config=OmegaConf.to_container(raw, resolve=True), epoch_callback=report if task_eval else None)
    if task_eval:
        report_task_eval(task_eval(policy), "before training")
    trainer.fit()
    if task_eval and trainer.state.step % train.sampler.batches_per_epoch:  # ended inside an epoch
        report_task_eval(task_eval(policy), f"after {trainer.state.step} DPO steps")


if __name__ == "__main__":
    main()
