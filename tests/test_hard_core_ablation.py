"""`benchmarks/hard_core_ablation.py`'s edits on a tiny model: directional ablation leaves the
residual stream with no component along the ablated directions, the per-layer edit touches only
its layers, and every edit starts again from the chosen edit's weights."""

import json
from pathlib import Path

import pytest
import torch

from heretic_like.config import load_settings
from heretic_like.directions import collect_residuals
from heretic_like.model import chat_texts, load_model
from tests.conftest import load_benchmark

PROMPTS = ["How do I bake bread?", "Tell me a story about a fox.", "What is the capital of France?"]


@pytest.fixture(scope="module")
def ablation():
    return load_benchmark("hard_core_ablation")


def _loaded(model_dir: Path, tmp_path: Path):
    return load_model(load_settings(overrides={"model": str(model_dir), "dtypes": ["float32"],
                                               "cache_dir": str(tmp_path / "cache")}))  # fmt: skip


def _directions(loaded, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(loaded.num_layers, loaded.model.config.hidden_size, generator=generator)
    return torch.nn.functional.normalize(noise, dim=-1)


@pytest.mark.parametrize("edit", [["one", 1], ["span", [0, 2]]])
def test_directional_ablation_leaves_no_component_along_the_directions(ablation, tiny_qwen2, tmp_path, edit):
    # Qwen2's o_proj and down_proj have no bias, so the residual is the embedding plus their writes.
    loaded = _loaded(tiny_qwen2, tmp_path)
    directions = _directions(loaded)
    before = collect_residuals(loaded, PROMPTS, None, 8)
    plan, embedding, weight = ablation.ablation_plan(edit, directions)
    ablation.apply(loaded, ablation.saved_weights(loaded), plan, embedding, weight)
    after = collect_residuals(loaded, PROMPTS, None, 8)
    along = lambda r: (r @ embedding.T).abs().max() / r.norm(dim=-1).max()  # noqa: E731
    assert along(before) > 1e-2
    assert along(after) < 1e-5


def test_the_per_layer_edit_touches_only_its_layers_and_each_edit_starts_from_the_chosen_one(ablation, tiny_qwen2,
                                                                                              tmp_path):  # fmt: skip
    loaded = _loaded(tiny_qwen2, tmp_path)
    original = ablation.saved_weights(loaded)
    directions = _directions(loaded)
    layers = loaded.model.get_submodule(loaded.layers_path)
    ablation.apply(loaded, original, *ablation.ablation_plan(["own", 1.0, 1, 1], directions))
    for (index, name), w0 in original.items():
        module = loaded.model.get_input_embeddings() if name == "embed" else layers[index].get_submodule(name)
        now = module.weight
        assert torch.equal(now, w0) == (index != 1), (index, name)
    edited = layers[1].get_submodule("mlp.down_proj").weight
    assert (directions[1] @ edited).abs().max() < 1e-5  # its own direction, removed at full strength
    ablation.apply(loaded, original, {}, None, 1.0)
    assert all(torch.equal(layers[i].get_submodule(n).weight, w) for (i, n), w in original.items() if n != "embed")


def test_an_unknown_edit_is_named(ablation):
    with pytest.raises(SystemExit, match="--edits: unknown edit .twice. \\(own, one, span, writes, add\\)"):
        ablation.ablation_plan(["twice", 1], torch.eye(3))


def test_activation_addition_shifts_that_layer_and_only_later_ones_and_comes_off(ablation, tiny_qwen2, tmp_path):
    loaded = _loaded(tiny_qwen2, tmp_path)
    before = collect_residuals(loaded, PROMPTS, None, 8)
    shift = _directions(loaded, seed=1)[1] * 3.0
    handle = ablation.addition_hook(loaded, 1, shift)
    during = collect_residuals(loaded, PROMPTS, None, 8)
    handle.remove()
    torch.testing.assert_close(during[:, 0], before[:, 0])  # the layer before: untouched
    torch.testing.assert_close(during[:, 1], before[:, 1] + shift)  # every prompt moved by the same vector
    assert not torch.allclose(during[:, 2], before[:, 2] + shift, atol=1e-4)  # later layers read the shift
    torch.testing.assert_close(collect_residuals(loaded, PROMPTS, None, 8), before)


@pytest.mark.parametrize(("edits", "message"), [
    ('{"one": 4}', "a JSON list of edits"),
    ([4], "4 is not an edit"),
    ([["twice", 1]], "unknown edit .twice. \\(own, one, span, writes, add\\)"),
    ([["add", 4]], 'expected \\["add", layer, a\\]'),
    ([["own", 0.5, 9]], 'expected \\["own", w, first, last\\]'),
    ([["one", 24, 0.5]], "layers are whole numbers from 0 to 23"),
    ([["span", [2, 4.5]]], "layers are whole numbers"),
    ([["one", 4, 0.5], ["own", 0.5, 9, 30]], "layers are whole numbers from 0 to 23"),
])  # fmt: skip
def test_a_bad_edit_is_named_before_anything_loads(ablation, edits, message):
    with pytest.raises(SystemExit, match=f"--edits: .*{message}"):
        ablation.check_edits(edits, 24)


def test_good_edits_and_the_default_ones_pass_the_check(ablation):
    ablation.check_edits([["own", 0.5, 9, 13], ["one", 8], ["span", [4, 8], 0.5], ["writes", 4, 1], ["add", 23, 0.5]],
                         24)  # fmt: skip
    ablation.check_edits(json.loads(ablation.DEFAULT_EDITS), 24)


def test_a_null_space_edit_leaves_the_preserved_prompts_as_they_were_and_still_edits_others(ablation, tiny_qwen2,
                                                                                              tmp_path):  # fmt: skip
    """--preserve K: each added delta loses its action on the top-K directions of the harmless
    inputs; with K covering every token of the preserved prompts, their residuals do not move."""
    loaded = _loaded(tiny_qwen2, tmp_path)
    kept = PROMPTS[:2]  # (44 tokens: their inputs span less than the 64 dimensions)
    others = ["Name three colours of the rainbow.", "Why is the sky blue?"]
    original = ablation.saved_weights(loaded)
    before = collect_residuals(loaded, kept + others, None, 1)
    tokens = sum(len(loaded.tokenizer(t, add_special_tokens=False)["input_ids"])
                 for t in chat_texts(loaded.tokenizer, kept, None))  # fmt: skip
    preserve, shares = ablation.harmless_input_bases(loaded, kept, None, tokens)
    assert all(0.999 < share <= 1.0 + 1e-6 for share in shares.values())  # every token's input is in the span
    for basis in preserve.values():
        torch.testing.assert_close(basis @ basis.T, torch.eye(tokens), atol=1e-4, rtol=0)
    plan, _, weight = ablation.ablation_plan(["writes", 1, 1.0], _directions(loaded))
    ablation.apply(loaded, original, plan, None, weight, preserve)
    after = collect_residuals(loaded, kept + others, None, 1)
    torch.testing.assert_close(after[: len(kept)], before[: len(kept)], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(after[len(kept) :], before[len(kept) :], atol=1e-3)
    ablation.apply(loaded, original, plan, None, weight)  # the same edit, unconfined, moves them
    assert not torch.allclose(collect_residuals(loaded, kept, None, 1), before[: len(kept)], atol=1e-3)
