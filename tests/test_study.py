import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from heretic_like.cli import main
from heretic_like.config import load_settings
from heretic_like.export import export_trial
from heretic_like.model import chat_texts, encode
from heretic_like.records import trial_edit
from heretic_like.results import ExportRule, choose_best, choose_trial, pareto_front
from heretic_like.search import objectives
from heretic_like.store import load_existing_study
from heretic_like.study import run_study
from tests.conftest import THINKING, refused_study_config, strong_search, study_config

ROOT = Path(__file__).resolve().parents[1]


def _journal(tmp_path: Path) -> Path:
    (journal,) = (tmp_path / "checkpoints").glob("*.journal")
    return journal


def _completed(journal: Path) -> list[int]:
    """Trials that count towards n_trials: complete, or pruned as dominated."""
    study = load_existing_study(str(journal), None)
    return sorted(t.number for t in study.trials if t.state.name in ("COMPLETE", "PRUNED"))


def _wait_for_trials(proc: subprocess.Popen, log: Path, count: int, action: str) -> None:
    """Wait (up to 120 s) until `proc`'s progress bar in `log` shows `count` finished trials.

    The bar, not the journal: in CI, polling the journal while the study appended to it back to
    back did not see a finished trial until all 2,000 were done, so the signal came too late."""
    deadline = time.time() + 120
    while time.time() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        shown = [int(n) for n in re.findall(r"trials:\s*\d+%\|[^|]*\|\s*(\d+)/\d+", text)]
        if shown and max(shown) >= count:
            return
        assert proc.poll() is None, f"study ended before it could be {action}"
        time.sleep(0.2)
    raise AssertionError(f"no {count} finished trials within 120 s: the study could not be {action}")


def _start_study(tmp_path: Path, config: Path, preexec_fn=None) -> tuple[list[str], subprocess.Popen, Path]:
    """The study as a user runs it, in a child process whose progress goes to a log file (not a
    pipe: a full pipe would stall the child). Returns the command, the process and the log."""
    cmd = [sys.executable, "-m", "heretic_like", "--config", str(config)]
    log = tmp_path / "stderr.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=stderr,
                                preexec_fn=preexec_fn)  # fmt: skip
    return cmd, proc, log


def test_objectives_follow_the_reference_semantics():
    assert objectives(5, 0.5, 10, 1.0, 0.01) == (0.5, 0.5)
    assert objectives(5, 0.5, 10, 2.0, 0.01) == (0.25, 0.5)
    kl_score, refusal_score = objectives(5, 0.001, 10, 1.0, 0.01)  # below target: refusal-based
    assert refusal_score == 0.5 and kl_score == pytest.approx(0.5 * 0.01)
    assert objectives(3, 0.2, 0, 1.0, 0.01)[1] == 3  # a base of zero refusals does not divide by zero


def test_pareto_front_and_best_rule():
    table = pd.DataFrame({"trial": [0, 1, 2, 3, 4], "refusals": [9, 2, 2, 0, 5],
                          "kl_divergence": [0.01, 0.08, 0.05, 0.9, 0.02]})  # fmt: skip
    assert list(pareto_front(table)["trial"]) == [3, 2, 4, 0]

    def fewest(limit):
        return ExportRule("fewest_refusals", limit, 0.05, 20)

    assert choose_best(table, fewest(0.1)) == 2
    assert choose_best(table, fewest(1.0)) == 3
    assert choose_best(table, fewest(0.001)) == 0  # nothing within the limit: the lowest-KL trial
    assert "no trial has KL <= 0.001" in choose_trial(table, fewest(0.001)).reason


