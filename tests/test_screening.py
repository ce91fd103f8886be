"""Multi-fidelity trials: the first look, the proxy, the screening rule, honest counts on the front."""

from __future__ import annotations

import optuna
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from heretic_like.cli import main
from heretic_like.config import load_settings
from heretic_like.detectors import MarkerDetector
from heretic_like.evaluation import Evaluator
from heretic_like.model import chat_texts, load_model
from heretic_like.records import StudyRecord
from heretic_like.results import ExportRule, choose_trial, pareto_front, recount_order
from heretic_like.screening import (
    MIN_CALIBRATION,
    Observed,
    OpeningRates,
    ScreeningOptions,
    Shadowed,
    proxy_probabilities,
    rank_correlation,
    replay_screening,
    screen_reason,
    screening_margin,
)
from heretic_like.store import settings_of
from tests.conftest import run_on_refused_prompts, strong_search
from tests.test_model import settings_for


def test_first_look_equals_a_plain_forward_at_the_same_positions(tiny_llama, tmp_path):
    """The proxy reads the same next-token log-probs a plain, unbatched forward gives, by the
    prompts' original positions whatever order the evaluator scores them in; the KL is the one
    `score` measures."""
    loaded = load_model(settings_for(tiny_llama, tmp_path))
    harmful = ["harmful one", "a much longer harmful request two", "three", "four and more words"]
    evaluator = Evaluator(loaded, harmful, ["fine one", "fine two"], None, MarkerDetector(("sorry",)), 4, 3)
    evaluator.prioritize([2, 0])
    direction = torch.randn(loaded.model.config.hidden_size)
    look = evaluator.first_look((1, direction))
    kl, logprobs = look.kl_divergence, look.harmful_logprobs
    assert logprobs.shape == (4, loaded.model.config.vocab_size) and look.seconds > 0
    for position, prompt in enumerate(harmful):
        ids = loaded.tokenizer(chat_texts(loaded.tokenizer, [prompt], None), return_tensors="pt")
        with torch.no_grad():
            out = loaded.model(**ids, output_hidden_states=True)
        plain = F.log_softmax(out.logits[0, -1].float(), -1)
        assert torch.allclose(logprobs[position], plain, atol=1e-4)
        # hidden_states[i + 1] is what layer i writes; projected on the unit direction
        projection = out.hidden_states[2][0, -1].float() @ (direction / direction.norm())
        assert float(look.projections[position]) == pytest.approx(float(projection), abs=1e-4)
    plain = evaluator.score()
    assert kl == pytest.approx(plain.kl_divergence, abs=1e-6)
    # generating from the look's KV caches gives the responses a fresh prefill gives
    assert set(look.prefilled) and len(look.prefilled) == len(harmful)
    reused = evaluator.score(first_look=look)
    assert reused.responses == plain.responses and reused.kl_divergence == kl


def test_prefilled_caches_are_the_prefills_own(tiny_llama, tmp_path):
    """The KV caches the first look keeps equal, position by position, what a generation
    batch's own prefill computes for the same prompts."""
    from heretic_like.generation import SharedPrefix, first_token_look

    loaded = load_model(settings_for(tiny_llama, tmp_path))
    texts = chat_texts(loaded.tokenizer, ["one", "a longer request two", "three three", "fine"], None)
    rows = loaded.tokenizer(texts, add_special_tokens=False)["input_ids"]
    _, _, prefilled = first_token_look(loaded, texts, 2, keep=range(1, 4))
    assert set(prefilled) == {tuple(r) for r in rows[1:]}
    fresh = SharedPrefix(loaded, rows[1:]).prefill(rows[1:])
    reused = SharedPrefix(loaded, rows[1:], prefilled).prefill(rows[1:])
    for a, b in zip(fresh.layers, reused.layers, strict=True):
        assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)


def test_opening_rates_and_the_proxy():
    rates = OpeningRates()
    rates.update([5, 5, 7, 9], [True, True, False, True])
    rates.update([5], [False])
    assert rates.rate(5) == pytest.approx(2 / 3) and rates.rate(7) == 0 and rates.rate(9) == 1
    assert rates.rate(3) == 0  # never seen opening a response: predicted compliant, so generated
    # leave-one-out: a response's own verdict does not count towards its token's rate
    assert rates.rate(5, True) == pytest.approx(1 / 2) and rates.rate(5, False) == 1.0
    assert rates.rate(9, True) == 0.0  # its only response left out: unseen

    # a history with no refusal at all: the opening rates alone (all 0, nothing to learn from)
    quiet = [Observed([1, 2, 3], None, [False, False, False])]
    assert proxy_probabilities(quiet, [1, 4], None).tolist() == [0.0, 0.0]
    # openings that separate refusals from answers: the fitted proxy orders by them, and a
    # projection that also separates them sharpens it
    history = [Observed([5, 5, 5, 7, 7, 7, 5, 7], [3.0, 2.5, 2.8, -1.0, -0.5, -0.8, 0.5, 0.2],
                        [True, True, True, False, False, False, True, False])]  # fmt: skip
    p = proxy_probabilities(history, [5, 7, 8], None)
    assert p[0] > 0.5 > p[1] and p[2] < 0.5
    with_projection = proxy_probabilities(history, [5, 5], [3.0, -1.0])
    assert with_projection[0] > with_projection[1]


