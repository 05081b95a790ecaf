"""A DPO script written the way a NeMo-Aligner user's own script is, against NeMo-Aligner's names.

    torchrun --nproc_per_node 1 examples/nlp/gpt/custom_dpo_script.py [hydra overrides of gpt_dpo.yaml]

Compared with a NeMo-Aligner script (docs/migrating_from_nemo_aligner.md): there is no Lightning
trainer, exp_manager call, logger wrapper, checkpoint callback or timer to build; load_from_nemo
takes the trainer config section and a Hugging Face directory; the data loaders are ours; the
DPOTrainer call is NeMo-Aligner's, with exp_manager added and the Lightning-era objects None.
"""

from __future__ import annotations

import logging
from functools import partial

import entry_setup  # noqa: F401  (repository-relative paths; the embedded example importable)
import hydra
from omegaconf import DictConfig, OmegaConf

from nemo_aligner.algorithms.dpo import DPOTrainer, dpo_custom_collate
from nemo_aligner.data.builders import build_preference_loader
from nemo_aligner.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel
from nemo_aligner.utils.distributed import log_rank0
from nemo_aligner.utils.errors import report_input_errors
from nemo_aligner.utils.utils import load_from_nemo, retrieve_model_state_dict_in_cpu

logger = logging.getLogger(__name__)


@hydra.main(config_path="conf", config_name="gpt_dpo", version_base=None)
@report_input_errors
def main(cfg: DictConfig) -> None:
    ptl_model = load_from_nemo(MegatronGPTDPOModel, cfg.model, cfg.trainer, strict=True,
                               restore_path=cfg.pretrained_checkpoint.restore_from_path)
    ref_policy_state_dict = retrieve_model_state_dict_in_cpu(ptl_model,
                                                             megatron_amp_O2=cfg.model.get("megatron_amp_O2", False))
    ptl_model.ref_policy_state_dict = ref_policy_state_dict

    loader = partial(build_preference_loader, tokenizer=ptl_model.tokenizer, data=ptl_model.cfg.data,
                     max_seq_length=cfg.model.encoder_seq_length, global_batch_size=cfg.model.global_batch_size,
                     data_parallel=ptl_model.data_parallel)
    train_dataloader = loader(cfg.model.data.data_prefix.train, shuffle=True)
    val_dataloader = loader(cfg.model.data.data_prefix.validation, shuffle=False)

    dpo_trainer = DPOTrainer(
        cfg=cfg.trainer.dpo,
        model=ptl_model,
        optimizer=None,
        scheduler=None,
        train_dataloader=train_dataloader,
        val_dataloader=val_dataloader,
        test_dataloader=None,
        collate_fn=partial(dpo_custom_collate, eos_id=ptl_model.tokenizer.eos_token_id),
        logger=None,
        ckpt_callback=None,
        run_timer=None,
        exp_manager=cfg.exp_manager,
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    dpo_trainer.fit()
    val_loss, val_metrics = dpo_trainer.run_validation()
    log_rank0(logger, "validation loss %.4f, acc %.3f", val_loss, val_metrics["acc"])


if __name__ == "__main__":
    main()
