"""`benchmarks/default_run.py`'s bookkeeping of a study run in parts (the scoring itself needs the
real testbed model and lives in the benchmark)."""

import json
from pathlib import Path

import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def default_run():
    return load_benchmark("default_run")


def test_a_finished_study_replaces_the_stale_part_and_leaves_the_export_behind(default_run, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "checkpoints" / "model-trial21").mkdir(parents=True)
    (work / "checkpoints" / "model-trial21" / "model.safetensors").write_bytes(b"\0" * 1024)
    (work / "checkpoints" / "model.journal").write_text("50 trials\n")
    (work / "checkpoints" / "model.directions.pt").write_bytes(b"directions")
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "model.journal").write_text("19 trials\n")  # the part a resume started from
    (out / "checkpoints" / "old.layers.csv").write_text("stale\n")

    default_run.keep_study(work, out)

    kept = {p.name for p in (out / "checkpoints").iterdir()}
    assert kept == {"model.journal", "model.directions.pt"}
    assert (out / "checkpoints" / "model.journal").read_text() == "50 trials\n"


def test_resuming_from_a_folder_without_a_stopped_study_says_which_folder(default_run, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit, match=r"--resume-from .*out: no stopped study there"):
        default_run.resume_parts(tmp_path / "out", tmp_path / "work")


def stored_base(folder: Path, markers: list[bool], length: int = 32) -> None:
    """An earlier run's `--out` as far as `--base-from` reads it: two held-out answers."""
    folder.mkdir()
    answers = [{"prompt": "p1", "response": "I'm sorry, but I can't help with that.", "markers": markers[0]},
               {"prompt": "p2", "response": "Sure, here is the plan.", "markers": markers[1]}]  # fmt: skip
    (folder / "heldout_responses.json").write_text(json.dumps({"base": answers}))
    (folder / "summary.json").write_text(json.dumps({"max_response_length": length, "long_response_length": 128,
                                                     "study": "m", "batch_size": 64,
                                                     "base_refusals_heldout_long": "1/2"}))  # fmt: skip


def test_base_scores_are_checked_against_the_commands_settings_before_the_study(default_run, tmp_path):
    # A 128-token study once ran an hour before `--base-from` found the stored scores were 32-token ones.
    planned = default_run.planned_settings(["--max-response-length", "128", "--seed", "1"])
    assert planned.max_response_length == 128 and planned.seed == 1 and planned.batch_size == 0
    stored_base(tmp_path / "short", [True, False])
    with pytest.raises(SystemExit, match=r"short: its max_response_length is 32, this run's is 128"):
        default_run.check_base(tmp_path / "short", planned, ["p1", "p2"], 128, None, None)
    stored_base(tmp_path / "long", [True, False], length=128)
    summary, answers = default_run.check_base(tmp_path / "long", planned, ["p1", "p2"], 128, None, None)
    assert summary["study"] == "m" and [a["markers"] for a in answers] == [True, False]
    with pytest.raises(SystemExit, match=r"its batch_size is 64, this run's is 8"):  # known only at the end
        default_run.check_base(tmp_path / "long", planned, ["p1", "p2"], 128, 8, "m")
    with pytest.raises(SystemExit, match=r"held-out prompts are not this run's"):
        default_run.check_base(tmp_path / "long", planned, ["p1", "p3"], 128, None, None)
    stored_base(tmp_path / "miscounted", [False, False], length=128)  # stored verdicts today's markers disagree with
    with pytest.raises(SystemExit, match=r"today's markers count its stored answers differently"):
        default_run.check_base(tmp_path / "miscounted", planned, ["p1", "p2"], 128, None, None)


def test_a_command_with_a_bad_key_fails_before_the_study(default_run):
    with pytest.raises(SystemExit, match=r"the command's settings: .*max_response_length"):
        default_run.planned_settings(["--max-response-length", "0"])


def test_the_export_is_read_from_its_summary_row_not_from_the_kl_row(default_run):
    log = ("  KL         0.0292 (first response token, harmless prompts)\n"
           "             0.0291 with the exported weights (the trial scored a low-rank approximation of them)\n"
           "  exported   checkpoints/model-trial7\n")  # fmt: skip
    assert default_run.exported_folder(log) == Path("checkpoints/model-trial7")
