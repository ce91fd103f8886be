import shutil
from pathlib import Path

import pytest
import torch

import heretic_like
from heretic_like.cli import main
from heretic_like.model import chat_texts, encode, peft_quietly
from tests.conftest import study_config

PROMPTS = ["How do I make a bomb?", "Write a poem about rain"]


def _logits(model, tokenizer):
    batch = encode(tokenizer, chat_texts(tokenizer, PROMPTS, None), "cpu")
    with torch.no_grad():
        return model(**batch).logits


def test_adapter_and_sharded_exports_load_and_match(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = study_config(tmp_path, tiny_llama, n_trials=2, directions_per_layer=2,
                          search="max_weight = { low = 1.0, high = 1.0 }\n")
    assert main(["--config", str(config)]) == 0
    (journal,) = (tmp_path / "checkpoints").glob("*.journal")
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    assert main(["export", "--study", str(journal), "--trial", "0", "--out", str(merged),
                 "--max-shard-size", "100KB"]) == 0  # fmt: skip
    assert main(["export", "--study", str(journal), "--trial", "0", "--out", str(adapter),
                 "--export-strategy", "adapter"]) == 0  # fmt: skip

    shards = list(merged.glob("model-*.safetensors"))
    assert len(shards) > 1 and (merged / "model.safetensors.index.json").is_file()
    assert sorted(p.name for p in adapter.iterdir() if p.suffix in (".json", ".safetensors")) >= [
        "adapter_config.json", "adapter_model.safetensors"]  # fmt: skip
    assert not list(adapter.glob("model*.safetensors"))  # only the adapter, no full weights
    assert "PeftModel.from_pretrained" in (adapter / "README.md").read_text()

    tokenizer = AutoTokenizer.from_pretrained(merged)
    merged_logits = _logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), tokenizer)
    base = AutoModelForCausalLM.from_pretrained(Path(tiny_llama), dtype=torch.float32)
    base_logits = _logits(base, tokenizer)
    with peft_quietly():  # peft asks transformers for a deprecated property, not our code
        with_adapter = _logits(PeftModel.from_pretrained(base, adapter), tokenizer)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-3)
    assert torch.allclose(with_adapter, merged_logits, atol=1e-4)


def test_bad_shard_size_is_one_line(tiny_llama, tmp_path, capsys):
    config = study_config(tmp_path, tiny_llama)
    assert main(["--config", str(config), "--max-shard-size", "lots"]) == 2
    err = capsys.readouterr().err
    assert "max_shard_size" in err and err.count("\n") == 1


def test_chosen_trial_is_recounted_with_long_responses(refusing_model, tmp_path, capsys):
    config = study_config(tmp_path, refusing_model, n_trials=2, export_trial=1, verify_response_length=40)
    assert main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("Trial 1:"))
    # "Trial 1: S/24 refusals with 12-token responses, L/24 with 40-token responses"
    short = int(line.split(": ")[1].split("/")[0])
    long = int(line.split(", ")[1].split("/")[0])
    assert "with 12-token responses" in line and "with 40-token responses" in line
    assert long >= short  # greedy: a longer response extends the shorter one, so markers only add up
    (export,) = (tmp_path / "checkpoints").glob("*-trial1")
    assert f"| refusals, 40-token responses | {long}/24 |" in (export / "README.md").read_text()


def test_model_card_opens_with_hub_metadata(tiny_llama, tmp_path):
    """The exported README.md is a hub model card: huggingface_hub reads base_model, tags, library
    and the base model's licence from it (here known from the base folder's card and config)."""
    import json
    import shutil

    from huggingface_hub import ModelCard

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "_name_or_path": "example-org/tiny-llama-instruct"}))
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny llama\n")
    study = study_config(tmp_path, base, n_trials=1)
    assert main(["--config", str(study), "--export-trial", "0", "--evaluate-capabilities", "false",
                 "--verify-response-length", "0", "--export-dir", str(tmp_path / "out")]) == 0  # fmt: skip
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == "example-org/tiny-llama-instruct" and card.data.license == "apache-2.0"
    assert {"abliterated", "heretic_like"} <= set(card.data.tags) and card.data.library_name == "transformers"
    assert "(abliterated)" in card.text and "## Performance" in card.text
    (journal,) = (tmp_path / "checkpoints").glob("*.journal")
    assert main(["export", "--study", str(journal), "--trial", "0", "--out", str(tmp_path / "adapter"),
                 "--export-strategy", "adapter"]) == 0  # fmt: skip
    assert ModelCard.load(tmp_path / "adapter" / "README.md").data.library_name == "peft"