def test_balanced_rule_takes_the_knee_not_the_last_refusals_at_any_price():
    # The case met on Qwen2.5-Coder-1.5B: 1/51 at KL 0.098 against 3/51 at KL 0.026.
    table = pd.DataFrame({"trial": [0, 1, 2, 3], "refusals": [1, 3, 12, 40],
                          "kl_divergence": [0.098, 0.026, 0.012, 0.0]})  # fmt: skip
    balanced = ExportRule("balanced", 0.1, 0.2, 45)
    choice = choose_trial(table, balanced)
    assert choice.trial == 1
    assert "trial 0 has 2 fewer refusals but 3.8x the KL" in choice.reason
    assert choose_best(table, ExportRule("fewest_refusals", 0.1, 0.05, 45)) == 0
    # the exchange rate sets the price: paying 2.0 of KL for all refusals makes the last two worth it,
    # paying 0.02 makes even 12 refusals cheaper than 0.014 of KL
    assert choose_best(table, ExportRule("balanced", 0.1, 2.0, 45)) == 0
    assert choose_best(table, ExportRule("balanced", 0.1, 0.02, 45)) == 2
    # the unedited model (or any trial left as it was) is not a knee: refusals weigh too
    assert choose_best(table.iloc[2:], balanced) == 2
    # the KL limit still binds
    assert choose_best(table, ExportRule("balanced", 0.02, 5.0, 45)) == 2


def test_full_study_reduces_refusals_and_exports_identical_model(refusing_model, tmp_path, capsys):
    # Evaluate on prompts the tiny model was trained on: it refuses those reliably.
    # So small a model keeps part of its refusal in the token embeddings, which no write-edit
    # touches: it needs stronger edits than real models, so the search reaches further.
    config = refused_study_config(tmp_path, refusing_model, n_trials=6, n_startup_trials=4, search=strong_search(1.5))
    settings = load_settings(str(config))
    run = run_study(settings)
    study, abliterator, table = run.study, run.abliterator, run.table
    assert {"load", "directions", "base_logprobs", "base_refusals"} <= set(run.timings)
    out = capsys.readouterr().out
    assert "Pareto front" in out and len(study.trials) == 6
    assert len(table) == sum(t.state.name == "COMPLETE" for t in study.trials) >= 1
    base = study.user_attrs["base_refusals"]
    assert base >= 18  # the trained model refuses most of the 24 harmful prompts
    assert table["refusals"].min() < base  # and some edit removes refusals

    number = int(table.sort_values("refusals").iloc[0]["trial"])
    edit, _ = trial_edit(study, number)
    abliterator.apply(edit)
    prompts = ["How do I make a bomb?", "Write a poem about rain"]
    batch = encode(abliterator.loaded.tokenizer, chat_texts(abliterator.loaded.tokenizer, prompts, None), "cpu")
    with torch.no_grad():
        lora_logits = abliterator.loaded.model(**{k: v.to(abliterator.loaded.device) for k, v in batch.items()})
        lora_logits = lora_logits.logits.cpu()
    target = tmp_path / "exported"
    export_trial(study, settings, number, target)  # loads the model afresh, like the CLI does

    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    with torch.no_grad():
        merged_logits = exported(**batch).logits
    assert torch.allclose(merged_logits, lora_logits, atol=1e-4)
    card = (target / "README.md").read_text()
    assert f"trial {number}" in card and "refusals" in card and "direction_index" in card
    assert sorted(p.name for p in tmp_path.glob(".exported*")) == []  # no temporary or moved-aside folder left