@given(st.floats(0, 64), st.none() | st.integers(0, 64), st.none() | st.floats(1, 20))
def test_screening_never_drops_a_trial_the_proxy_puts_on_the_front(predicted, cap, margin):
    """Screened out only if even `margin` fewer refusals than predicted reach the dominance cap."""
    reason = screen_reason(predicted, cap, margin)
    if cap is None or margin is None or predicted - margin < cap:
        assert reason is None
    else:
        assert reason is not None and f"{cap}" in reason


def test_margin_needs_calibration_and_covers_the_errors():
    assert screening_margin([0.5] * (MIN_CALIBRATION - 1)) is None
    errors = [0.0, 1.0, -2.0, 3.0, 0.5, 2.0, 1.0, 0.0]
    margin = screening_margin(errors)
    assert margin >= max(1.0, pd.Series(errors).quantile(0.95) + 1) and margin > 3.0
    assert screening_margin(errors, extra=-0.5) == pytest.approx(margin - 1.5)  # the audit's smaller margins
    assert screening_margin([-2.0] * MIN_CALIBRATION) == 1.0  # an over-predicting proxy still keeps one refusal
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)


def test_replaying_the_rule_on_a_fully_generated_study():
    """What screening would have decided on a study where every trial was generated: nothing
    while the margin is uncalibrated or inside the startup trials, then only trials predicted
    dominated even with the margin; a screened trial moves no later cap."""
    calibrating = [Shadowed(n, kl=0.1 + n / 100, predicted=10.0 + n % 2, refusals=10) for n in range(6)]
    assert replay_screening(calibrating, startup=0) == {}  # six errors are needed first
    later = [
        Shadowed(6, kl=0.5, predicted=30.0, refusals=29),  # dominated even with the margin: screened
        Shadowed(7, kl=0.01, predicted=30.0, refusals=29),  # no finished trial at lower KL: generated
        Shadowed(8, kl=0.6, predicted=11.0, refusals=3),  # within the margin of the cap: generated
        Shadowed(9, kl=0.7, predicted=30.0, refusals=None, refusals_at_least=3),  # dominated by trial 8
    ]
    screened = replay_screening(calibrating + later, startup=0)
    assert sorted(screened) == [6, 9] and "10 at no higher KL" in screened[6] and "3 at no higher KL" in screened[9]
    assert replay_screening(calibrating + later, startup=10) == {}  # the first ten are always generated
    # a screened trial was never counted, so its (here wrongly predicted) 2 refusals are no cap:
    # a later trial at KL 0.55 meets cap 10, and 11.5 - 2 < 10 is generated
    wrong = Shadowed(6, kl=0.5, predicted=30.0, refusals=2)
    again = replay_screening([*calibrating, wrong, Shadowed(10, kl=0.55, predicted=11.5, refusals=12)], 0)
    assert sorted(again) == [6]


def test_startup_and_audited_trials_are_drawn_the_same_on_resume():
    options = ScreeningOptions(True, startup=5, audit_fraction=0.25, seed=3)
    assert all(options.audited(n) for n in range(5))
    drawn = [options.audited(n) for n in range(5, 400)]
    assert 0.15 < sum(drawn) / len(drawn) < 0.35
    assert drawn == [ScreeningOptions(True, 5, 0.25, 3).audited(n) for n in range(5, 400)]


def test_export_rule_reads_the_long_counts_on_the_front():
    """Trial 1 looks best on 32-token responses but refuses more when counted long: the rule
    takes trial 0, by the long counts, and says so."""
    table = pd.DataFrame({"trial": [0, 1, 2], "refusals": [3, 2, 9], "kl_divergence": [0.02, 0.021, 0.01],
                          "refusals_long": pd.array([3, 6, 9], dtype="Int64")})  # fmt: skip
    for rule in ("balanced", "fewest_refusals"):
        choice = choose_trial(table, ExportRule(rule, 0.1, 0.2, 20))
        assert choice.trial == 0 and "long responses" in choice.reason
    short = choose_trial(table.drop(columns="refusals_long"), ExportRule("fewest_refusals", 0.1, 0.2, 20))
    assert short.trial == 1


