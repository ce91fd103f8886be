import json

import pytest
import torch

from heretic_like.cli import main
from heretic_like.config import load_settings
from heretic_like.prompts import builtin_path
from heretic_like.provenance import read_record, weight_hashes
from heretic_like.results import trials_table
from heretic_like.store import load_existing_study
from heretic_like.study import run_study
from tests.conftest import study_config


def test_reproduce_rebuilds_bit_identical_weights(tiny_llama, tmp_path, capsys):
    config = study_config(tmp_path, tiny_llama, n_trials=3, export_trial=1, directions_per_layer=2,
                          prune_dominated="false", export_dir=f'"{tmp_path / "export"}"',
                          search='kernel_shape = ["tent", "cosine", "exponential"]\n')  # fmt: skip
    assert main(["--config", str(config)]) == 0
    record_path = tmp_path / "export" / "reproduce.json"
    record = read_record(record_path)
    shapes = {k["shape"] for k in record["edit"]["kernels"].values()}  # sampled per component
    assert shapes <= {"tent", "cosine", "exponential"}
    study = load_existing_study(str(next((tmp_path / "checkpoints").glob("*.journal"))), None)
    table = trials_table(study)  # the shape is a column of the trials table, one per component
    assert set(table["attn.o_proj.shape"]) <= {"tent", "cosine", "exponential"}
    assert all("mlp.down_proj.kernel_shape" in t.params for t in study.trials)
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
    # Heretic's way: the `reproduce` key makes the main command do the same
    assert main(["--config", str(config), "--reproduce", str(record_path)]) == 0
    assert "bit-identical" in capsys.readouterr().out

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
    # A kernel shape this version does not know: one line naming it, before any model is loaded.
    record = read_record(record_path)
    record["edit"]["kernels"]["attn.o_proj"]["shape"] = "gauss"
    broken.write_text(json.dumps(record))
    assert main(["reproduce", str(broken), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "recorded edit cannot be read" in err and "'gauss'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "y").exists()


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


def test_export_leaves_unedited_modules_byte_for_byte_and_rebuilds_identically(tmp_path, capsys):
    """Signed zeros are where "numerically equal" and "the same bytes" part: -0.0 == 0.0."""
    from safetensors.torch import load_file

    from tests.conftest import build_model

    source = tmp_path / "signed-zeros"
    model, _ = build_model(source, "llama", layers=4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param[::3, ::2] = -0.0  # a third of the rows carry negative zeros
    model.save_pretrained(source)
    original = load_file(source / "model.safetensors")
    # the kernel peaks at the last layer and reaches 1 layer down: layers 0-1 keep zero strength
    config = study_config(tmp_path, source, n_trials=1, n_startup_trials=1, export_trial=0, prune_dominated="false",
                          evaluate_capabilities="false", export_dir=f'"{tmp_path / "export"}"',
                          search="max_weight_position = { low = 1.0, high = 1.0 }\n"
                          "min_weight_distance = { low = 0.34, high = 0.34 }\n"
                          "direction_scope = [\"global\"]\n")  # fmt: skip
    assert main(["--config", str(config)]) == 0
    exported = load_file(tmp_path / "export" / "model.safetensors")
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        same = exported[name].numpy().tobytes() == tensor.numpy().tobytes()
        edited = name.startswith(("model.layers.2.", "model.layers.3.")) and name.endswith(
            ("o_proj.weight", "down_proj.weight"))  # fmt: skip
        assert same != edited, name  # exactly the edited modules changed, every other byte is the original's
    assert torch.signbit(exported["model.layers.0.mlp.down_proj.weight"]).any()
    capsys.readouterr()
    assert main(["reproduce", str(tmp_path / "export" / "reproduce.json"), "--out", str(tmp_path / "again")]) == 0
    assert "bit-identical" in capsys.readouterr().out
    rebuilt, written = tmp_path / "again" / "model.safetensors", tmp_path / "export" / "model.safetensors"
    assert rebuilt.read_bytes() == written.read_bytes()


def test_filtered_direction_prompts_are_filtered_again_when_reproduced(refusing_model, tmp_path, capsys):
    # The harmful direction set holds 20 harmless requests the model answers: the study drops them
    # before measuring, and reproduce must drop the same ones to rebuild the same weights.
    mixed = tmp_path / "bad.txt"
    harmful, harmless = (builtin_path(name).read_text().splitlines() for name in ("harmful", "harmless"))
    mixed.write_text("\n".join(harmful[:40] + harmless[:20]) + "\n")
    config = study_config(tmp_path, refusing_model, n_trials=2, export_trial=1, filter_direction_prompts="true",
                          export_dir=f'"{tmp_path / "export"}"')  # fmt: skip
    config.write_text(config.read_text().replace('dataset = "builtin:harmful"\nsplit = "train[:150]"',
                                                 f'dataset = "{mixed}"\nsplit = "train"', 1))  # fmt: skip
    assert main(["--config", str(config)]) == 0
    assert "Directions from 40 of 60 bad_prompts (refused by the unedited model)" in capsys.readouterr().out
    record_path = tmp_path / "export" / "reproduce.json"
    record = read_record(record_path)
    assert record["config"]["filter_direction_prompts"] is True
    assert (record["batch_size"], record["scoring_batch_size"]) == (8, 32)  # the filter generates as trials do
    assert main(["reproduce", str(record_path), "--out", str(tmp_path / "again")]) == 0
    out = capsys.readouterr().out
    assert "Directions from 40 of 60 bad_prompts" in out and "bit-identical" in out
    # an export on a machine without the study's directions cache filters them again too (it took
    # all 60 prompts once, writing another edit and caching those directions for a resume)
    (cache,) = (tmp_path / "checkpoints").glob("*.directions.pt")
    cache.unlink()
    (journal,) = (tmp_path / "checkpoints").glob("*.journal")
    assert main(["export", "--study", str(journal), "--trial", "1", "--out", str(tmp_path / "elsewhere")]) == 0
    assert "Directions from 40 of 60 bad_prompts" in capsys.readouterr().out
    assert weight_hashes(tmp_path / "elsewhere") == weight_hashes(tmp_path / "export")