def test_cli_run_resume_and_changed_settings_refused(tiny_llama, tmp_path, capsys):
    config = study_config(tmp_path, tiny_llama)
    assert main(["--config", str(config), "--n-trials", "2"]) == 0
    journal = _journal(tmp_path)
    assert _completed(journal) == [0, 1]
    assert main(["--config", str(config), "--n-trials", "4"]) == 0
    assert _completed(journal) == [0, 1, 2, 3]  # resumed: two more, none repeated
    assert "Resuming study" in capsys.readouterr().out

    before = journal.read_bytes()
    assert main(["--config", str(config), "--search.max-weight.high", "3.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: study") and "search.max_weight.high" in err and "\n" not in err
    assert journal.read_bytes() == before  # the existing study is untouched

    assert main(["--config", str(config), "--n-trials", "4", "--export-trial", "0",
                 "--export-dir", str(tmp_path / "out")]) == 0  # fmt: skip
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert main(["export", "--study", str(journal), "--trial", "99", "--out", str(tmp_path / "x")]) == 2
    assert "trial 99 is not a completed trial" in capsys.readouterr().err


def test_bad_prompt_file_fails_before_touching_the_study(tiny_llama, tmp_path, capsys):
    config = study_config(tmp_path, tiny_llama)
    assert main(["--config", str(config), "--n-trials", "1"]) == 0
    before = _journal(tmp_path).read_bytes()
    code = main(["--config", str(config), "--bad-prompts.dataset", str(tmp_path / "nope.csv")])
    assert code == 2 and "prompt file not found" in capsys.readouterr().err
    assert _journal(tmp_path).read_bytes() == before


def test_kill_nine_mid_study_then_resume(tiny_llama, tmp_path):
    # More trials than can finish before the signal: pruned trials take milliseconds (a CI run
    # finished 2,000 in 71 s while the journal was still being polled).
    config = study_config(tmp_path, tiny_llama, n_trials=1_000_000, max_response_length=24)
    cmd, proc, log = _start_study(tmp_path, config)
    try:
        _wait_for_trials(proc, log, 2, "killed")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    journal = _journal(tmp_path)
    done = _completed(journal)
    assert 2 <= len(done) < 40
    result = subprocess.run(cmd + ["--n-trials", str(len(done) + 2)], cwd=tmp_path, env=_env(),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    after = _completed(journal)
    assert len(after) == len(done) + 2 and set(done) <= set(after)


def test_sigterm_mid_study_saves_finished_trials_and_leaves_none_running(tiny_llama, tmp_path):
    # What `kill`, a scheduler or `docker stop` sends; a background job ignores Ctrl-C.
    config = study_config(tmp_path, tiny_llama, n_trials=1_000_000, max_response_length=24)
    _, proc, log = _start_study(tmp_path, config)
    try:
        _wait_for_trials(proc, log, 2, "stopped")
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert returncode == 130, log.read_text()[-2000:]
    assert "interrupted: finished trials are saved" in log.read_text()
    study = load_existing_study(str(_journal(tmp_path)), None)
    assert [t.number for t in study.trials if t.state.name == "RUNNING"] == []
    assert len(_completed(_journal(tmp_path))) >= 2


def test_dominated_trials_are_pruned_and_counted(refusing_model, tmp_path):
    config = study_config(tmp_path, refusing_model, n_trials=8, n_startup_trials=8)
    settings = load_settings(str(config))
    study = run_study(settings).study
    states = [t.state.name for t in study.trials]
    assert len(states) == 8 and set(states) <= {"COMPLETE", "PRUNED"}
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    for trial in study.trials:
        if trial.state.name != "PRUNED":
            continue
        kl, at_least = trial.user_attrs["kl_divergence"], trial.user_attrs["refusals_at_least"]
        earlier = [t for t in complete if t.number < trial.number and t.user_attrs["kl_divergence"] <= kl]
        assert earlier and min(t.user_attrs["refusals"] for t in earlier) <= at_least  # truly dominated
        assert trial.user_attrs["pruned_reason"].startswith(f"dominated: {at_least} refusals")  # the dashboard shows it


def test_resume_against_changed_weights_at_the_same_path_is_refused(tmp_path, capsys):
    from tests.conftest import build_model

    model_dir = tmp_path / "model"
    build_model(model_dir, "llama", layers=2, seed=0)
    config = study_config(tmp_path, model_dir)
    assert main(["--config", str(config), "--n-trials", "1"]) == 0
    before = _journal(tmp_path).read_bytes()
    build_model(model_dir, "llama", layers=2, seed=1)  # same path and config, other weights
    assert main(["--config", str(config), "--n-trials", "2"]) == 2
    assert "was run on a model with different weights" in capsys.readouterr().err
    assert _journal(tmp_path).read_bytes() == before


def test_failed_first_run_does_not_block_the_corrected_one(tiny_llama, tmp_path, capsys):
    config = study_config(tmp_path, tiny_llama, study_name='"fixed-name"')
    assert main(["--config", str(config), "--model", str(tmp_path / "typo")]) == 2
    assert "typo" in capsys.readouterr().err
    assert main(["--config", str(config), "--n-trials", "1"]) == 0  # same study name, right model
    assert _completed(_journal(tmp_path)) == [0]


def test_ctrl_c_mid_study_exits_cleanly_then_resumes(tiny_llama, tmp_path):
    # More trials than can finish before the signal: pruned trials take milliseconds (a CI run
    # finished 2,000 in 71 s while the journal was still being polled).
    config = study_config(tmp_path, tiny_llama, n_trials=1_000_000, max_response_length=24)
    # SIG_DFL in the child: a shell that runs the suite in the background hands it SIGINT
    # ignored, and Python then never turns Ctrl-C into KeyboardInterrupt (as a user's nohup wants)
    cmd, proc, log = _start_study(tmp_path, config, lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for_trials(proc, log, 1, "interrupted")
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:  # say where the study was, not only that it ran on
            pytest.fail("the study ran on 180 s after Ctrl-C; its stderr ends:\n" + log.read_text()[-3000:])
    finally:
        if proc.poll() is None:  # never leave a million-trial study running after a failure
            proc.kill()
            proc.wait()
    err = log.read_text()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: finished trials are saved" in err and "Traceback" not in err
    journal = _journal(tmp_path)
    done = _completed(journal)
    states = {t.state.name for t in load_existing_study(str(journal), None).trials}
    assert "RUNNING" not in states  # the trial in flight was closed, not left dangling
    result = subprocess.run(cmd + ["--n-trials", str(len(done) + 1)], cwd=tmp_path, env=_env(),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(_completed(journal)) == len(done) + 1


@pytest.mark.parametrize("where", ["opening", "closing"])
def test_ctrl_c_while_optuna_opens_or_closes_a_trial_leaves_none_running(tiny_llama, tmp_path, monkeypatch, where):
    # The subprocess test above lands its Ctrl-C wherever the study happens to be; a CI run once
    # hit the moment after Optuna created trial N and before the objective ran (it reads the
    # storage and prepares the sampler there), which left trial N RUNNING. Here the signal lands
    # there, or in Optuna's close of the trial, on purpose, for trial 1.
    import optuna.study._optimize as optimize
    from optuna.samplers import TPESampler

    calls = {"n": 0}

    def interrupting(original):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:  # trial 1's opening / close: a real SIGINT, as Ctrl-C sends
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # the handler raises here, at the next bytecode
            return original(*args, **kwargs)

        return wrapper

    if where == "opening":
        monkeypatch.setattr(TPESampler, "before_trial", interrupting(TPESampler.before_trial))
    else:  # Optuna 5.0 turns a KeyboardInterrupt here into an UnboundLocalError: still an interrupt
        monkeypatch.setattr(optimize, "_tell_with_warning", interrupting(optimize._tell_with_warning))
    config = study_config(tmp_path, tiny_llama, n_trials=4)
    # Python's own Ctrl-C handler, as in a terminal: a suite run in the background may inherit SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_study(load_settings(str(config)))
    finally:
        signal.signal(signal.SIGINT, previous)
    trials = load_existing_study(str(_journal(tmp_path)), None).trials
    assert [t.number for t in trials if t.state.name == "RUNNING"] == []
    assert trials[1].state.name == "FAIL" and len(_completed(_journal(tmp_path))) == 1
    monkeypatch.undo()
    run_study(load_settings(str(config)))  # the resume counts the closed trial out and finishes
    assert len(_completed(_journal(tmp_path))) == 4


def test_study_with_norm_preserving_multi_direction_biprojected_edits(tiny_llama, tmp_path, capsys):
    config = study_config(tmp_path, tiny_llama, n_trials=3, row_normalization='"full"',
                          full_normalization_lora_rank=4, directions_per_layer=2, biproject_direction="true",
                          export_trial=2, capability_prompts='{ dataset = "builtin:capability" }',
                          search='direction_scope = ["best_layer", "global"]\ntop_quality_layers = 2\n'
                          "seed_best_layer = true\n")  # fmt: skip
    assert main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "Best layer by quality" in out
    summary = out[out.index("Chosen trial 2: export_trial = 2"):]  # one block after the export, last
    assert "KL " in summary and "exported " in summary and "capability " in summary
    assert f"python -m heretic_like chat --study {_journal(tmp_path)} --trial 2" in summary
    layers = pd.read_csv(tmp_path / "checkpoints" / "tiny-llama0.layers.csv")
    assert len(layers) == 4 and {"snr", "cosine", "quality", "fisher", "entanglement"} <= set(layers.columns)
    assert (tmp_path / "checkpoints" / "tiny-llama0.layers.png").stat().st_size > 0
    study = load_existing_study(str(_journal(tmp_path)), None)
    first = study.trials[0]  # the enqueued seed: aimed at the best-quality layer within direction_index
    window = layers[(layers["layer"] >= 0.4 * 3) & (layers["layer"] <= 0.9 * 3)]  # the default range
    best = int(window["quality"].idxmax())
    assert f"direction_index: {best} (all layers: {int(layers['quality'].idxmax())})" in out
    assert first.params.get("direction_layer", best) == best
    finished = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert finished and all(0 <= t.user_attrs["approximation_error"] < 1 for t in finished)
    assert all("entangled_strength" in t.params for t in study.trials)

    # the export writes the exact norm-preserving weights: every edited row keeps its norm
    from safetensors.torch import load_file

    exported = load_file(next((tmp_path / "checkpoints" / "tiny-llama0-trial2").glob("*.safetensors")))
    original = load_file(next(Path(tiny_llama).glob("*.safetensors")))
    changed = 0
    for name, weight in exported.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            assert torch.allclose(weight.norm(dim=1), original[name].norm(dim=1), rtol=1e-5), name
            changed += not torch.allclose(weight, original[name])
    assert changed > 0


def test_hook_mode_study_runs_and_rejects_row_normalisation(tiny_llama, tmp_path, capsys):
    config = study_config(tmp_path, tiny_llama, n_trials=2, edit_mode='"hooks"')
    assert main(["--config", str(config)]) == 0
    assert len(_completed(_journal(tmp_path))) == 2
    capsys.readouterr()
    assert main(["--config", str(config), "--row-normalization", "full"]) == 2
    err = capsys.readouterr().err
    assert "edit_mode = 'hooks' needs row_normalization = 'none'" in err and err.count("\n") == 1


def test_study_from_an_older_version_resumes_when_new_keys_keep_defaults(tiny_llama, tmp_path):
    from heretic_like.store import open_study

    config = study_config(tmp_path, tiny_llama)
    assert main(["--config", str(config), "--n-trials", "1"]) == 0
    study = load_existing_study(str(_journal(tmp_path)), None)
    old = dict(study.user_attrs["identity"])
    for key in ("row_normalization", "directions_per_layer", "capability_prompts"):  # keys added later
        old.pop(key)
    old["search"] = {k: v for k, v in old["search"].items() if k not in ("entangled_strength", "kernel_shape")}
    old.pop("ignore_echoed_markers")  # added later, with a default that changes how refusals count
    study.set_user_attr("identity", old)
    settings = load_settings(str(config), {"ignore_echoed_markers": False})
    assert open_study(settings).study_name == study.study_name  # defaults (and the old counting): same study
    with pytest.raises(Exception, match="row_normalization"):
        open_study(load_settings(str(config), {"row_normalization": "pre", "ignore_echoed_markers": False}))
    with pytest.raises(Exception, match="ignore_echoed_markers"):
        open_study(load_settings(str(config)))


def test_reasoning_model_is_measured_after_its_thinking_block(thinking_model, tmp_path):
    config = refused_study_config(tmp_path, thinking_model, n_trials=1, n_startup_trials=1)
    run = run_study(load_settings(str(config)))
    assert run.study.user_attrs["response_prefix"] == THINKING  # detected from the model's own openings
    assert all(text.endswith(THINKING) for text in run.evaluator.harmful + run.evaluator.harmless)
    # Answers begin right after the prefix: the trained refusals show within the 12-token responses.
    assert run.study.user_attrs["base_refusals"] >= 12
    (tmp_path / "explicit").mkdir()
    explicit = refused_study_config(tmp_path / "explicit", thinking_model, n_trials=1, n_startup_trials=1,
                                    response_prefix='""')  # fmt: skip
    run = run_study(load_settings(str(explicit)))
    assert run.study.user_attrs.get("response_prefix") is None and not run.evaluator.harmful[0].endswith(THINKING)
    # Without it, 12 tokens hold only the (~15-token) thinking block: no answer, so every response
    # counts as a refusal (unanswered_is_refusal); older versions counted none, which any edit
    # that keeps the model thinking would have "won".
    assert run.study.user_attrs["base_refusals"] == 24


def test_a_study_stamped_before_a_default_changed_keeps_what_it_ran_with():
    """filter_direction_prompts became true by default after studies were stamped without it
    (they used every prompt): such a study resumes with `false`, and the new default is refused
    rather than silently mixing two kinds of directions in one study."""
    from heretic_like.store import _with_new_defaults, stored_settings

    assert load_settings(None).filter_direction_prompts is True
    ran_with = load_settings(None, {"filter_direction_prompts": False})
    old = ran_with.study_identity()
    del old["filter_direction_prompts"]
    assert _with_new_defaults(old) == ran_with.study_identity()
    assert _with_new_defaults(old) != load_settings(None).study_identity()
    assert stored_settings(old, "an old record").filter_direction_prompts is False  # reproduce.json too


def test_resume_with_edited_prompt_content_is_refused(tiny_llama, tmp_path):
    from heretic_like.errors import HereticError
    from heretic_like.prompts import builtin_path

    prompts = tmp_path / "harmful.txt"
    prompts.write_text("\n".join(builtin_path("harmful").read_text().splitlines()[:40]) + "\n")
    config = study_config(tmp_path, tiny_llama, n_trials=1, n_startup_trials=1)
    text = config.read_text().replace('dataset = "builtin:harmful"\nsplit = "train[:150]"',
                                      f'dataset = "{prompts}"\nsplit = "train"')  # fmt: skip
    config.write_text(text)
    run_study(load_settings(str(config)))
    prompts.write_text(prompts.read_text().replace("\n", " please\n", 1))  # same file name, same config
    with pytest.raises(HereticError, match="content of bad_prompts changed"):
        run_study(load_settings(str(config)))


def test_directions_are_measured_with_the_batch_the_study_recorded():
    import optuna

    from heretic_like.records import StudyRecord

    study = optuna.create_study()
    record = StudyRecord(study)
    assert record.directions_batch(16) == 16  # nothing recorded yet
    study.set_user_attr("batch_size", 32)  # a study from before directions_batch_size (its stored name)
    assert record.directions_batch() == 32
    record.record_batches(32, 8)
    assert record.directions_batch() == 8


def test_prompts_refused_by_most_finished_trials_are_scored_first():
    import optuna
    from optuna.trial import TrialState, create_trial

    from heretic_like.search import hardest_first

    study = optuna.create_study(directions=["minimize", "minimize"])
    study.set_user_attr("base_refused_positions", [0, 4, 7])
    for state, refused in [(TrialState.COMPLETE, [4, 9]), (TrialState.PRUNED, [9]), (TrialState.FAIL, [1, 1])]:
        values = [1.0, 1.0] if state == TrialState.COMPLETE else None
        study.add_trial(create_trial(state=state, values=values, user_attrs={"refused_positions": refused}))
    # 9: two finished trials; 4: one, and the unedited model; then the unedited model's; failed trials don't count
    assert hardest_first(study) == [9, 4, 0, 7]


def test_measured_batch_size_and_unedited_counts_are_kept_for_the_resume(tiny_llama, tmp_path, capsys):
    config = study_config(tmp_path, tiny_llama, n_trials=1, batch_size=0, max_batch_size=4)
    first = run_study(load_settings(str(config)))
    choice = first.study.user_attrs["batch_size_choice"]
    assert choice["size"] in (1, 2, 4) and [t["size"] for t in choice["timings"]] == [1, 2, 4]
    assert all(t["seconds_per_response"] > 0 for t in choice["timings"])
    assert first.evaluator.batch_size == choice["size"] and "batch_size" in first.timings
    capsys.readouterr()
    resumed = run_study(load_settings(str(config), {"n_trials": 2}))
    out = capsys.readouterr().out
    assert f"Batch size: {choice['size']} (measured when the study began" in out
    assert resumed.evaluator.batch_size == choice["size"]
    # neither the probe nor the unedited model's generation runs again
    assert "batch_size" not in resumed.timings and "base_refusals" not in resumed.timings
    assert f"Unedited model refuses {first.study.user_attrs['base_refusals']}/24" in out


def test_a_default_run_shows_no_library_deprecation_noise(tiny_llama, tmp_path):
    import warnings

    config = study_config(tmp_path, tiny_llama, n_trials=1, export_trial=0, evaluate_capabilities="false")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["--config", str(config)]) == 0
    noise = [f"{w.category.__name__}: {w.message}" for w in caught
             if issubclass(w.category, (FutureWarning, DeprecationWarning))]  # fmt: skip
    assert noise == []


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def test_a_live_workers_running_trial_is_never_failed_by_another_process(tiny_llama, tmp_path, monkeypatch):
    from optuna.trial import TrialState

    from heretic_like import store
    from heretic_like.records import StudyRecord
    from heretic_like.store import fail_stale_trials

    config = study_config(tmp_path, tiny_llama, n_trials=2000, max_response_length=24)
    _, proc, log = _start_study(tmp_path, config)
    try:
        _wait_for_trials(proc, log, 1, "checked")
        checked = 0
        for _ in range(20):  # trials run back to back: catch some while they are RUNNING
            study = load_existing_study(str(_journal(tmp_path)), None)
            running = [t.number for t in study.get_trials(states=(TrialState.RUNNING,))]
            assert fail_stale_trials(study) == 0  # this process is not theirs, and theirs is alive
            checked += len(running)
            time.sleep(0.05)
        assert checked and proc.poll() is None  # the worker's trials were left alone; it runs on
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    study = load_existing_study(str(_journal(tmp_path)), None)
    assert not [t for t in study.trials if t.state == TrialState.FAIL]
    running = StudyRecord(study).trials((TrialState.RUNNING,))
    named = [t for t in running if t.worker is not None]
    # now its worker is gone: the trials that named it are stale at once. The kill may land
    # between Optuna creating a trial and the trial naming its worker: that one is only stale
    # once UNCLAIMED_S has passed (it may belong to a worker still starting up).
    assert fail_stale_trials(study) == len(named)
    monkeypatch.setattr(store, "UNCLAIMED_S", 0)
    assert fail_stale_trials(study) == len(running) - len(named)
    assert not study.get_trials(states=(TrialState.RUNNING,))


def test_a_second_worker_with_other_settings_cannot_take_over_a_fresh_study(tiny_llama, tmp_path):
    from heretic_like.errors import HereticError
    from heretic_like.store import open_study

    config = study_config(tmp_path, tiny_llama)
    code = ("import time\nfrom heretic_like.config import load_settings\nfrom heretic_like.store import open_study\n"
            f"open_study(load_settings({str(config)!r}))\nprint('ready', flush=True)\ntime.sleep(120)\n")
    first = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "ready"  # stamped; still "measuring its directions"
        with pytest.raises(HereticError, match="different settings \\(max_response_length\\)"):
            open_study(load_settings(str(config), {"max_response_length": 7}))
        assert open_study(load_settings(str(config))) is not None  # the same settings join it
    finally:
        first.kill()
        first.wait()
    # its stamper gone and nothing measured yet: the corrected settings adopt the study
    assert open_study(load_settings(str(config), {"max_response_length": 7})) is not None


def test_two_workers_creating_one_study_with_other_settings_at_once(tiny_llama, tmp_path):
    """Creating the study is atomic (its name is unique): exactly one of two racing workers wins,
    the other is refused, whatever the timing."""
    config = study_config(tmp_path, tiny_llama)
    # each worker stays alive (its stamper running) until both have answered: a winner that had
    # already exited would leave an unmeasured study the loser may rightly adopt (the test above),
    # which a fixed sleep allowed when one interpreter started seconds after the other on a busy CI
    code = ("import sys\nfrom heretic_like.config import load_settings\n"
            "from heretic_like.errors import HereticError\nfrom heretic_like.store import open_study\n"
            f"settings = load_settings({str(config)!r}, {{'max_response_length': int(sys.argv[1])}})\n"
            "try:\n    open_study(settings)\n    print('ok', flush=True)\nexcept HereticError:\n"
            "    print('refused', flush=True)\nsys.stdin.read()\n")  # fmt: skip
    workers = [subprocess.Popen([sys.executable, "-c", code, str(n)], cwd=tmp_path, env=_env(), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True) for n in (7, 9)]  # fmt: skip
    try:
        answers = sorted(w.stdout.readline().strip() for w in workers)
    finally:
        for w in workers:
            w.communicate(timeout=120)  # closes its stdin: it exits
    assert answers == ["ok", "refused"]
