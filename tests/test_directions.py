import pytest
import torch
import torch.nn.functional as F

from heretic_like.config import Settings  # noqa: F401  (import check)
from heretic_like.directions import (
    RefusalGeometry,
    biproject,
    collect_residuals,
    cross_layer_cosine,
    entanglement,
    extra_directions,
    fisher_ratio,
    interpolate_direction,
    layer_metrics,
    measure,
    orthonormalize,
    refusal_directions,
    winsorize,
)
from heretic_like.model import load_model
from tests.test_model import settings_for


def _activations(seed=0, n=50, layers=3, d=8):
    g = torch.Generator().manual_seed(seed)
    good = torch.randn(n, layers, d, generator=g) + 2.0
    shift = torch.zeros(d)
    shift[0] = 3.0
    bad = torch.randn(n, layers, d, generator=g) + 2.0 + shift
    return bad, good


def test_direction_is_unit_normalised_mean_difference():
    bad, good = _activations()
    r = refusal_directions(bad, good)
    assert torch.allclose(r.norm(dim=-1), torch.ones(3), atol=1e-6)
    expected = F.normalize(bad.mean(0) - good.mean(0), dim=-1)
    assert torch.allclose(r, expected, atol=1e-6)
    assert (r[:, 0] > 0.8).all()  # the planted shift dominates


def test_orthogonalized_direction_is_orthogonal_to_harmless_mean():
    bad, good = _activations()
    r = refusal_directions(bad, good, orthogonalize=True)
    cos = F.cosine_similarity(r.double(), good.double().mean(0), dim=-1)
    assert torch.allclose(cos, torch.zeros(3, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(r.norm(dim=-1), torch.ones(3), atol=1e-6)


def test_winsorize_clamps_massive_activations_only():
    x = torch.ones(2, 1, 100)
    x[0, 0, 7] = 1000.0
    out = winsorize(x, 0.95)
    assert out[0, 0, 7] == 1.0 and torch.equal(out[1], x[1])
    assert torch.equal(winsorize(x, 1.0), x)


def test_interpolation_hits_layers_and_blends_between():
    d = torch.eye(4)[:3]
    assert torch.allclose(interpolate_direction(d, 1.0), d[1])
    mid = interpolate_direction(d, 0.5)
    assert torch.allclose(mid, F.normalize(d[0] + d[1], dim=0))
    assert torch.allclose(interpolate_direction(d, 2.0), d[2])
    with pytest.raises(ValueError):
        interpolate_direction(d, 2.5)


def test_layer_metrics_on_constructed_means():
    # layer 0: orthogonal means 3 and 4 -> |r| = 5, snr = 5/4, cos = 0, quality = 1.25
    # layer 1: identical means -> no direction at all: snr = 0, cos = 1, quality = 0
    bad = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    good = torch.tensor([[0.0, 4.0], [1.0, 1.0]])
    table = layer_metrics(bad, good)
    assert table.loc[0, "snr"] == pytest.approx(1.25) and table.loc[0, "cosine"] == pytest.approx(0)
    assert table.loc[0, "quality"] == pytest.approx(1.25) and table.loc[0, "direction_norm"] == pytest.approx(5)
    assert table.loc[1, "snr"] == pytest.approx(0) and table.loc[1, "cosine"] == pytest.approx(1)
    assert table.loc[1, "quality"] == pytest.approx(0)
    assert table["quality"].idxmax() == 0


def test_cross_layer_cosine_is_symmetric_with_unit_diagonal():
    d = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    cos = cross_layer_cosine(d)
    assert torch.allclose(cos, cos.T) and torch.allclose(cos.diagonal(), torch.ones(5, dtype=cos.dtype))
    assert torch.allclose(cos[0, 1], F.cosine_similarity(d[0], d[1], dim=0).double(), atol=1e-6)


def test_fisher_ratio_prefers_the_separating_axis():
    g = torch.Generator().manual_seed(0)
    good = torch.randn(200, 2, generator=g)
    bad = torch.randn(200, 2, generator=g) + torch.tensor([4.0, 0.0])
    ratio = fisher_ratio(bad, good)
    assert ratio[0] > 5 and ratio[1] < 0.1
    assert fisher_ratio(torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [0.0]]))[0] == pytest.approx(4 / 1)


def test_entanglement_is_high_where_capability_prompts_vary():
    good_mean = torch.zeros(3)
    bad_mean = torch.tensor([2.0, 2.0, 0.0])
    g = torch.Generator().manual_seed(0)
    capability = torch.randn(400, 3, generator=g) * torch.tensor([0.01, 10.0, 1.0])
    e = entanglement(capability, bad_mean, good_mean, torch.eye(3)[:2])
    assert e[0] < 0.05 and e[1] > 0.8  # axis 0 is refusal-only, axis 1 is busy with capability work
    assert ((e >= 0) & (e <= 1)).all()


def test_orthonormalize_and_biproject():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, 10, generator=g)
    q = orthonormalize(v)
    assert torch.allclose(q @ q.T, torch.eye(3), atol=1e-5)
    assert (torch.einsum("kd,kd->k", q, v) > 0).all()  # signs kept
    good = torch.randn(10, generator=g)
    b = biproject(q, good)
    assert torch.allclose(b @ good, torch.zeros(3), atol=1e-5)
    assert torch.allclose(b @ b.T, torch.eye(3), atol=1e-5)


