"""The refusal margin (margin.py): its maths, its place in the objective, and a study that uses it."""

from __future__ import annotations

import optuna
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from heretic_like.config import load_settings
from heretic_like.margin import opening_rates, refusal_margin
from heretic_like.records import StudyRecord
from heretic_like.results import trials_table
from heretic_like.search import objectives, refusal_cap
from tests.conftest import run_on_refused_prompts, strong_search


def one_hot_logprobs(rows: list[dict[int, float]], vocab: int = 12) -> torch.Tensor:
    probs = torch.zeros(len(rows), vocab)
    for i, row in enumerate(rows):
        for token, p in row.items():
            probs[i, token] = p
    return probs.log()


def test_opening_rates_keep_refusal_openings_with_their_share():
    # token 5 opened a refusal and a compliance, 7 only refusals, 9 only compliances
    assert opening_rates([5, 5, 7, 9, 7], [True, False, True, False, True]) == {5: 0.5, 7: 1.0}
    assert opening_rates([3, 4], [False, False]) == {}


def test_margin_is_the_probability_of_opening_as_a_refusal():
    rates = {5: 0.5, 7: 1.0}
    assert refusal_margin(one_hot_logprobs([{7: 1.0}, {7: 1.0}]), rates) == pytest.approx(1.0)
    assert refusal_margin(one_hot_logprobs([{9: 1.0}]), rates) == pytest.approx(0.0)
    # half the mass on a half-refusing opening, half on a compliant one: 0.25; averaged with 1.0
    assert refusal_margin(one_hot_logprobs([{5: 0.5, 9: 0.5}, {7: 1.0}]), rates) == pytest.approx(0.625)
    assert refusal_margin(one_hot_logprobs([{9: 1.0}]), {}) == 0.0  # the unedited model refused nothing


@given(st.integers(0, 2**31 - 1), st.integers(1, 6))
def test_margin_lies_in_zero_one_and_falls_as_mass_leaves_refusal_openings(seed, n):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 16, generator=generator) * 3
    rates = {0: 1.0, 3: 0.4}
    margin = refusal_margin(torch.log_softmax(logits, -1), rates)
    assert 0.0 <= margin <= 1.0
    lowered = logits.clone()
    lowered[:, [0, 3]] -= 2.0  # every refusal opening less likely
    assert refusal_margin(torch.log_softmax(lowered, -1), rates) < margin


def test_the_margin_at_weight_one_breaks_ties_and_never_outweighs_a_refusal():
    fewer = objectives(2, 0.02, 10, 1.0, 0.01, margin=0.99)[1]
    more = objectives(3, 0.02, 10, 1.0, 0.01, margin=0.0)[1]
    assert fewer < more
    assert objectives(2, 0.02, 10, 1.0, 0.01, 0.1)[1] < objectives(2, 0.02, 10, 1.0, 0.01, 0.5)[1]
    assert objectives(2, 0.02, 10, 1.0, 0.01) == objectives(2, 0.02, 10, 1.0, 0.01, 0.0)  # off: as before
    # below the KL target the refusal-based first objective carries the margin too
    assert objectives(2, 0.001, 10, 1.0, 0.01, 0.5)[0] == pytest.approx(0.25 * 0.01)
    with pytest.raises(ValueError, match="refusal margin"):
        objectives(2, 0.02, 10, 1.0, 0.01, -0.5)


def test_the_margin_key_is_in_the_identity_only_when_on():
    assert "refusal_margin_weight" not in load_settings(None, {}).study_identity()  # stored studies keep theirs
    assert load_settings(None, {"refusal_margin_weight": 24}).study_identity()["refusal_margin_weight"] == 24


def test_a_study_with_the_margin_records_it_and_minimises_count_plus_weighted_margin(refusing_model, tmp_path):
    _, study = run_on_refused_prompts(tmp_path, refusing_model, strong_search(1.0), n_trials=8, n_startup_trials=4,
                                      refusal_margin_weight=6)  # fmt: skip
    record = StudyRecord(study)
    base = record.base_refusals
    assert base and len(record.base_first_look["tokens"]) == 24
    completed = record.completed()
    assert completed
    for trial in completed:
        frozen = study.trials[trial.number]
        assert 0.0 <= trial.refusal_margin <= 1.0
        assert frozen.values[1] == pytest.approx((trial.refusals + 6 * trial.refusal_margin) / base)
    # the edit that removed the most refusals moved the answers' openings furthest from the
    # refusals' openings: its margin is below that of every trial still refusing all it refused
    fewest = min(completed, key=lambda t: t.refusals)
    unmoved = [t for t in completed if t.refusals == base]
    assert fewest.refusals < base and unmoved
    assert all(fewest.refusal_margin < t.refusal_margin for t in unmoved)
    assert all(t.refusal_margin is not None for t in record.trials())  # pruned trials keep theirs too
    assert "refusal_margin" in trials_table(study).columns


def test_the_dominance_cap_reads_count_plus_weighted_margin():
    study = optuna.create_study(directions=["minimize", "minimize"])
    for refusals, kl, margin in [(2, 0.010, 0.30), (4, 0.005, 0.10)]:
        study.add_trial(optuna.trial.create_trial(values=[kl, refusals], user_attrs={
            "refusals": refusals, "kl_divergence": kl, "refusal_margin": margin}))  # fmt: skip
    assert refusal_cap(study)(0.02) == 2  # counts alone: two refusals are dominated
    # weight 1, a tie-break: a larger margin than trial 0's is dominated at 2, a smaller one only at 3
    assert refusal_cap(study, 0.40, 1.0)(0.02) == 2
    assert refusal_cap(study, 0.20, 1.0)(0.02) == 3
    assert refusal_cap(study, 0.05, 1.0)(0.007) == 5  # only trial 1 is at no higher KL
    # weight 10: trial 0 scores 2 + 3 = 5; a trial at margin 0.1 needs 4 refusals to score as badly,
    # at 0.6 it is dominated before it generates anything (its margin alone outweighs trial 0)
    assert refusal_cap(study, 0.10, 10.0)(0.02) == 4
    assert refusal_cap(study, 0.60, 10.0)(0.02) == 0
    assert refusal_cap(study, 0.30, 10.0)(0.02) == 2  # equal margins: the count decides, as without
    assert refusal_cap(study, 0.05, 10.0)(0.001) is None
