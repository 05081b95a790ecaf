"""The preference-loss catalogue: every loss against a scalar transcription of its paper's formula (values),
autograd against finite differences (gradients), the edge cases the papers name (equal log-probs, empty
responses, extreme margins stay finite), weighted combinations, the reference-free path that never
computes a reference, and BCO's running reward mean as training state."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_aligner.config.dpo import DPOLossConfig, PreferenceLossParams
from nemo_aligner.losses.preference import (PAIR_TENSORS, PREFERENCE_LOSSES, REFERENCE_FREE, STEP_LEVEL, PreferencePairs,
                                            build_preference_terms, combined_preference_loss, split_loss)

BETA = 0.3
PARAMS = dict(label_smoothing=0.1, exo_epsilon=1e-3, simpo_gamma=0.5, orpo_lambda=0.1, cpo_alpha=1.0, discopop_tau=0.05)
BCO_MEAN = 0.2


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return math.exp(log_sigmoid(x))


def scalar_reference(name: str, c: float, r: float, lc: float, lr: float, pc: float, pr: float, g: float) -> float:
    """The per-pair loss from the papers' formulas, one float at a time. c, r: log-ratios R; lc, lr: response
    lengths; pc, pr: the policy's Σ log-probs; g: the data's reward margin."""
    b, eps, d = BETA, PARAMS["label_smoothing"], c - r
    ac, ar = pc / max(lc, 1.0), pr / max(lr, 1.0)
    if name == "dpo":
        return -(1 - eps) * log_sigmoid(b * d) - eps * log_sigmoid(-b * d)
    if name == "ipo":
        return (d - 1 / (2 * b)) ** 2
    if name == "rpo_sq":
        return (b * d - g) ** 2
    if name in ("rpo_bwd_kl", "rpo_fwd_kl"):
        p, q = (sigmoid(g), sigmoid(b * d)) if name == "rpo_bwd_kl" else (sigmoid(b * d), sigmoid(g))
        return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    if name == "robust":
        return ((1 - eps) * -log_sigmoid(b * d) + eps * log_sigmoid(-b * d)) / (1 - 2 * eps)
    if name == "hinge":
        return max(0.0, 1 - b * d)
    if name == "exo_pair":
        e = PARAMS["exo_epsilon"]
        return sigmoid(b * d) * (log_sigmoid(b * d) - math.log(1 - e)) + sigmoid(-b * d) * (log_sigmoid(-b * d) - math.log(e))
    if name == "nca_pair":
        return -log_sigmoid(b * c) - 0.5 * log_sigmoid(-b * c) - 0.5 * log_sigmoid(-b * r)
    if name == "sppo_hard":
        return (c - 1 / (2 * b)) ** 2 + (r + 1 / (2 * b)) ** 2
    if name == "apo_zero":
        return 1 - sigmoid(b * c) + sigmoid(b * r)
    if name == "apo_down":
        return sigmoid(b * c) + 1 - sigmoid(b * d)
    if name == "discopop":
        w = sigmoid(b * d / PARAMS["discopop_tau"])
        return (1 - w) * -log_sigmoid(b * d) + w * math.exp(-b * d)
    if name == "bco_pair":
        return -log_sigmoid(b * c - BCO_MEAN) - log_sigmoid(-(b * r - BCO_MEAN))
    if name == "simpo":
        return -log_sigmoid(b * (ac - ar) - PARAMS["simpo_gamma"])
    if name == "orpo":
        odds = lambda a: a - math.log(1 - math.exp(a))  # noqa: E731
        return -ac - PARAMS["orpo_lambda"] * log_sigmoid(odds(ac) - odds(ar))
    if name == "cpo":
        return -log_sigmoid(b * (pc - pr)) + PARAMS["cpo_alpha"] * -ac
    raise KeyError(name)


def random_pairs(n: int = 16, seed: int = 0, dtype: torch.dtype = torch.float64) -> PreferencePairs:
    gen = torch.Generator().manual_seed(seed)
    lengths = lambda: torch.randint(1, 40, (n,), generator=gen).to(dtype)  # noqa: E731
    lc, lr = lengths(), lengths()
    pc, pr = -lc * (0.2 + 2 * torch.rand(n, generator=gen, dtype=dtype)), -lr * (0.2 + 2 * torch.rand(n, generator=gen, dtype=dtype))
    return PreferencePairs(chosen_logratios=3 * torch.randn(n, generator=gen, dtype=dtype),
                           rejected_logratios=3 * torch.randn(n, generator=gen, dtype=dtype),
                           chosen_logps=pc, rejected_logps=pr, chosen_lengths=lc, rejected_lengths=lr,
                           gt_margin=torch.randn(n, generator=gen, dtype=dtype))


def term(name: str):  # noqa: ANN201
    return build_preference_terms([name], [1.0], PARAMS, key="model.dpo.preference_loss")[0]


def values(name: str, pairs: PreferencePairs) -> torch.Tensor:
    t = term(name)
    return split_loss(t.loss(pairs, beta=BETA, **{p: BCO_MEAN for p in t.state}))[0]


ALL = sorted(PREFERENCE_LOSSES)
PER_PAIR = sorted(set(PREFERENCE_LOSSES) - STEP_LEVEL)  # a pair's value depends on that pair alone


@pytest.mark.parametrize("name", PER_PAIR)
def test_each_loss_equals_its_papers_formula(name: str) -> None:
    pairs = random_pairs()
    got = values(name, pairs)
    expected = [scalar_reference(name, *(float(getattr(pairs, f)[i]) for f in (
        "chosen_logratios", "rejected_logratios", "chosen_lengths", "rejected_lengths", "chosen_logps", "rejected_logps",
        "gt_margin"))) for i in range(len(got))]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=got.dtype), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ALL)
def test_each_loss_gradient_equals_finite_differences(name: str) -> None:
    base = random_pairs(n=6, seed=1)
    fields = ("chosen_logratios", "rejected_logratios", "chosen_logps", "rejected_logps", "gt_margin")

    def loss(*inputs: torch.Tensor) -> torch.Tensor:
        pairs = PreferencePairs(**dict(zip(fields, inputs)), chosen_lengths=base.chosen_lengths,
                                rejected_lengths=base.rejected_lengths)
        return values(name, pairs)

    inputs = tuple(getattr(base, f).clone().requires_grad_(True) for f in fields)
    # a step-level loss's per-pair shares carry the gradient of their sum (each pair's partner is a constant)
    of = (lambda *x: loss(*x).sum()) if name in STEP_LEVEL else loss
    assert torch.autograd.gradcheck(of, inputs, eps=1e-6, atol=1e-5)


def smoothed_logistic(x: float) -> float:
    eps = PARAMS["label_smoothing"]
    return -(1 - eps) * log_sigmoid(x) - eps * log_sigmoid(-x)


@pytest.mark.parametrize("averaged", [False, True])
def test_aot_losses_are_the_order_statistics_of_the_whole_step_whatever_its_micro_batches(averaged: bool) -> None:
    """AOT over a step of 10 pairs, computed in micro-batches of 1, 3 and 10 pairs (each told the whole step):
    the shares sum to the loss over the step's sorted values (transcribed with Python's sorted, from the
    policy's and the reference's log-probs), and their gradients to the gradient of that loss written
    directly with torch.sort over the whole step."""
    gen = torch.Generator().manual_seed(4)
    n = 10
    lengths = {side: torch.randint(1, 30, (n,), generator=gen).double() for side in "cr"}
    policy = {side: (-lengths[side] * (0.2 + 2 * torch.rand(n, generator=gen, dtype=torch.float64))).requires_grad_(True)
              for side in "cr"}
    reference = {side: -lengths[side] * (0.2 + 2 * torch.rand(n, generator=gen, dtype=torch.float64)) for side in "cr"}
    scale = {side: lengths[side] if averaged else torch.ones(n, dtype=torch.float64) for side in "cr"}

    def pairs_of(rows: slice | None, step: PreferencePairs | None = None) -> PreferencePairs:
        rows = rows or slice(None)
        ratio = {side: ((policy[side] - reference[side]) / scale[side])[rows] for side in "cr"}
        index = torch.arange(n)[rows]
        return PreferencePairs(ratio["c"], ratio["r"], policy["c"][rows], policy["r"][rows], lengths["c"][rows],
                               lengths["r"][rows], torch.zeros(len(index), dtype=torch.float64), averaged=averaged,
                               step=step, step_index=None if step is None else index)

    step = PreferencePairs(**{f: getattr(pairs_of(None), f).detach() for f in PAIR_TENSORS}, averaged=averaged)
    per_token = {side: (policy[side] / scale[side]).detach().tolist() for side in "cr"}
    ref_per_token = {side: (reference[side] / scale[side]).tolist() for side in "cr"}
    ratios = {side: [p - q for p, q in zip(per_token[side], ref_per_token[side])] for side in "cr"}
    margins = sorted(a - b for a, b in zip(per_token["c"], per_token["r"]))
    ref_margins = sorted(a - b for a, b in zip(ref_per_token["c"], ref_per_token["r"]))
    expected = {
        "aot": sum(smoothed_logistic(BETA * (m - q)) for m, q in zip(margins, ref_margins)),
        "aot_pair": sum(smoothed_logistic(BETA * (c - r)) for c, r in zip(sorted(ratios["c"]), sorted(ratios["r"]))),
    }
    live = pairs_of(None)
    direct = {
        "aot": (live.policy_margin.sort().values - (live.policy_margin - live.margin).detach().sort().values),
        "aot_pair": live.chosen_logratios.sort().values - live.rejected_logratios.sort().values,
    }
    for name in ("aot", "aot_pair"):
        x = BETA * direct[name]
        eps = PARAMS["label_smoothing"]
        gradient = torch.autograd.grad((-(1 - eps) * torch.nn.functional.logsigmoid(x)
                                        - eps * torch.nn.functional.logsigmoid(-x)).sum(), (policy["c"], policy["r"]))
        for size in (1, 3, n):
            shares = [values(name, pairs_of(slice(i, i + size), step)) for i in range(0, n, size)]
            total = torch.cat(shares).sum()
            assert total.item() == pytest.approx(expected[name], rel=1e-12)
            got = torch.autograd.grad(total, (policy["c"], policy["r"]))
            for a, b in zip(got, gradient):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_aot_losses_of_a_one_pair_step_are_dpo() -> None:
    single = random_pairs(n=1, seed=2)
    for name in ("aot", "aot_pair"):
        torch.testing.assert_close(values(name, single), values("dpo", single))


@pytest.mark.parametrize("name", ALL)
def test_edge_cases_stay_finite(name: str) -> None:
    """Extreme margins (±1e4, and a policy log-prob a hair below 0), equal log-probs, empty responses."""
    n = 5
    ones = torch.ones(n, dtype=torch.float64)
    margins = torch.tensor([0.0, 1e4, -1e4, 50.0, -50.0], dtype=torch.float64)
    cases = (
        (margins, -margins, -3.5 * ones - margins.abs(), torch.tensor([-1e-9, -3.5, -1e4, -3.5, -3.5], dtype=torch.float64), 7 * ones),
        (-2 * ones, -2 * ones, -3.5 * ones, -3.5 * ones, 7 * ones),
        (margins, 0 * ones, 0 * ones, 0 * ones, 0 * ones),
    )
    for chosen, rejected, chosen_logps, rejected_logps, lengths in cases:
        inputs = [t.clone().requires_grad_(True) for t in (chosen, rejected, chosen_logps, rejected_logps)]
        pairs = PreferencePairs(*inputs, chosen_lengths=lengths, rejected_lengths=lengths, gt_margin=ones)
        out = values(name, pairs)
        assert torch.isfinite(out).all(), (name, out)
        out.sum().backward()
        assert all(torch.isfinite(x.grad).all() for x in inputs if x.grad is not None), name


def test_equal_log_probs_give_the_papers_value_at_zero_margin() -> None:
    n = 3
    zero, lengths, logps = torch.zeros(n, dtype=torch.float64), torch.full((n,), 4.0, dtype=torch.float64), torch.full((n,), -4.0, dtype=torch.float64)
    pairs = PreferencePairs(zero, zero, logps, logps, lengths, lengths, zero)
    eps = PARAMS["label_smoothing"]
    assert torch.allclose(values("dpo", pairs), torch.full((n,), math.log(2), dtype=torch.float64))  # ε cancels at Δ = 0
    assert torch.allclose(values("robust", pairs), torch.full((n,), (1 - 2 * eps) * math.log(2) / (1 - 2 * eps), dtype=torch.float64))
    assert torch.allclose(values("hinge", pairs), torch.ones(n, dtype=torch.float64))
    assert torch.allclose(values("apo_zero", pairs), torch.ones(n, dtype=torch.float64))
    assert torch.allclose(values("simpo", pairs), torch.full((n,), -log_sigmoid(-PARAMS["simpo_gamma"]), dtype=torch.float64))
    assert torch.allclose(values("orpo", pairs), torch.full((n,), 1.0 + PARAMS["orpo_lambda"] * math.log(2), dtype=torch.float64))


def test_a_weighted_combination_is_the_weighted_sum_and_reports_each_loss() -> None:
    pairs = random_pairs()
    terms = build_preference_terms(["dpo", "simpo", "orpo"], [1.0, 0.5, 2.0], PARAMS, key="model.dpo.preference_loss")
    total, metrics = combined_preference_loss(pairs, terms, beta=BETA, state={})
    expected = values("dpo", pairs) + 0.5 * values("simpo", pairs) + 2.0 * values("orpo", pairs)
    torch.testing.assert_close(total, expected)
    assert {"dpo_loss", "simpo_loss", "orpo_loss", "simpo_margin", "orpo_log_odds_ratio", "orpo_nll"} <= set(metrics)
    torch.testing.assert_close(metrics["simpo_loss"], values("simpo", pairs))
    torch.testing.assert_close(metrics["simpo_margin"], pairs.chosen_avg_logps - pairs.rejected_avg_logps)


def test_simpo_orpo_and_cpo_are_the_reference_free_losses() -> None:
    assert REFERENCE_FREE == {"simpo", "orpo", "cpo"}


def test_combinations_are_validated_at_start_up() -> None:
    with pytest.raises(ValueError, match="model.dpo.preference_loss_weights"):
        DPOLossConfig(preference_loss=["dpo", "simpo"], preference_loss_weights=[1.0])
    with pytest.raises(ValueError, match="model.dpo.preference_loss_weights"):
        DPOLossConfig(preference_loss=["dpo", "simpo"], preference_loss_weights=[0.0, 0.0])
    with pytest.raises(ValueError, match="model.dpo.preference_loss="):
        DPOLossConfig(preference_loss=["dpo", "dpo"])
    with pytest.raises(ValueError, match="model.dpo.loss_params.label_smoothing"):
        PreferenceLossParams(label_smoothing=0.5)
    with pytest.raises(ValueError, match="model.dpo.preference_loss='kto' is invalid"):
        build_preference_terms(["dpo", "kto"], [1.0, 1.0], PARAMS, key="model.dpo.preference_loss")


# ------------------------------------------------------------------------------------- through the model
def dpo_policy(model_dir: str, data: str, loss: object, micro_batch_size: int = 2, **dpo: object):  # noqa: ANN201
    from helpers import FP32, pretrained
    from nemo_aligner.config.dpo import DataPrefix, DPOModelConfig, PreferenceDataConfig
    from nemo_aligner.models.nlp.gpt.gpt_dpo_model import GPTDPOModel

    cfg = DPOModelConfig(micro_batch_size=micro_batch_size, global_batch_size=4, seed=7, encoder_seq_length=32,
                         dpo=DPOLossConfig(preference_loss=loss, **dpo),
                         data=PreferenceDataConfig(data_prefix=DataPrefix(train=data, validation=data)))
    policy = GPTDPOModel(cfg, pretrained(model_dir), FP32)
    policy.setup_optimizer(max_steps=8)
    return policy


def batches(policy, data: str, n: int) -> list[dict]:  # noqa: ANN001
    from helpers import loader_args
    from nemo_aligner.data.builders import build_preference_loader

    loader = build_preference_loader(data, shuffle=False, micro_batch_size=policy.cfg.micro_batch_size,
                                     **loader_args(policy, policy.cfg))
    return [loader.next_batch()[0] for _ in range(n)]


def steps(policy, data: str, n: int) -> list[dict[str, float]]:  # noqa: ANN001
    out = []
    for batch in batches(policy, data, n):
        out.append(policy.loss_and_metrics(batch, forward_only=False))
        policy.optimizer_step(1.0)
    return out


@pytest.mark.parametrize("loss", ["simpo", "orpo", "cpo", ["simpo", "orpo"]])
def test_reference_free_losses_never_compute_a_reference(loss: object, llama_dir: str, tmp_path) -> None:
    from helpers import write_pairs
    from nemo_aligner.reference import NoReference

    data = write_pairs(str(tmp_path / "pairs.jsonl"), 8)
    policy = dpo_policy(llama_dir, data, loss)
    assert isinstance(policy.reference, NoReference)
    calls = []
    original = policy.engine.logprobs
    policy.engine.logprobs = lambda micro_batches: calls.append(1) or original(micro_batches)  # the reference's only road
    with pytest.raises(RuntimeError, match="reference-free"):
        policy.reference_logps(batches(policy, data, 1)[0])
    metrics = steps(policy, data, 2)
    assert calls == [] and all(math.isfinite(m["loss"]) for m in metrics)
    if loss == "simpo":
        assert "simpo_margin" in metrics[0]
    if isinstance(loss, list):
        assert {"simpo_loss", "orpo_loss", "orpo_log_odds_ratio"} <= set(metrics[0])
    with pytest.raises(ValueError, match="reference-free and computes no reference"):
        from nemo_aligner.config.schema import ReferenceConfig, ReferenceStrategy

        dpo_policy(llama_dir, data, loss, reference=ReferenceConfig(strategy=ReferenceStrategy.swap))


def test_aot_trains_alike_whatever_the_micro_batches_and_scores_the_step_first(llama_dir: str, tmp_path) -> None:
    """A step of 4 pairs in micro-batches of 1 and of 4 gives the same losses and metrics, since every
    micro-batch ranks its pairs among the whole step's, which the model scores without gradients first."""
    from helpers import write_pairs
    from nemo_aligner.config.schema import ReferenceConfig, ReferenceStrategy

    data = write_pairs(str(tmp_path / "pairs.jsonl"), 8)
    runs = {}
    for size in (1, 4):
        policy = dpo_policy(llama_dir, data, ["aot", "aot_pair"], micro_batch_size=size,
                            reference=ReferenceConfig(strategy=ReferenceStrategy.swap))
        scored = []
        original = policy.step_pairs
        policy.step_pairs = lambda batch: scored.append(1) or original(batch)
        runs[size] = steps(policy, data, 2)
        assert scored == [1, 1]
    assert sorted(runs[1][0]) == sorted(runs[4][0]) and {"aot_loss", "aot_pair_loss"} <= set(runs[1][0])
    for one, four in zip(runs[1], runs[4]):
        assert one == pytest.approx(four, rel=1e-5, abs=1e-6)


