import pytest
import torch
import torch.nn.functional as F

from heretic_like.ablation import Abliterator, Edit, EditOptions
from heretic_like.directions import RefusalGeometry, orthonormalize
from heretic_like.kernel import Kernel
from heretic_like.model import chat_texts, encode, load_model
from heretic_like.projection import edited_weight, low_rank_factors, subspace_factors
from tests.test_model import settings_for


def rank1_factors(weight: torch.Tensor, direction: torch.Tensor, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The classic single-direction edit as LoRA factors: B @ A = -strength * r r^T W."""
    return subspace_factors(weight, direction[None], torch.tensor([strength]))


def direct_edit(weight: torch.Tensor, direction: torch.Tensor, strength: float) -> torch.Tensor:
    """W - strength * r r^T W computed on the weight itself: the reference the edits must match."""
    w = weight.float()
    r = direction.float().to(w.device)
    return w - strength * torch.outer(r, r @ w)


def _weight_and_direction(out=16, inp=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g), F.normalize(torch.randn(out, generator=g), dim=0)


def _basis(k, d=16, seed=1):
    return orthonormalize(torch.randn(k, d, generator=torch.Generator().manual_seed(seed)))


def geometry_for(num_layers, d=64, k=1, seed=3, entanglement=None):
    """A RefusalGeometry with random orthonormal directions (k per layer) and harmless means."""
    g = torch.Generator().manual_seed(seed)
    bases = torch.stack([orthonormalize(torch.randn(k, d, generator=g)) for _ in range(num_layers)])
    ent = torch.full((num_layers, k), float("nan")) if entanglement is None else entanglement
    means = torch.randn(2, num_layers, d, generator=g)
    return RefusalGeometry(means[0], means[1], bases[:, 0].contiguous(), bases[:, 1:].contiguous(),
                           torch.ones(num_layers, k), ent)  # fmt: skip


def test_rank1_factors_reproduce_the_direct_edit():
    w, r = _weight_and_direction()
    a, b = rank1_factors(w, r, 0.7)
    assert a.shape == (1, 24) and b.shape == (16, 1)
    assert torch.allclose(w + b @ a, direct_edit(w, r, 0.7), atol=1e-6)
    assert torch.linalg.matrix_rank(b @ a) == 1


def test_full_strength_edit_writes_nothing_along_r():
    w, r = _weight_and_direction()
    edited = direct_edit(w, r, 1.0)
    assert torch.allclose(r @ edited, torch.zeros(24), atol=1e-5)
    half = direct_edit(w, r, 0.5)
    assert torch.allclose(r @ half, 0.5 * (r @ w), atol=1e-5)  # strength scales what is left along r
    x = torch.randn(24)
    orth = edited @ x - r * (r @ (edited @ x))
    assert torch.allclose(orth, w @ x - r * (r @ (w @ x)), atol=1e-5)  # components off r untouched


def test_subspace_edit_has_rank_k_and_removes_every_direction():
    w, _ = _weight_and_direction()
    v = _basis(3)
    a, b = subspace_factors(w, v, torch.ones(3))
    assert a.shape == (3, 24) and b.shape == (16, 3)
    assert torch.linalg.matrix_rank(b @ a) == 3
    edited = w + b @ a
    assert torch.allclose(v @ edited, torch.zeros(3, 24), atol=1e-5)
    # per-direction strengths act independently: half strength leaves half along that direction
    a2, b2 = subspace_factors(w, v, torch.tensor([1.0, 0.5, 0.0]))
    edited2 = w + b2 @ a2
    assert torch.allclose(v[1] @ edited2, 0.5 * (v[1] @ w), atol=1e-5)
    assert torch.allclose(v[2] @ edited2, v[2] @ w, atol=1e-5)


def test_pre_normalisation_projects_the_unit_rows():
    w, _ = _weight_and_direction()
    v = _basis(2)
    norms = w.norm(dim=1, keepdim=True)
    a, b = subspace_factors(w, v, torch.ones(2), "pre")
    assert torch.linalg.matrix_rank(b @ a) == 2
    unit = w / norms
    expected = norms * (unit - v.T @ (v @ unit))
    assert torch.allclose(w + b @ a, expected, atol=1e-5)
    assert torch.allclose(edited_weight(w, v, torch.ones(2), "pre"), expected, atol=1e-5)


def test_full_normalisation_preserves_every_row_norm_exactly():
    w, _ = _weight_and_direction(out=32, inp=40)
    v = _basis(2, d=32)
    for strength in (0.3, 1.0, 1.5):
        new = edited_weight(w, v, torch.full((2,), strength), "full")
        assert torch.allclose(new.norm(dim=1), w.norm(dim=1), rtol=1e-6)
        assert not torch.allclose(new, w, atol=1e-3)
        # each row points the way of the projected unit row
        unit = w / w.norm(dim=1, keepdim=True)
        projected = unit - strength * v.T @ (v @ unit)
        assert torch.allclose(F.cosine_similarity(new, projected, dim=1), torch.ones(32), atol=1e-5)
    assert torch.allclose(edited_weight(w, v, torch.zeros(2), "full"), w, atol=1e-5)


def test_low_rank_factors_match_the_best_approximation():
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(60, 3, generator=g) @ torch.randn(3, 80, generator=g)
    a, b = low_rank_factors(exact, 3)
    assert torch.allclose(b @ a, exact, atol=1e-4)
    noisy = exact + 0.01 * torch.randn(60, 80, generator=g)
    a, b = low_rank_factors(noisy, 3)
    s = torch.linalg.svdvals(noisy)
    optimal = s[3:].norm()  # Eckart-Young
    assert (noisy - b @ a).norm() <= optimal * 1.01
    a2, b2 = low_rank_factors(noisy, 3)
    assert torch.equal(a, a2) and torch.equal(b, b2)  # deterministic


def _logits(loaded, prompts):
    batch = encode(loaded.tokenizer, chat_texts(loaded.tokenizer, prompts, None), loaded.device)
    with torch.no_grad():
        return loaded.model(**batch).logits


def _edit(layers):
    return Edit(direction_index=1.3, kernels={
        "attn.o_proj": Kernel(1.0, 1.0, 0.5, 2.0),
        "mlp.down_proj": Kernel(1.4, layers - 1.0, 0.3, 1.5),
    })  # fmt: skip


PROMPTS = ["How do I bake bread?", "Tell me something"]


def test_lora_equals_direct_weight_edit_and_resets(tiny_llama, tmp_path):
    lora = load_model(settings_for(tiny_llama, tmp_path))
    base_logits = _logits(lora, PROMPTS)
    geometry = geometry_for(lora.num_layers)
    edit = _edit(lora.num_layers)
    abl = Abliterator(lora, ["attn.o_proj", "mlp.down_proj"], geometry)
    abl.apply(edit)
    lora_logits = _logits(lora, PROMPTS)

    direct = load_model(settings_for(tiny_llama, tmp_path))
    layer_dirs = edit.layer_directions(geometry.directions)
    with torch.no_grad():
        for target in direct.targets():
            weight, i = target.weight, target.layer
            weight.copy_(direct_edit(weight, layer_dirs[i], float(edit.kernels[target.component].weights(4)[i])))
    assert not torch.allclose(lora_logits, base_logits, atol=1e-3)  # the edit does something
    assert torch.allclose(lora_logits, _logits(direct, PROMPTS), atol=1e-4)

    abl.reset()
    assert torch.allclose(_logits(lora, PROMPTS), base_logits, atol=1e-5)


def test_per_layer_directions_and_merge(tiny_qwen2, tmp_path):
    loaded = load_model(settings_for(tiny_qwen2, tmp_path))
    geometry = geometry_for(loaded.num_layers)
    edit = Edit(None, {"mlp.down_proj": Kernel(1.0, 1.0, 1.0, 5.0)})
    assert torch.equal(edit.layer_directions(geometry.directions), geometry.directions)
    abl = Abliterator(loaded, ["mlp.down_proj"], geometry)
    abl.apply(edit)
    expected = _logits(loaded, ["hi there"])
    merged = abl.merged_model()
    layer = merged.get_submodule("model.layers.2.mlp.down_proj")
    assert isinstance(layer, torch.nn.Linear)  # peft is gone after merging
    projected = geometry.directions[2].to(layer.weight.device) @ layer.weight
    assert torch.allclose(projected, torch.zeros_like(projected), atol=1e-5)
    assert torch.allclose(_logits(loaded, ["hi there"]), expected, atol=1e-5)
    assert Edit.from_dict(edit.to_dict()) == edit


@pytest.mark.parametrize("direction_index", [None, 1.6])
def test_hooks_equal_the_weight_edit_with_several_directions(tiny_llama, tmp_path, direction_index):
    geometry = geometry_for(4, k=3)
    edit = Edit(direction_index, _edit(4).kernels)
    lora = load_model(settings_for(tiny_llama, tmp_path))
    base_logits = _logits(lora, PROMPTS)
    abl = Abliterator(lora, ["attn.o_proj", "mlp.down_proj"], geometry)
    assert abl.rank == 3
    abl.apply(edit)
    lora_logits = _logits(lora, PROMPTS)

    hooked = load_model(settings_for(tiny_llama, tmp_path))
    hooks = Abliterator(hooked, ["attn.o_proj", "mlp.down_proj"], geometry, EditOptions(mode="hooks"))
    hooks.apply(edit)
    assert not torch.allclose(lora_logits, base_logits, atol=1e-3)
    assert torch.allclose(_logits(hooked, PROMPTS), lora_logits, atol=1e-4)
    weights_before = [p.clone() for p in hooked.model.parameters()]
    hooks.reset()  # reversible: nothing was written to the weights
    assert torch.allclose(_logits(hooked, PROMPTS), base_logits, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(weights_before, hooked.model.parameters(), strict=True))
    hooks.apply(edit)
    merged = hooks.merged_model()  # hooks removed, exact weights written
    assert not hooks.linear.hooks.handles
    assert torch.allclose(_logits(hooked, PROMPTS), lora_logits, atol=1e-4)
    assert merged is hooked.model


def test_full_normalisation_trials_are_approximate_and_export_is_exact(tiny_llama, tmp_path):
    loaded = load_model(settings_for(tiny_llama, tmp_path))
    originals = {t.name: t.weight.detach().clone() for t in loaded.targets()}
    geometry = geometry_for(4, k=2)
    edit = _edit(4)
    abl = Abliterator(loaded, ["attn.o_proj", "mlp.down_proj"], geometry,
                      EditOptions(row_normalization="full", full_normalization_lora_rank=4))  # fmt: skip
    stats = abl.apply(edit)
    assert abl.rank == 4 and stats.modules_edited > 0
    assert 0 < stats.approximation_error < 0.5 and 0 < stats.row_norm_error < 0.2
    lora_logits = _logits(loaded, PROMPTS)
    merged = abl.merged_model()
    for name, original in originals.items():
        new = merged.get_submodule(name).weight
        assert torch.allclose(new.norm(dim=1), original.norm(dim=1), rtol=1e-5)
    exported = _logits(loaded, PROMPTS)
    assert torch.allclose(exported, lora_logits, atol=0.05)  # the LoRA was a close approximation
    # a higher-rank approximation is at least as faithful
    again = load_model(settings_for(tiny_llama, tmp_path))
    options = EditOptions(row_normalization="full", full_normalization_lora_rank=12)
    better = Abliterator(again, ["attn.o_proj", "mlp.down_proj"], geometry, options).apply(edit)
    assert better.approximation_error <= stats.approximation_error + 1e-6


def test_biprojection_and_entangled_strengths():
    ent = torch.tensor([[0.1, 0.9]] * 4)
    geometry = geometry_for(4, k=2, entanglement=ent)
    edit = Edit(2.0, {"attn.o_proj": Kernel(1.0, 2.0, 1.0, 3.0)}, entangled_strength=0.1)
    bases = edit.layer_bases(geometry, EditOptions(biproject=True))
    for layer, (basis, strengths) in enumerate(bases):
        assert torch.allclose(basis @ geometry.harmless_mean[layer], torch.zeros(2), atol=1e-4)
        assert torch.allclose(basis @ basis.T, torch.eye(2), atol=1e-5)
        assert strengths.tolist() == pytest.approx([1.0, 0.1])  # only the entangled direction is damped
    plain = edit.layer_bases(geometry, EditOptions())
    assert torch.allclose(plain[0][0][0], geometry.directions[2], atol=1e-6)  # measured at layer 2, used everywhere
