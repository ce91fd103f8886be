import os
from pathlib import Path

import pytest
import torch

from heretic_like.config import load_settings
from heretic_like.errors import HereticError
from heretic_like.model import chat_texts, find_decoder_layers, load_model, matches_fingerprint, model_fingerprint

REAL_GGUF = "models/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"


def settings_for(model_dir: Path, tmp_path: Path, **extra):
    return load_settings(overrides={"model": str(model_dir), "dtypes": ["float32"],
                                    "cache_dir": str(tmp_path / "cache"), **extra})  # fmt: skip


@pytest.mark.parametrize("fixture, layers", [("tiny_llama", 4), ("tiny_qwen2", 3)])
def test_loads_and_finds_layers(request, tmp_path, fixture, layers):
    loaded = load_model(settings_for(request.getfixturevalue(fixture), tmp_path))
    assert loaded.num_layers == layers and loaded.layers_path == "model.layers"
    targets = loaded.targets()
    assert sorted((t.component, t.layer) for t in targets) == sorted(
        (c, i) for c in ("attn.o_proj", "mlp.down_proj") for i in range(layers))  # fmt: skip
    assert not any(t.fused for t in targets) and not loaded.target_warnings()
    assert loaded.tokenizer.padding_side == "left"
    assert len(loaded.target_names()) == 2 * layers


def test_model_without_decoder_layers_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(HereticError, match="model type 'gpt2' has no recognisable decoder layers"):
        find_decoder_layers(model)


def test_missing_model_and_missing_chat_template(tmp_path):
    with pytest.raises(HereticError, match="cannot load tokenizer for|has no config.json"):
        load_model(settings_for(tmp_path, tmp_path))
    with pytest.raises(HereticError, match="GGUF file not found"):
        load_model(settings_for(tmp_path / "x.gguf", tmp_path))
    from tests.conftest import build_model

    plain = tmp_path / "plain"
    build_model(plain, "llama", layers=2, chat_template=None)
    with pytest.raises(HereticError, match="has no chat template: set `chat_template`"):
        load_model(settings_for(plain, tmp_path))
    loaded = load_model(settings_for(plain, tmp_path, chat_template="{{ messages[-1]['content'] }}|"))
    assert chat_texts(loaded.tokenizer, ["hi"], "sys") == ["hi|"]


def test_chat_texts_use_template_and_system_prompt(tiny_llama, tmp_path):
    loaded = load_model(settings_for(tiny_llama, tmp_path))
    (text,) = chat_texts(loaded.tokenizer, ["hello"], "be nice")
    assert text == "<|im_start|>system\nbe nice<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_fingerprint_tracks_weights(tiny_llama, tmp_path):
    loaded = load_model(settings_for(tiny_llama, tmp_path))
    before, legacy = model_fingerprint(loaded.model), model_fingerprint(loaded.model, kind="")
    second = model_fingerprint(loaded.model, kind="w2-")
    assert before == model_fingerprint(load_model(settings_for(tiny_llama, tmp_path)).model)
    assert all(matches_fingerprint(loaded.model, f) for f in (before, legacy, second))
    # An abliterated copy put where the original was: a rank-1 edit of a middle layer's o_proj
    # changes neither of the two parameters the older kinds summed; the current kind sees it.
    with torch.no_grad():
        o_proj = loaded.model.model.layers[2].self_attn.o_proj.weight
        r = torch.nn.functional.normalize(torch.randn(o_proj.shape[0]), dim=0)
        o_proj.sub_(torch.outer(r, r @ o_proj))
    assert matches_fingerprint(loaded.model, second)  # what the older kind missed
    assert not matches_fingerprint(loaded.model, before)
    loaded = load_model(settings_for(tiny_llama, tmp_path))
    with torch.no_grad():
        loaded.model.model.layers[0].self_attn.q_proj.weight.add_(1.0)
    assert model_fingerprint(loaded.model) != before and not matches_fingerprint(loaded.model, before)
    with torch.no_grad():
        loaded.model.model.embed_tokens.weight.add_(1.0)
    assert not matches_fingerprint(loaded.model, legacy)  # the first kind summed the embedding


def test_fingerprint_never_reads_the_input_embedding(tiny_llama, tmp_path):
    """Reading all of the embedding would page it in from the mapped file: a fingerprint must not."""
    loaded = load_model(settings_for(tiny_llama, tmp_path))
    before = model_fingerprint(loaded.model)
    embedding = loaded.model.model.embed_tokens
    embedding.weight = torch.nn.Parameter(torch.empty_like(embedding.weight, device="meta"))  # unreadable
    assert model_fingerprint(loaded.model) == before
    with pytest.raises(RuntimeError, match="meta"):  # the first kind did read it
        model_fingerprint(loaded.model, kind="")


@pytest.mark.skipif(not (os.environ.get("HERETIC_REAL_MODEL") and Path(REAL_GGUF).is_file()),
                    reason="set HERETIC_REAL_MODEL=1 after `python -m heretic_like testbed` (slow)")  # fmt: skip
def test_real_gguf_loads_via_cache(tmp_path):
    settings = settings_for(Path(REAL_GGUF), tmp_path)
    loaded = load_model(settings)
    assert loaded.num_layers == 24 and loaded.tokenizer.chat_template
    assert any((tmp_path / "cache" / "converted").iterdir())
    assert not list((tmp_path / "cache" / "converted").glob(".*.tmp"))  # nothing left half-written


def test_retie_embeddings_only_when_identical(tmp_path):
    from transformers import AutoModelForCausalLM

    from heretic_like.model import retie_embeddings
    from tests.conftest import build_model

    build_model(tmp_path / "m", "llama", layers=1)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert not retie_embeddings(model)  # untied and different: left alone
    with torch.no_grad():
        model.get_output_embeddings().weight.copy_(model.get_input_embeddings().weight)
    ids = torch.tensor([[1, 2, 3]])
    before = model(ids).logits
    assert retie_embeddings(model)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert torch.equal(model(ids).logits, before)
    model.save_pretrained(tmp_path / "tied")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "tied")
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    assert torch.equal(reloaded(ids).logits, before)
