"""Rejection-sampling fine-tuning: generate several responses per prompt, score them, fine-tune
on the best.

    # terminal 1: the reward server (a reward model directory, or a reward function)
    python examples/nlp/gpt/serve_reward_model.py host=127.0.0.1 port=5555 ...
    # terminal 2: the actor, pointed at it
    torchrun --nproc_per_node 8 examples/nlp/gpt/train_gpt_rs_actor.py trainer.devices=8 \
        reward.source=remote remote_rm.reward_model.ip=127.0.0.1 remote_rm.reward_model.port=5555 ...

With no arguments it runs on the embedded tiny model with the task's exact-match reward in process.
"""

from __future__ import annotations

import functools

import entry_setup  # noqa: F401  (repository-relative paths; the embedded example importable)
import hydra
from omegaconf import DictConfig, OmegaConf

from nemo_aligner.algorithms.rs import RSTrainer
from nemo_aligner.config.loader import instantiate_target, load_config
from nemo_aligner.config.rs import RSJobConfig
from nemo_aligner.data.builders import build_prompt_loader
from nemo_aligner.models.nlp.gpt.gpt_rs_actor import GPTRSActor
from nemo_aligner.servers.rewards import build_reward
from nemo_aligner.utils.errors import report_input_errors
from nemo_aligner.utils.task_eval import report_task_eval


@hydra.main(config_path="conf", config_name="gpt_rs_actor", version_base=None)
@report_input_errors
def main(raw: DictConfig) -> None:
    cfg = load_config(RSJobConfig, raw)
    policy = GPTRSActor(cfg.model, cfg.pretrained_checkpoint, cfg.trainer)
    rs, data = cfg.model.rs, cfg.model.data
    loader = functools.partial(build_prompt_loader, tokenizer=policy.tokenizer, data=data,
                               max_seq_length=cfg.model.encoder_seq_length, data_parallel=policy.data_parallel,
                               response_budget=rs.length_params.max_length)
    train = loader(data.data_prefix.train, prompts_per_step=rs.num_rollout_samples, shuffle=True)
    val = loader(data.data_prefix.validation, prompts_per_step=rs.num_val_samples, shuffle=False)
    reward = build_reward(cfg.reward, cfg.remote_rm, policy.model_parallel_group)
    task_eval = instantiate_target(cfg.task_eval, key="task_eval") if cfg.task_eval else None
    # Every input is validated: the trainer prepares the log directory (utils/log_dir.py).
    def report(epoch: int, model: GPTRSActor) -> None:
        report_task_eval(task_eval(model), f"after epoch {epoch} ({trainer.state.step} rejection sampling steps)")

    trainer = RSTrainer(cfg=cfg.trainer.rs, model=policy, train_dataloader=train, val_dataloader=val,
                        exp_manager=cfg.exp_manager, log_every_n_steps=cfg.trainer.log_every_n_steps, reward=reward, rs=rs,
                        config=OmegaConf.to_container(raw, resolve=True), epoch_callback=report if task_eval else None)
    if task_eval:
        report_task_eval(task_eval(policy), "before training")
    trainer.fit()
    if task_eval and trainer.state.step % train.sampler.batches_per_epoch:  # ended inside an epoch
        report_task_eval(task_eval(policy), f"after {trainer.state.step} rejection sampling steps")


if __name__ == "__main__":
    main()
