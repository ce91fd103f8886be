"""`preserved_input_rank`, the null-space edit: the confinement's algebra, the bases' accuracy,
an edited model that leaves the preserved prompts alone, and a study that exports and rebuilds it."""

import pytest
import torch

from heretic_like.ablation import Abliterator, Edit, EditOptions
from heretic_like.cli import main
from heretic_like.config import load_settings
from heretic_like.directions import RefusalGeometry, collect_residuals
from heretic_like.errors import HereticError
from heretic_like.kernel import Kernel
from heretic_like.model import chat_texts, encode, load_model
from heretic_like.preservation import preserved_inputs
from heretic_like.projection import composed_factors, composed_weight, confined, edited_weight, subspace_factors
from heretic_like.provenance import read_record, weight_hashes
from tests.conftest import study_config

COMPONENTS = ["attn.o_proj", "mlp.down_proj"]


def _orthonormal_rows(k: int, d: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=generator)).Q.T


@pytest.mark.parametrize("row_normalization", ["none", "pre", "full"])
def test_a_confined_edit_writes_kept_inputs_as_before_and_the_rest_as_the_edit_does(row_normalization):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 20, generator=generator)
    basis, strengths = _orthonormal_rows(2, 12, 1), torch.tensor([1.0, 0.7])
    kept = _orthonormal_rows(6, 20, 2)
    free = torch.linalg.qr(torch.cat([kept.T, torch.randn(20, 14, generator=generator)], 1)).Q[:, 6:].T
    plain = edited_weight(weight, basis, strengths, row_normalization)
    confined_weight = edited_weight(weight, basis, strengths, row_normalization, kept)
    torch.testing.assert_close(confined_weight @ kept.T, weight @ kept.T)  # kept inputs: written as before
    torch.testing.assert_close(confined_weight @ free.T, plain @ free.T)  # the rest: the edit's
    assert not torch.allclose(plain @ kept.T, weight @ kept.T, atol=1e-3)  # unconfined, they moved
    if row_normalization != "full":  # exact LoRA factors: rank unchanged, the same delta
        a, b = subspace_factors(weight, basis, strengths, row_normalization, kept)
        assert a.shape == (2, 20)
        torch.testing.assert_close(weight + b @ a, confined_weight)
    torch.testing.assert_close(confined(confined_weight - weight, kept), confined_weight - weight)  # idempotent
    assert confined(plain, None) is plain


def test_composed_steps_are_each_edit_in_turn_and_their_factors_are_exact():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(12, 20, generator=generator)
    first = (_orthonormal_rows(2, 12, 4), torch.tensor([1.0, 0.5]), "pre", None)
    second = (_orthonormal_rows(1, 12, 5), torch.tensor([1.5]), "none", _orthonormal_rows(6, 20, 6))
    after_first = edited_weight(weight, *first)
    torch.testing.assert_close(composed_weight(weight, [first]), after_first)
    both = composed_weight(weight, [first, second])
    torch.testing.assert_close(both, edited_weight(after_first, *second))
    a, b = composed_factors(weight, [first, second])
    assert a.shape == (3, 20) and b.shape == (12, 3)  # one rank per direction, as the LoRA holds
    torch.testing.assert_close(weight + b @ a, both)
    # the confined second step leaves the kept inputs as the first step wrote them
    torch.testing.assert_close(both @ second[3].T, after_first @ second[3].T)


def _loaded(model_dir, tmp_path):
    return load_model(load_settings(overrides={"model": str(model_dir), "dtypes": ["float32"],
                                               "cache_dir": str(tmp_path / "cache")}))  # fmt: skip


def _inputs(loaded, texts: list[str], target) -> torch.Tensor:
    """Every non-padding token's input to `target`, collected plainly (the reference)."""
    rows = []
    handle = target.module.register_forward_pre_hook(lambda module, args: rows.append(args[0][mask]))
    batch = encode(loaded.tokenizer, texts, loaded.device)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        loaded.model(**batch)
    handle.remove()
    return torch.cat(rows).float()


def test_the_bases_are_the_inputs_top_principal_directions(tiny_qwen2, tmp_path):
    loaded = _loaded(tiny_qwen2, tmp_path)
    texts = chat_texts(loaded.tokenizer, ["How do I bake bread?", "Tell me a story about a fox.",
                                          "What is the capital of France?", "Name a prime number."], None)  # fmt: skip
    bases = preserved_inputs(loaded, ["mlp.down_proj", "attn.o_proj"], texts, 8, batch_size=3)
    assert set(bases) == {(c, layer) for c in ("mlp.down_proj", "attn.o_proj") for layer in range(3)}
    for target in loaded.targets(["mlp.down_proj", "attn.o_proj"]):
        basis = bases[(target.component, target.layer)]
        assert basis.shape == (8, target.weight.shape[1])
        torch.testing.assert_close(basis @ basis.T, torch.eye(8), atol=1e-5, rtol=0)
        inputs = _inputs(loaded, texts, target)
        exact = torch.linalg.svd(inputs, full_matrices=False).Vh[:8]
        # as much of the inputs' energy as the best rank-8 subspace holds, and (nearly) that subspace
        assert (inputs @ basis.T).square().sum() >= 0.999 * (inputs @ exact.T).square().sum()
        torch.testing.assert_close(basis.T @ basis, exact.T @ exact, atol=1e-2, rtol=0)
    again = preserved_inputs(loaded, ["mlp.down_proj", "attn.o_proj"], texts, 8, batch_size=3)
    assert all(torch.equal(again[key], bases[key]) for key in bases)  # a rebuild gets the same bits


