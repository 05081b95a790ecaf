"""The reference strategy a config names, `auto` resolved, announced in the log."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from nemo_aligner.config.schema import ReferenceStrategy
from nemo_aligner.engines.base import Engine
from nemo_aligner.reference.adapters_disabled import AdaptersDisabledReference
from nemo_aligner.reference.base import ReferencePolicy
from nemo_aligner.reference.none import NoReference
from nemo_aligner.reference.precomputed import PrecomputedReference
from nemo_aligner.reference.weight_copy import WeightCopyReference
from nemo_aligner.utils.distributed import log_rank0

logger = logging.getLogger(__name__)

# resident needs the reference in the compute dtype plus room to set the fp32 training weights aside
RESIDENT_BYTES_PER_PARAMETER = 4 + 4
RESIDENT_SHARE_OF_FREE_MEMORY = 0.5


def build_reference_policy(strategy: ReferenceStrategy, engine: Engine, *, precomputable: bool,
                           reference_free: bool = False) -> ReferencePolicy:
    """The reference as `strategy` holds it; `auto` is precomputed where the reference never changes
    (`precomputable`, DPO), else resident when it takes at most half the free device memory, else swap.
    SPIN's config refuses the strategies of a reference that never changes (precomputed, adapters_disabled).
    `reference_free` (every loss reference-free): no reference at all (NoReference)."""
    if reference_free:
        log_rank0(logger, "reference policy: none (the preference loss is reference-free)")
        return NoReference()
    if strategy is ReferenceStrategy.auto:
        strategy = (ReferenceStrategy.precomputed if precomputable
                    else ReferenceStrategy.resident if _fits_on_device(engine) else ReferenceStrategy.swap)
    if strategy is ReferenceStrategy.precomputed:
        reference: ReferencePolicy = PrecomputedReference(engine)
    elif strategy is ReferenceStrategy.adapters_disabled:
        reference = AdaptersDisabledReference(engine)
    else:
        reference = WeightCopyReference(engine, resident=strategy is ReferenceStrategy.resident)
    log_rank0(logger, "reference policy: %s", reference.name)
    return reference


def _fits_on_device(engine: Engine) -> bool:
    if engine.device.type != "cuda":
        return True  # host memory: the copy is as large either way
    group = engine.model_parallel_group
    ranks_per_copy = engine.data_parallel.size * (dist.get_world_size(group) if group is not None else 1)
    needed = engine.num_parameters() / ranks_per_copy * RESIDENT_BYTES_PER_PARAMETER
    free, _ = torch.cuda.mem_get_info(engine.device)
    return needed <= RESIDENT_SHARE_OF_FREE_MEMORY * free