def test_bco_reward_mean_is_the_running_mean_of_the_rewards_and_resumes(llama_dir: str, tmp_path) -> None:
    from helpers import write_pairs
    from nemo_aligner.config.schema import ReferenceConfig, ReferenceStrategy

    data = write_pairs(str(tmp_path / "pairs.jsonl"), 16)
    swap = dict(reference=ReferenceConfig(strategy=ReferenceStrategy.swap))
    policy = dpo_policy(llama_dir, data, "bco_pair", **swap)
    four = batches(policy, data, 4)

    def step(model, batch: dict) -> dict[str, float]:  # noqa: ANN001
        metrics = model.loss_and_metrics(batch, forward_only=False)
        model.optimizer_step(1.0)
        return metrics

    metrics = [step(policy, batch) for batch in four[:3]]
    means = [m["rewards_all_mean"] for m in metrics]  # every step has the same number of rewards
    assert metrics[0]["bco_reward_mean"] == 0.0  # δ of a step is the mean of the steps before it
    assert metrics[2]["bco_reward_mean"] == pytest.approx(sum(means[:2]) / 2)
    assert policy.loss_state["bco_reward_mean"][0] == pytest.approx(sum(means) / 3)
    state, path = policy.state_dict(), str(tmp_path / "ckpt")
    policy.save(path)
    expected = step(policy, four[3])
    resumed = dpo_policy(llama_dir, data, "bco_pair", **swap)
    resumed.load(path)
    resumed.load_state_dict(state)
    assert step(resumed, four[3]) == pytest.approx(expected, rel=1e-6)