def test_a_rank_the_modules_cannot_take_is_a_one_line_error(tiny_qwen2, tmp_path):
    loaded = _loaded(tiny_qwen2, tmp_path)
    with pytest.raises(HereticError, match=r"preserved_input_rank = 64: must be below .* input size \(64\)"):
        preserved_inputs(loaded, COMPONENTS, ["hello"], 64, 4)


def _geometry(loaded, seed: int = 0) -> RefusalGeometry:
    n, d = loaded.num_layers, loaded.model.config.hidden_size
    generator = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=-1)
    zeros = torch.zeros(n, d)
    return RefusalGeometry(harmful_mean=zeros, harmless_mean=zeros, directions=directions, extra=torch.zeros(n, 0, d),
                           fisher=torch.ones(n, 1), entanglement=torch.full((n, 1), float("nan")))  # fmt: skip


def test_the_edited_model_leaves_the_preserved_prompts_alone_and_its_export_is_the_trial(tiny_qwen2, tmp_path):
    loaded = _loaded(tiny_qwen2, tmp_path)
    kept_prompt, other = ["How do I bake bread?"], ["Name three colours of the rainbow."]
    texts = chat_texts(loaded.tokenizer, kept_prompt, None)  # 20 tokens: their inputs span 20 directions
    before = collect_residuals(loaded, kept_prompt + other, None, 1)
    bases = preserved_inputs(loaded, COMPONENTS, texts, 24, batch_size=1)
    editor = Abliterator(loaded, COMPONENTS, _geometry(loaded), EditOptions(), bases)
    edit = Edit(direction_index=None, kernels={c: Kernel(1.5, 1.0, 1.0, 2.0) for c in COMPONENTS})
    editor.apply(edit)
    during = collect_residuals(loaded, kept_prompt + other, None, 1)
    torch.testing.assert_close(during[0], before[0], atol=1e-4, rtol=1e-4)  # the preserved prompt: unchanged
    assert not torch.allclose(during[1], before[1], atol=1e-3)  # another prompt: edited
    merged = editor.merged_model()  # the exact weights export writes: the same model as the LoRA
    loaded.model = merged
    torch.testing.assert_close(collect_residuals(loaded, kept_prompt + other, None, 1), during, atol=1e-5, rtol=1e-5)


def test_with_the_global_scope_only_the_global_direction_is_confined(tiny_qwen2, tmp_path):
    from heretic_like.ablation import GlobalDirection

    loaded = _loaded(tiny_qwen2, tmp_path)
    kept_prompt, other = ["How do I bake bread?"], ["Name three colours of the rainbow."]
    before = collect_residuals(loaded, kept_prompt + other, None, 1)
    bases = preserved_inputs(loaded, COMPONENTS, chat_texts(loaded.tokenizer, kept_prompt, None), 24, batch_size=1)
    options = EditOptions(global_direction=True, preserve_scope="global_direction")
    editor = Abliterator(loaded, COMPONENTS, _geometry(loaded), options, bases)
    off = {c: Kernel(0.0, 1.0, 0.0, 1.0) for c in COMPONENTS}
    editor.apply(Edit(None, off, global_direction=GlobalDirection(0.5, 1.5)))  # the global direction alone
    alone = collect_residuals(loaded, kept_prompt + other, None, 1)
    torch.testing.assert_close(alone[0], before[0], atol=1e-4, rtol=1e-4)  # confined: the kept prompt stays
    assert not torch.allclose(alone[1], before[1], atol=1e-3)
    edit = Edit(None, {c: Kernel(1.5, 1.0, 1.0, 2.0) for c in COMPONENTS}, global_direction=GlobalDirection(0.5, 1.5))
    editor.apply(edit)  # the kernels' edit is not confined: the kept prompt moves
    during = collect_residuals(loaded, kept_prompt + other, None, 1)
    assert not torch.allclose(during[0], before[0], atol=1e-3)
    loaded.model = editor.merged_model()  # the exact two-step weights are the trial's model
    torch.testing.assert_close(collect_residuals(loaded, kept_prompt + other, None, 1), during, atol=1e-5, rtol=1e-5)


