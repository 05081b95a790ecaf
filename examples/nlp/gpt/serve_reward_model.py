"""Serve a reward model over HTTP for rejection sampling (the trainer calls it with RemoteRewardClient).

    # an HF sequence-classification reward model (num_labels=1) from a local directory
    python examples/nlp/gpt/serve_reward_model.py reward_model.mode=sequence_classification \
        reward_model.model_path=/models/my-rm host=0.0.0.0 port=5555

    # a Python reward function f(prompt, response) -> float (the default: the tiny task's exact match)
    python examples/nlp/gpt/serve_reward_model.py reward_model.function._target_=my_pkg.rewards.f

Endpoints: GET /health, POST /score {"prompts": [...], "responses": [...]} -> {"rewards": [...]}.
"""

from __future__ import annotations

import entry_setup  # noqa: F401  (repository-relative paths; the embedded example importable)
import hydra
from omegaconf import DictConfig

from nemo_aligner.config.loader import load_config
from nemo_aligner.config.reward_server import RewardServerConfig
from nemo_aligner.servers.reward_server import serve
from nemo_aligner.utils.errors import report_input_errors


@hydra.main(config_path="conf", config_name="serve_reward_model", version_base=None)
@report_input_errors
def main(raw: DictConfig) -> None:
    serve(load_config(RewardServerConfig, raw))


if __name__ == "__main__":
    main()
