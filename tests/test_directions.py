import pytest
import torch
import torch.nn.functional as F

from heretic_like.config import Settings  # noqa: F401  (import check)
from heretic_like.directions import (
    collect_residuals,
    interpolate_direction,
    layer_geometry,
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


def test_layer_geometry_values():
    bad = torch.tensor([[[3.0, 0.0]]])
    good = torch.tensor([[[0.0, 4.0]]])
    (row,) = layer_geometry(bad, good)
    assert row["harmful_norm"] == pytest.approx(3) and row["harmless_norm"] == pytest.approx(4)
    assert row["cosine"] == pytest.approx(0) and row["direction_norm"] == pytest.approx(5)


def test_collected_residuals_do_not_depend_on_padding(tiny_llama, tmp_path):
    loaded = load_model(settings_for(tiny_llama, tmp_path))
    prompts = ["short", "a much longer prompt with many more words in it"]
    batched = collect_residuals(loaded, prompts, "sys", batch_size=2)
    single = torch.cat([collect_residuals(loaded, [p], "sys", batch_size=1) for p in prompts])
    assert batched.shape == (2, loaded.num_layers, 64)
    assert torch.allclose(batched, single, atol=1e-4)