def test_the_global_scope_without_kept_inputs_is_the_plain_edit(tiny_qwen2, tmp_path):
    """At preserved_input_rank = 0 nothing is confined, so the scope must not split the edit into
    two steps (another edit under "full", and a failure in hook mode)."""
    from heretic_like.ablation import GlobalDirection

    edit = Edit(None, {c: Kernel(1.5, 1.0, 1.0, 2.0) for c in COMPONENTS}, global_direction=GlobalDirection(0.5, 1.0))
    plans = {}
    for scope in ("edit", "global_direction"):
        loaded = _loaded(tiny_qwen2, tmp_path)  # each editor wraps its own model
        options = EditOptions(row_normalization="full", global_direction=True, preserve_scope=scope)
        plans[scope] = Abliterator(loaded, COMPONENTS, _geometry(loaded), options).plan(edit)
    for component in COMPONENTS:
        for ours, plain in zip(plans["global_direction"][component], plans["edit"][component], strict=True):
            assert len(ours) == len(plain) == 1
            assert all(torch.equal(a, b) for a, b in zip(ours[0][:2], plain[0][:2], strict=True))


def test_hooks_cannot_confine_an_edit(tiny_qwen2, tmp_path):
    loaded = _loaded(tiny_qwen2, tmp_path)
    bases = preserved_inputs(loaded, COMPONENTS, ["hello there"], 4, 1)
    with pytest.raises(ValueError, match="hooks' cannot confine"):
        Abliterator(loaded, COMPONENTS, _geometry(loaded), EditOptions(mode="hooks"), bases)


@pytest.mark.parametrize("scope", ["edit", "global_direction"])
def test_a_confined_study_exports_and_rebuilds_bit_identical_weights(tiny_llama, tmp_path, capsys, scope):
    config = study_config(tmp_path, tiny_llama, n_trials=2, export_trial=1, preserved_input_rank=16,
                          preserved_input_scope=f'"{scope}"', row_normalization='"full"', prune_dominated="false",
                          export_dir=f'"{tmp_path / "export"}"',
                          search="global_direction = true\n" if scope == "global_direction" else "")  # fmt: skip
    assert main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "Edits leave alone the top 16 directions of each module's inputs on 150 harmless prompts" in out
    record_path = tmp_path / "export" / "reproduce.json"
    assert read_record(record_path)["config"]["preserved_input_rank"] == 16
    assert main(["reproduce", str(record_path), "--out", str(tmp_path / "again")]) == 0
    assert "bit-identical" in capsys.readouterr().out
    # export in another process measures the bases again, and writes the same weights
    (journal,) = (tmp_path / "checkpoints").glob("*.journal")
    assert main(["export", "--study", str(journal), "--trial", "1", "--out", str(tmp_path / "elsewhere")]) == 0
    assert weight_hashes(tmp_path / "elsewhere") == weight_hashes(tmp_path / "export")


@pytest.mark.parametrize(("flags", "message"), [
    (["--edit-mode", "hooks", "--row-normalization", "none", "--preserved-input-rank", "8"],
     "edit_mode = 'hooks' needs preserved_input_rank = 0 (got 8)"),
    (["--preserved-input-rank", "-1"], "preserved_input_rank"),
    (["--preserved-input-scope", "global_direction"],
     "preserved_input_scope = 'global_direction' needs search.global_direction = true"),
])  # fmt: skip
def test_a_rank_the_config_cannot_take_is_a_one_line_error(flags, message, capsys):
    assert main(["config", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_fused_experts_cannot_be_confined(tiny_qwen2_moe, tmp_path):
    loaded = _loaded(tiny_qwen2_moe, tmp_path)
    with pytest.raises(HereticError, match="preserved_input_rank: not for fused MoE expert weights"):
        preserved_inputs(loaded, ["mlp.down_proj"], ["hello"], 4, 1)


def test_the_probe_scales_every_strength_and_keeps_the_kernels_shapes():
    from heretic_like.ablation import GlobalDirection
    from tests.conftest import load_benchmark

    probe = load_benchmark("null_space_probe")
    edit = Edit(direction_index=12.5, kernels={"attn.o_proj": Kernel(1.2, 14.0, 0.4, 6.0, "cosine")},
                entangled_strength=0.8, second_peak=Kernel(0.5, 8.0, 0.1, 2.0),
                global_direction=GlobalDirection(0.2, 0.6))  # fmt: skip
    twice = probe.scaled(edit, 2.0)
    assert twice.kernels["attn.o_proj"] == Kernel(2.4, 14.0, 0.8, 6.0, "cosine")
    assert twice.second_peak == Kernel(1.0, 8.0, 0.2, 2.0)
    assert twice.global_direction == GlobalDirection(0.2, 1.2)
    assert (twice.direction_index, twice.entangled_strength) == (12.5, 0.8)  # where, not how much
    assert probe.scaled(Edit(None, {}), 3.0) == Edit(None, {})
