"""Self-play fine-tuning (SPIN): SFT data becomes preference pairs against the model's own
generations; the reference is refreshed after every iteration.

    torchrun --nproc_per_node 8 examples/nlp/gpt/train_gpt_spin.py trainer.devices=8 \
        pretrained_checkpoint.restore_from_path=/models/my-sft-model \
        model.data.train_ds.file_path=sft.jsonl trainer.spin.max_iterations=3

With no arguments it runs on the embedded tiny model (examples/tiny) on CPU.
"""

from __future__ import annotations

import functools

import entry_setup  # noqa: F401  (repository-relative paths; the embedded example importable)
import hydra
from omegaconf import DictConfig, OmegaConf

from nemo_aligner.algorithms.spin import SPINTrainer
from nemo_aligner.config.loader import instantiate_target, load_config
from nemo_aligner.config.spin import SPINJobConfig
from nemo_aligner.data.builders import build_sft_loader
from nemo_aligner.models.nlp.gpt.gpt_spin_model import GPTSPINModel
from nemo_aligner.utils.errors import report_input_errors
from nemo_aligner.utils.task_eval import report_task_eval


@hydra.main(config_path="conf", config_name="gpt_spin", version_base=None)
@report_input_errors
def main(raw: DictConfig) -> None:
    cfg = load_config(SPINJobConfig, raw)
    policy = GPTSPINModel(cfg.model, cfg.pretrained_checkpoint, cfg.trainer)
    data = cfg.model.data
    loader = functools.partial(build_sft_loader, tokenizer=policy.tokenizer, data=data,
                               max_seq_length=cfg.model.encoder_seq_length, global_batch_size=cfg.model.global_batch_size,
                               data_parallel=policy.data_parallel)
    # training: the examples themselves (SPIN generates for their prompts); validation: collated SFT rows
    train = loader(data.train_ds.file_path, response_budget=cfg.model.spin.length_params.max_length, shuffle=True,
                   collate=False, micro_batch_size=cfg.model.micro_batch_size)
    val = loader(data.validation_ds.file_path, response_budget=0, shuffle=False, collate=True)
    task_eval = instantiate_target(cfg.task_eval, key="task_eval") if cfg.task_eval else None

    def report(iteration: int, model: GPTSPINModel) -> None:
        report_task_eval(task_eval(model), f"after iteration {iteration}")

    # Every input is validated: the trainer prepares the log directory (utils/log_dir.py).
    trainer = SPINTrainer(cfg=cfg.trainer.spin, model=policy, train_dataloader=train, val_dataloader=val,
                          exp_manager=cfg.exp_manager, log_every_n_steps=cfg.trainer.log_every_n_steps,
                          config=OmegaConf.to_container(raw, resolve=True),
                          iteration_callback=report if task_eval else None)
    if task_eval:
        report_task_eval(task_eval(policy), "before training")
    trainer.fit()


if __name__ == "__main__":
    main()
