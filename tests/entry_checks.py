"""Run every entry script's main on a list of bad inputs, in one process, and record what each got.

    python tests/entry_checks.py --workdir DIR --cases cases.json --out results.json

Each case is {script, overrides, expect}: the script's Hydra config is composed with the
overrides (as `torchrun script.py <overrides>` would), its main is called, and the exit code, what
it printed on stderr and whether its log directory (or export folder) exists afterwards are
recorded. tests/test_bad_inputs.py writes the cases and checks the results.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_DIR = os.path.join(REPO, "examples", "nlp", "gpt")
sys.path.insert(0, ENTRY_DIR)

from hydra import compose, initialize_config_dir  # noqa: E402

CONFIG_NAMES = {"train_gpt_dpo": "gpt_dpo", "train_gpt_spin": "gpt_spin", "train_gpt_rs_actor": "gpt_rs_actor",
                "export_to_hf": "export_to_hf", "serve_reward_model": "serve_reward_model"}


def run_case(script: str, overrides: list[str]) -> dict:
    module = importlib.import_module(script)
    with initialize_config_dir(config_dir=os.path.join(ENTRY_DIR, "conf"), version_base=None):
        cfg = compose(config_name=CONFIG_NAMES[script], overrides=overrides)
    stderr = io.StringIO()
    exit_code = 0
    with contextlib.redirect_stderr(stderr):
        try:
            module.main(cfg)
        except SystemExit as stop:
            exit_code = stop.code
        except Exception as err:  # not an input error: a bug, reported with its type
            exit_code = f"uncaught {type(err).__name__}: {err}"
    return {"exit_code": exit_code, "stderr": stderr.getvalue()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--cases", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with open(args.cases) as f:
        cases = json.load(f)
    results = []
    for case in cases:
        result = run_case(case["script"], case["overrides"])
        result["written"] = os.path.exists(case["must_not_exist"])
        results.append({**case, **result})
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
