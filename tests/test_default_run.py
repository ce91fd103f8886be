"""`benchmarks/default_run.py`'s bookkeeping of a study run in parts (the scoring itself needs the
real testbed model and lives in the benchmark)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def default_run():
    spec = importlib.util.spec_from_file_location("default_run", ROOT / "benchmarks" / "default_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