def test_the_balanced_reason_compares_with_a_trial_counted_alike():
    """A front trial the recount skipped has only a short count (a lower bound): the reason's "n
    fewer refusals" comparison must not read it against the chosen trial's long count."""
    table = pd.DataFrame({"trial": [0, 1, 2], "refusals": [1, 3, 2], "kl_divergence": [0.08, 0.02, 0.05],
                          "refusals_long": pd.array([None, 4, 2], dtype="Int64")})  # fmt: skip
    choice = choose_trial(table, ExportRule("balanced", 0.1, 0.2, 20))
    assert choice.trial == 1
    assert "trial 2 has 2 fewer refusals but 2.5x the KL" in choice.reason and "trial 0" not in choice.reason


@given(st.lists(st.tuples(st.integers(0, 30), st.floats(0.0, 0.2), st.integers(0, 10)), min_size=1, max_size=12),
       st.sampled_from(["balanced", "fewest_refusals"]))
def test_recounting_the_front_best_bound_first_picks_what_recounting_all_would(rows, rule_name):
    """However many more refusals the long responses find, stopping the recount at the first bound
    above the best long score measured leaves the rule's choice what it is with every trial counted."""
    rule = ExportRule(rule_name, 0.1, 0.2, 20)
    table = pd.DataFrame({"trial": range(len(rows)), "refusals": [r for r, _, _ in rows],
                          "kl_divergence": [k for _, k, _ in rows]})  # fmt: skip
    extra = {t: rows[t][2] for t in range(len(rows))}  # refusals only the long responses find
    front = pareto_front(table)
    full = table.assign(refusals_long=pd.array([r + extra[t] if t in set(front["trial"]) else None
                                                for t, r in enumerate(table["refusals"])], dtype="Int64"))  # fmt: skip
    counted, best = {}, float("inf")
    for number, bound in recount_order(front, rule):
        assert bound == pytest.approx(float(rule.score(table["refusals"][number], table["kl_divergence"][number])))
        if bound > best:
            break
        counted[number] = table["refusals"][number] + extra[number]
        best = min(best, float(rule.score(counted[number], table["kl_divergence"][number])))
    partial = table.assign(refusals_long=pd.array([counted.get(t) for t in range(len(rows))], dtype="Int64"))
    assert choose_trial(partial, rule).trial == choose_trial(full, rule).trial


@pytest.fixture(scope="module")
def screened_study(refusing_model, tmp_path_factory):
    """A study long enough for screening to calibrate and act on the trained refusing model."""
    tmp = tmp_path_factory.mktemp("screening")
    return run_on_refused_prompts(tmp, refusing_model, strong_search(0.0), n_trials=22, n_startup_trials=4,
                                  screening_audit_fraction=0.0, screen_trials="true")  # fmt: skip


def test_a_study_screens_trials_and_keeps_startup_and_front_honest(screened_study):
    config, study = screened_study
    record = StudyRecord(study)
    trials = record.trials()
    screened = [t for t in trials if t.screened]
    assert screened, "no trial was screened out"
    assert all(t.state == optuna.trial.TrialState.PRUNED and t.predicted_refusals is not None
               and t.kl_divergence is not None and t.edit_dict for t in screened)  # fmt: skip
    assert all(not t.screened for t in trials if t.number < 4)  # startup trials are always generated
    base = record.base_first_look
    assert len(base["tokens"]) == len(base["projections"]) == 24
    # the front's trials were counted again with long responses, best bound first, until no other
    # could be picked; no trial off the front was
    from heretic_like.results import trials_table

    settings = settings_of(study)
    rule = ExportRule.of(settings, study)
    table = trials_table(study)
    front = pareto_front(table)
    assert set(table.loc[table["refusals_long"].notna(), "trial"]) <= set(front["trial"])
    long = {int(t): int(c) for t, c in zip(table["trial"], table["refusals_long"], strict=True) if not pd.isna(c)}
    assert long and all(record.front_recount(n, 24) == c for n, c in long.items())
    best = min(float(rule.score(c, table.set_index("trial").loc[n, "kl_divergence"])) for n, c in long.items())
    for number, bound in recount_order(front, rule):
        assert number in long or bound > best
    assert choose_trial(table, rule).trial in long


def test_a_study_with_screened_trials_resumes(screened_study, capsys):
    config, study = screened_study
    before = {t.number: (t.state, t.user_attrs.get("screened")) for t in study.trials}
    assert main(["--config", str(config), "--n-trials", "24"]) == 0
    again = optuna.load_study(study_name=study.study_name, storage=study._storage)
    after = {t.number: (t.state, t.user_attrs.get("screened")) for t in again.trials}
    assert {n: after[n] for n in before} == before and len(after) == 24  # nothing redone, two more trials
    assert "Resuming study" in capsys.readouterr().out


def test_screening_settings_load():
    settings = load_settings(None, {"screen_trials": True, "front_response_length": 128})
    assert settings.screen_trials and settings.front_response_length == 128
    assert ScreeningOptions.from_settings(settings).startup == settings.n_startup_trials
