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
from heretic_like.results import ExportRule, choose_trial
from heretic_like.screening import (
    MIN_CALIBRATION,
    OpeningRates,
    ScreeningOptions,
    predicted_refusals,
    rank_correlation,
    screen_reason,
    screening_margin,
)
from tests.conftest import study_config
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
    assert kl == pytest.approx(evaluator.score().kl_divergence, abs=1e-6)


def test_opening_rates_and_the_proxy():
    rates = OpeningRates()
    rates.update([5, 5, 7, 9], [True, True, False, True])
    rates.update([5], [False])
    table = rates.rates(12)
    assert table[5] == pytest.approx(2 / 3) and table[7] == 0 and table[9] == 1
    assert table[3] == 0  # never seen opening a response: predicted compliant, so generated
    logprobs = torch.full((2, 12), -1e9)
    logprobs[0, 9], logprobs[1, 7] = 0.0, 0.0  # certain openings
    assert predicted_refusals(logprobs, table) == pytest.approx(1.0)


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
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)


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


@pytest.fixture(scope="module")
def screened_study(refusing_model, tmp_path_factory):
    """A study long enough for screening to calibrate and act on the trained refusing model."""
    tmp = tmp_path_factory.mktemp("screening")
    config = study_config(tmp, refusing_model, n_trials=22, n_startup_trials=4, screening_audit_fraction=0.0,
                          screen_trials="true",
                          search="max_weight = { low = 0.0, high = 3.0 }\n"
                          "max_weight_position = { low = 0.0, high = 1.0 }\n"
                          "direction_index = { low = 0.0, high = 0.5 }\n"
                          "min_weight_distance = { low = 0.5, high = 1.0 }\n")  # fmt: skip
    # the prompts it was trained to refuse: it refuses all 24, and only strong edits lower that
    config.write_text(config.read_text().replace('split = "train[150:174]"', 'split = "train[:24]"'))
    assert main(["--config", str(config)]) == 0
    (journal,) = (tmp / "checkpoints").glob("*.journal")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    return config, optuna.load_study(study_name=None, storage=storage)


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
    # every trial on the front was counted again with long responses
    from heretic_like.results import pareto_front, trials_table

    front = pareto_front(trials_table(study))
    assert front["refusals_long"].notna().all()
    assert all(t.long_length == 24 for t in record.completed() if t.refusals_long is not None)


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