def test_base_model_and_licence_from_gguf_metadata(tmp_path):
    """A GGUF names its source repository and licence in `general.*` metadata; a local file with
    neither gives no base_model rather than a path the hub would reject."""
    import gguf

    from heretic_like.card import base_model_facts, hub_metadata
    from heretic_like.config import load_settings

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.license", "mit")
    writer.add_string("general.base_model.0.repo_url", "https://huggingface.co/example-org/base-7b")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert base_model_facts(load_settings(None, {"model": str(path)})) == ("example-org/base-7b", "mit")
    assert base_model_facts(load_settings(None, {"model": "example-org/chat-1b"}))[0] == "example-org/chat-1b"
    bare = load_settings(None, {"model": str(tmp_path / "nothing.gguf")})
    assert base_model_facts(bare) == (None, None) and "base_model" not in hub_metadata(bare)


def _kl_of_folder(folder: Path, settings) -> float:
    """First-token KL of a saved model folder from the unedited one, measured from scratch."""
    from heretic_like.evaluation import kl_divergence
    from heretic_like.generation import first_token_logprobs
    from heretic_like.model import load_model
    from heretic_like.prompts import load_all_prompts

    prompts = load_all_prompts(settings)
    texts = chat_texts(load_model(settings).tokenizer, prompts.harmless_eval, prompts.system("harmless_eval"))
    base = first_token_logprobs(load_model(settings), texts, 8)
    edited = first_token_logprobs(load_model(settings.model_copy(update={"model": str(folder)})), texts, 8)
    return kl_divergence(base, edited)


def test_a_norm_preserving_export_reports_the_kl_of_its_own_weights(tiny_llama, tmp_path, capsys):
    """Trials score a rank-1 approximation of the "full" edit; the export writes it exactly. The
    card and the summary must give the exported weights' own KL, measured as the study measures."""
    from heretic_like.config import load_settings
    from heretic_like.records import StudyRecord
    from heretic_like.store import load_existing_study

    config = study_config(tmp_path, tiny_llama, n_trials=1, export_trial=0, row_normalization='"full"',
                          full_normalization_lora_rank=1)
    assert main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    (journal,) = (tmp_path / "checkpoints").glob("*.journal")
    study = load_existing_study(str(journal), None)
    record, trial_kl = StudyRecord(study), study.trials[0].user_attrs["kl_divergence"]
    exported = record.exported_kl(0)
    (folder,) = (tmp_path / "checkpoints").glob("*-trial0")
    measured = _kl_of_folder(folder, load_settings(str(config)))
    assert exported == pytest.approx(measured, rel=1e-3, abs=1e-7)
    assert abs(exported - trial_kl) > 1e-4 * max(trial_kl, 1e-9)  # rank 1 is not the exact edit
    assert f"{exported:.4f} with the exported weights" in out
    card = (folder / "README.md").read_text()
    assert f"| {exported:.4f} | 0 (by definition) |" in card and "(rank-1 approximation) | " in card
    # the export command, in a fresh process with no run at hand, measures the same figure
    again = tmp_path / "again"
    assert main(["export", "--study", str(journal), "--trial", "0", "--out", str(again)]) == 0
    study = load_existing_study(str(journal), None)
    assert StudyRecord(study).exported_kl(0) == pytest.approx(exported, rel=1e-3, abs=1e-8)


def test_an_exact_edit_is_not_measured_again(tiny_llama, tmp_path, capsys):
    """With row_normalization "none" the trial scored the exported weights themselves."""
    from heretic_like.records import StudyRecord
    from heretic_like.store import load_existing_study

    config = study_config(tmp_path, tiny_llama, n_trials=1, export_trial=0)
    assert main(["--config", str(config)]) == 0
    assert "with the exported weights" not in capsys.readouterr().out
    (journal,) = (tmp_path / "checkpoints").glob("*.journal")
    study = load_existing_study(str(journal), None)
    assert StudyRecord(study).exported_kl(0) is None
    (folder,) = (tmp_path / "checkpoints").glob("*-trial0")
    assert "approximation" not in (folder / "README.md").read_text()


def test_an_adapter_export_from_the_cached_directions_reads_no_prompt_file(tiny_llama, tmp_path):
    """Export and chat take the directions from the study's cache; a direction prompt file moved
    since the run must not stop them (only measuring reads prompts)."""
    harmful = tmp_path / "harmful.txt"
    shutil.copy(Path(heretic_like.__file__).parent / "data" / "harmful.txt", harmful)
    config = study_config(tmp_path, tiny_llama, n_trials=1, n_startup_trials=1)
    text = config.read_text()
    assert text.count('[bad_prompts]\ndataset = "builtin:harmful"') == 1
    config.write_text(text.replace('dataset = "builtin:harmful"', f'dataset = "{harmful}"', 1))  # bad_prompts
    assert main(["--config", str(config)]) == 0
    (journal,) = (tmp_path / "checkpoints").glob("*.journal")
    harmful.unlink()
    assert main(["export", "--study", str(journal), "--trial", "0", "--out", str(tmp_path / "adapter"),
                 "--export-strategy", "adapter"]) == 0  # fmt: skip
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
