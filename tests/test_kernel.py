from typing import get_args

import optuna
import pytest
import torch

from heretic_like.ablation import Edit
from heretic_like.config import SearchSpace, default_data
from heretic_like.directions import RefusalGeometry
from heretic_like.kernel import KERNEL_SHAPES, Kernel, falloff
from heretic_like.search import sample_edit


def test_peak_falloff_and_cutoff():
    k = Kernel(max_weight=1.2, max_weight_position=5.0, min_weight=0.2, min_weight_distance=2.0)
    w = k.weights(10)
    assert w[5] == pytest.approx(1.2)
    assert w[4] == pytest.approx(0.7) and w[6] == pytest.approx(0.7)  # halfway: mean of max and min
    assert w[3] == pytest.approx(0.2) and w[7] == pytest.approx(0.2)  # at the distance: min_weight
    assert torch.all(w[:3] == 0) and torch.all(w[8:] == 0)  # beyond it: untouched


def test_fractional_position_is_symmetric_and_linear():
    w = Kernel(1.0, 2.5, 0.0, 3.0).weights(6)
    assert w[2] == pytest.approx(w[3])
    diffs = w[:3].diff()
    assert torch.allclose(diffs, diffs[0].expand_as(diffs))


def test_zero_distance_rejected():
    with pytest.raises(ValueError):
        Kernel(1.0, 0.0, 0.0, 0.0).weights(3)


@pytest.mark.parametrize("shape", KERNEL_SHAPES)
def test_every_shape_keeps_the_four_numbers_meaning(shape):
    """Peak at the position, min_weight at the reach, zero beyond, symmetric, never rising outward."""
    k = Kernel(max_weight=1.3, max_weight_position=6.0, min_weight=0.3, min_weight_distance=4.0, shape=shape)
    w = k.weights(13)
    assert w[6] == pytest.approx(1.3)
    assert w[2] == pytest.approx(0.3) and w[10] == pytest.approx(0.3)
    assert torch.all(w[:2] == 0) and torch.all(w[11:] == 0)
    assert torch.allclose(w[2:11], w[2:11].flip(0))
    assert torch.all(w[2:7].diff() > 0)  # strictly rising to the peak: every layer inside is edited
    x = torch.linspace(0, 1, 101, dtype=torch.float64)
    g = falloff(shape, x)
    assert g[0] == pytest.approx(1.0) and g[-1] == pytest.approx(0.0, abs=1e-12)
    assert torch.all(g.diff() < 0)


def test_cosine_is_flat_topped_and_exponential_is_peaked():
    x = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    tent, cosine, exponential = (falloff(s, x) for s in ("tent", "cosine", "exponential"))
    inner, outer = x < 0.5, x > 0.5
    assert torch.all(cosine[inner] > tent[inner]) and torch.all(cosine[outer] < tent[outer])
    assert torch.all(exponential < tent)
    # flat top: the cosine loses ~nothing one small step from the peak, the tent loses the step
    step = torch.tensor([1e-3], dtype=torch.float64)
    assert 1 - falloff("cosine", step) < 1e-5 and 1 - falloff("tent", step) == pytest.approx(1e-3)


def test_unknown_shape_is_named_on_construction():
    with pytest.raises(ValueError, match="'gauss'"):
        Kernel(1.0, 0.0, 0.0, 2.0, "gauss")
    with pytest.raises(ValueError, match="'gauss'"):
        falloff("gauss", torch.zeros(1))


def test_config_offers_exactly_the_shapes_the_kernel_knows():
    (literal,) = get_args(SearchSpace.model_fields["kernel_shape"].annotation)
    assert get_args(literal) == KERNEL_SHAPES


def test_edits_stored_before_shapes_load_as_tents():
    kernel = {"max_weight": 1.0, "max_weight_position": 1.0, "min_weight": 0.5, "min_weight_distance": 2.0}
    old = {"direction_index": 1.0, "kernels": {"attn.o_proj": kernel}}
    edit = Edit.from_dict(old)
    assert edit.kernels["attn.o_proj"].shape == "tent"
    assert Edit.from_dict(edit.to_dict()) == edit


def test_sampled_shape_is_a_parameter_only_when_there_is_a_choice():
    space = SearchSpace(**{**default_data()["search"], "direction_scope": ["per_layer"]})
    n, d = 4, 8
    geometry = RefusalGeometry(torch.zeros(n, d), torch.zeros(n, d), torch.eye(n, d), torch.zeros(n, 0, d),
                               torch.zeros(n, 1), torch.zeros(n, 1))  # fmt: skip
    values = {"max_weight": 1.0, "min_weight_fraction": 0.5, "max_weight_position": 2.5, "min_weight_distance": 1.0}
    params = {f"{c}.{name}": v for c in space.components for name, v in values.items()}  # in the default ranges
    edit = sample_edit(optuna.trial.FixedTrial(params), space, geometry)
    assert {k.shape for k in edit.kernels.values()} == {"tent"}
    several = space.model_copy(update={"kernel_shape": ["tent", "cosine", "exponential"]})
    shaped = {**params, "attn.o_proj.kernel_shape": "cosine", "mlp.down_proj.kernel_shape": "exponential"}
    edit = sample_edit(optuna.trial.FixedTrial(shaped), several, geometry)
    assert edit.kernels["attn.o_proj"].shape == "cosine" and edit.kernels["mlp.down_proj"].shape == "exponential"
    with pytest.raises(ValueError):  # a FixedTrial without the shape: it is a sampled parameter now
        sample_edit(optuna.trial.FixedTrial(params), several, geometry)
