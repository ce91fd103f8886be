import pytest
import torch

from heretic_like.kernel import Kernel


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
