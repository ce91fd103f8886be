import json

import pytest

from heretic_like.cli import main
from heretic_like.config import load_settings
from heretic_like.reproduce import read_record, weight_hashes
from heretic_like.study import run_study
from tests.conftest import study_config


def test_reproduce_rebuilds_bit_identical_weights(tiny_llama, tmp_path, capsys):
    config = study_config(tmp_path, tiny_llama, n_trials=3, export_trial=1, directions_per_layer=2,
                          prune_dominated="false", export_dir=f'"{tmp_path / "export"}"')  # fmt: skip
    assert main(["--config", str(config)]) == 0
    record_path = tmp_path / "export" / "reproduce.json"
    record = read_record(record_path)
    assert record["trial"] == 1 and record["seed"] == 1
    assert record["batch_size"] == 8  # the directions' batch (directions_batch_size), not the scoring one (32)
    assert set(record["prompt_fingerprints"]) >= {"bad_prompts", "good_prompts"}
    assert record["packages"]["torch"] and record["model_fingerprint"]
    assert record["weights_sha256"] == weight_hashes(tmp_path / "export")
    assert (tmp_path / "checkpoints").glob("*.reproduce.json")

    # Directions are measured afresh (no cache is read), the edit applied, the weights compared.
    again = tmp_path / "again"
    capsys.readouterr()
    assert main(["reproduce", str(record_path), "--out", str(again)]) == 0
    assert "bit-identical" in capsys.readouterr().out
    for name in record["weights_sha256"]:
        assert (again / name).read_bytes() == (tmp_path / "export" / name).read_bytes()

    # A record whose edit was changed rebuilds other weights, and says so.
    record["edit"]["kernels"]["mlp.down_proj"]["max_weight"] += 0.01
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(record))
    assert main(["reproduce", str(tampered), "--out", str(tmp_path / "other")]) == 1
    assert "differ from the record" in capsys.readouterr().err


def test_reproduce_refuses_other_prompts_and_bad_records(tiny_llama, tmp_path, capsys):
    config = study_config(tmp_path, tiny_llama, n_trials=1, n_startup_trials=1, export_trial=0,
                          export_dir=f'"{tmp_path / "export"}"')  # fmt: skip
    assert main(["--config", str(config)]) == 0
    record_path = tmp_path / "export" / "reproduce.json"
    capsys.readouterr()
    # Other prompts than the record's: refused before any model is loaded or written.
    assert main(["reproduce", str(record_path), "--bad-prompts.split", "train[:100]",
                 "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "content of bad_prompts differs" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert main(["reproduce", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not valid JSON" in err and len(err.strip().splitlines()) == 1
    broken.write_text(json.dumps({"record_version": 1, "config": {}}))
    assert main(["reproduce", str(broken)]) == 2
    assert "missing key" in capsys.readouterr().err


def test_seed_makes_trials_deterministic(tiny_llama, tmp_path):
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        settings = load_settings(str(study_config(tmp_path / name, tiny_llama, n_trials=4, n_startup_trials=2,
                                                  seed=7, prune_dominated="false")))  # fmt: skip
        runs.append([(t.params, t.values) for t in run_study(settings).study.trials])
    assert runs[0] == runs[1]
    (tmp_path / "c").mkdir()
    other = load_settings(str(study_config(tmp_path / "c", tiny_llama, n_trials=4, n_startup_trials=2, seed=8)))
    assert [t.params for t in run_study(other).study.trials] != [p for p, _ in runs[0]]


@pytest.fixture(autouse=True)
def _quiet_tqdm(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