def _planted(seed=0, n=120, layers=3, d=12):
    """Harmful residuals shifted along axis 0 and, for half of them, also along axis 1."""
    g = torch.Generator().manual_seed(seed)
    good = torch.randn(n, layers, d, generator=g)
    bad = torch.randn(n, layers, d, generator=g)
    good[..., 5] += 10.0  # a large shared component, as real residual means have
    bad[..., 5] += 10.0
    bad[..., 0] += 4.0
    bad[: n // 2, :, 1] += 6.0
    return bad, good


def test_extra_directions_find_the_second_planted_axis():
    bad, good = _planted()
    main = refusal_directions(bad, good)
    extra, fisher = extra_directions(bad, good, main, count=2, candidates=6)
    assert extra.shape == (3, 2, 12) and fisher.shape == (3, 2)
    for layer in range(3):
        basis = torch.cat([main[layer : layer + 1], extra[layer]])
        assert torch.allclose(basis @ basis.T, torch.eye(3), atol=1e-5)  # orthonormal with the main one
    # the mean difference mixes axes 0 and 1; the best extra direction carries the rest of them
    plane = extra[:, 0, :2].norm(dim=-1)
    assert (plane > 0.9).all()
    assert (fisher[:, 0] >= fisher[:, 1]).all()  # ranked by separability


def test_measure_round_trips_and_picks_the_best_layer():
    bad, good = _planted()
    bad[:, 2, 0] += 20.0  # layer 2 separates far better
    capability = torch.randn(30, 3, 12)
    geometry = measure(bad, good, capability, directions_per_layer=2)
    assert geometry.directions_per_layer == 2 and geometry.best_layer() == 2
    assert geometry.top_layers(2)[0] == 2
    assert not torch.isnan(geometry.entanglement).any()
    again = RefusalGeometry.from_dict(geometry.to_dict())
    assert torch.equal(again.subspace(1), geometry.subspace(1))
    assert "fisher" in geometry.metrics() and "entanglement" in geometry.metrics()
    assert torch.isnan(measure(bad, good).entanglement).all()


def test_best_layer_looks_only_inside_the_window():
    bad, good = _planted(layers=11)
    for layer, shift in ((10, 30.0), (6, 12.0), (3, 20.0)):
        bad[:, layer, 0] += shift  # quality peaks at the last layer, then layer 3, then layer 6
    geometry = measure(bad, good)
    assert geometry.best_layer() == 10
    assert geometry.best_layer((0.4, 0.9)) == 6  # layers 4..9: the last layer and layer 3 are outside
    assert geometry.candidate_layers((0.4, 0.9)) == [4, 5, 6, 7, 8, 9]
    assert geometry.top_layers(2, (0.0, 0.9))[:2] == [3, 6]
    assert geometry.candidate_layers((0.33, 0.34)) == [3]  # no layer inside: the nearest one


def test_collected_residuals_do_not_depend_on_padding(tiny_llama, tmp_path):
    loaded = load_model(settings_for(tiny_llama, tmp_path))
    prompts = ["short", "a much longer prompt with many more words in it"]
    batched = collect_residuals(loaded, prompts, "sys", batch_size=2)
    single = torch.cat([collect_residuals(loaded, [p], "sys", batch_size=1) for p in prompts])
    assert batched.shape == (2, loaded.num_layers, 64)
    assert torch.allclose(batched, single, atol=1e-4)


def test_residuals_are_the_layer_outputs_before_the_final_norm(tiny_llama, tmp_path):
    from heretic_like.model import chat_texts, encode

    loaded = load_model(settings_for(tiny_llama, tmp_path))
    collected = collect_residuals(loaded, ["a prompt"], "sys", batch_size=1)[0]
    batch = encode(loaded.tokenizer, chat_texts(loaded.tokenizer, ["a prompt"], "sys"), loaded.device)
    with torch.no_grad():
        hidden = loaded.model(**batch, output_hidden_states=True).hidden_states
    assert torch.allclose(collected[:-1], torch.stack([h[0, -1] for h in hidden[1:-1]]).float(), atol=1e-5)
    # transformers' last hidden state is the final norm's output; ours is what the last layer wrote
    assert not torch.allclose(collected[-1], hidden[-1][0, -1].float(), atol=1e-3)
    with torch.no_grad():
        assert torch.allclose(loaded.model.model.norm(collected[-1]), hidden[-1][0, -1].float(), atol=1e-5)


def test_residuals_at_an_earlier_prompt_token(tiny_llama, tmp_path):
    from heretic_like.model import chat_texts, encode

    loaded = load_model(settings_for(tiny_llama, tmp_path))
    prompts = ["short", "a much longer prompt with many more words in it"]
    collected = collect_residuals(loaded, prompts, "sys", batch_size=2, position=-3)
    for row, prompt in enumerate(prompts):  # each prompt alone: no padding, position -3 is its own
        batch = encode(loaded.tokenizer, chat_texts(loaded.tokenizer, [prompt], "sys"), loaded.device)
        with torch.no_grad():
            hidden = loaded.model(**batch, output_hidden_states=True).hidden_states
        assert torch.allclose(collected[row, :-1], torch.stack([h[0, -3] for h in hidden[1:-1]]).float(), atol=1e-4)
    assert not torch.allclose(collected, collect_residuals(loaded, prompts, "sys", batch_size=2), atol=1e-3)


def test_a_position_before_a_prompts_first_token_is_an_error_naming_it(tiny_llama, tmp_path):
    from heretic_like.errors import HereticError
    from heretic_like.model import chat_texts

    loaded = load_model(settings_for(tiny_llama, tmp_path))
    prompts = ["short", "a much longer prompt with many more words in it than the short one"]
    text = chat_texts(loaded.tokenizer, ["short"], None)[0]
    shortest = len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert collect_residuals(loaded, prompts, None, batch_size=2, position=-shortest).shape[0] == 2
    with pytest.raises(HereticError, match=rf"direction_position = -{shortest + 1}: the prompt 'short' has fewer"):
        collect_residuals(loaded, prompts, None, batch_size=2, position=-(shortest + 1))
