import pytest
import torch
import torch.nn.functional as F

from heretic_like.capability import (
    answer_matches,
    choice_questions,
    choice_scores,
    continuation_logprobs,
    free_form_tasks,
)
from heretic_like.cli import main
from heretic_like.model import load_model
from heretic_like.prompts import builtin_path
from tests.conftest import COMPLIANCE, REFUSAL, study_config
from tests.test_model import settings_for


def test_builtin_sets_are_well_formed():
    questions, tasks = choice_questions(), free_form_tasks()
    assert len(questions) == 50 and len(tasks) == 25
    assert all(len(q["choices"]) == 4 and 0 <= q["answer"] < 4 for q in questions)
    assert len({q["answer"] for q in questions}) == 4  # right answers are spread over the positions
    assert all(t["answers"] for t in tasks)
    assert len(builtin_path("edgy").read_text().splitlines()) == 40


def test_continuation_logprobs_match_a_plain_forward_and_ignore_batching(tiny_llama, tmp_path):
    loaded = load_model(settings_for(tiny_llama, tmp_path))
    contexts, continuations = ["Sure, here", "You are a helpful"], [" is a simple answer.", " assistant."]
    batched = continuation_logprobs(loaded, contexts, continuations, batch_size=2)
    for (logprob, n), context, continuation in zip(batched, contexts, continuations, strict=True):
        head = loaded.tokenizer(context, add_special_tokens=False)["input_ids"]
        tail = loaded.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = loaded.model(torch.tensor([head + tail], device=loaded.device)).logits[0].float()
        manual = sum(float(F.log_softmax(logits[len(head) + i - 1], -1)[t]) for i, t in enumerate(tail))
        assert n == len(tail) and logprob == pytest.approx(manual, abs=1e-4)


def test_choice_scoring_picks_what_the_model_was_trained_to_say(refusing_model, tmp_path):
    loaded = load_model(settings_for(refusing_model, tmp_path))
    harmful = builtin_path("harmful").read_text().splitlines()[:10]
    harmless = builtin_path("harmless").read_text().splitlines()[:10]
    questions = [{"question": p, "choices": [COMPLIANCE, REFUSAL], "answer": 1} for p in harmful]
    questions += [{"question": p, "choices": [REFUSAL, COMPLIANCE], "answer": 1} for p in harmless]
    scores = choice_scores(loaded, questions, "You are a helpful assistant.", batch_size=7)
    assert scores["choice_accuracy"] >= 0.9
    flipped = [{**q, "answer": 0} for q in questions]
    assert choice_scores(loaded, flipped, "You are a helpful assistant.", 7)["choice_accuracy"] <= 0.1
    assert scores["choice_loglik"] > choice_scores(loaded, flipped, "You are a helpful assistant.", 7)["choice_loglik"]


@pytest.mark.parametrize("response, answers, ok", [
    ("42", ["42"], True),
    ("**42**.", ["42"], True),
    ("42 is the answer", ["42"], True),
    ("420", ["42"], False),
    ("The answer is 42", ["42"], False),  # only the first line's start counts
    ("<think>maybe 41</think>\n42", ["42"], True),
    ("Merci!", ["merci"], True),
    ("A", ["A"], True),
    ("Apple", ["A"], False),
])  # fmt: skip
def test_answer_matching(response, answers, ok):
    assert answer_matches(response, answers, [("<think>", "</think>")]) is ok


def test_evaluate_command_compares_and_fills_the_model_card(refusing_model, tmp_path, capsys):
    # The run itself evaluates the chosen trial before exporting it: the card carries the table.
    config = study_config(tmp_path, refusing_model, n_trials=2, n_startup_trials=2, export_trial=0,
                          export_dir=f'"{tmp_path / "export"}"', prune_dominated="false")  # fmt: skip
    assert main(["--config", str(config)]) == 0
    card = (tmp_path / "export" / "README.md").read_text()
    assert "## Capability evaluation" in card and "multiple choice accuracy" in card
    assert list((tmp_path / "checkpoints").glob("*.capability-trial0.csv"))

    # A model against itself: every delta is exactly zero.
    same = tmp_path / "same"
    assert main(["evaluate", "--config", str(config), "--compare", str(refusing_model), "--out", str(same)]) == 0
    import pandas as pd

    table = pd.read_csv(same / "capability.csv")
    assert set(table["metric"]) >= {"multiple choice accuracy", "free-form tasks solved",
                                    "over-refusal (benign, edgy wording)"}  # fmt: skip
    assert (table["delta"] == 0).all() and table["base"].between(-100, 1).all()

    # Against the export: written into its folder, the card's section replaced, not duplicated.
    assert main(["evaluate", "--config", str(config), "--compare", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "capability.md").is_file()
    assert (tmp_path / "export" / "README.md").read_text().count("## Capability evaluation") == 1


def test_lm_eval_tasks_without_the_package_fail_in_one_line(tiny_llama, tmp_path, capsys):
    pytest.importorskip("torch")
    try:
        import lm_eval  # noqa: F401

        pytest.skip("lm-eval is installed here")
    except ImportError:
        pass
    assert main(["evaluate", "--model", str(tiny_llama), "--compare", str(tiny_llama), "--dtypes", '["float32"]',
                 "--lm-eval-tasks", '["arc_easy"]', "--out", str(tmp_path / "o")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("error: lm_eval_tasks need the lm-eval package") and len(err.strip().splitlines()) == 1


def test_evaluate_detects_a_reasoning_models_thinking_block(thinking_model, tmp_path, capsys):
    from tests.conftest import THINKING

    args = ["evaluate", "--model", str(thinking_model), "--compare", str(thinking_model), "--dtypes", '["float32"]']
    assert main([*args, "--out", str(tmp_path / "auto")]) == 0
    assert f"measuring after {THINKING!r}" in capsys.readouterr().out  # "auto" is detected here too
    assert main([*args, "--response-prefix", '""', "--out", str(tmp_path / "none")]) == 0
    assert "measuring after" not in capsys.readouterr().out
