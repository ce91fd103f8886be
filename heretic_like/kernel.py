"""The layer kernel: how strongly each layer is edited, from four numbers per component and a shape."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KERNEL_SHAPES = ("tent", "cosine", "exponential")

# Decay rate of the exponential shape per unit of reach: e^-3 = 5 % is left at the reach, where the
# curve is shifted to meet `min_weight` exactly.
_EXPONENTIAL_RATE = 3.0


def falloff(shape: str, x: torch.Tensor) -> torch.Tensor:
    """The kernel's profile g(x) on x = distance / reach in [0, 1]: g(0) = 1, g(1) = 0, falling.

    "tent" is linear (Heretic's kernel). "cosine" (a Hann window) keeps the layers near the peak
    at almost full strength and has no corners: above the tent in the inner half of the reach,
    below it in the outer half. "exponential" spends the strength on the peak layer and its
    neighbours: below the tent everywhere between peak and edge. All share the four numbers.
    """
    if shape == "tent":
        return 1 - x
    if shape == "cosine":
        return (1 + torch.cos(math.pi * x)) / 2
    if shape == "exponential":
        edge = math.exp(-_EXPONENTIAL_RATE)
        return ((-_EXPONENTIAL_RATE * x).exp() - edge) / (1 - edge)
    raise unknown_shape(shape)


def unknown_shape(shape: str) -> ValueError:
    return ValueError(f"unknown kernel shape {shape!r} (expected one of {', '.join(KERNEL_SHAPES)})")


@dataclass(frozen=True)
class Kernel:
    """Peak `max_weight` at layer `max_weight_position`, falling along `shape` to `min_weight` at
    `min_weight_distance` layers away; zero beyond that distance."""

    max_weight: float
    max_weight_position: float
    min_weight: float
    min_weight_distance: float
    shape: str = "tent"  # studies from before kernel shapes stored no shape: they were tents

    def __post_init__(self) -> None:
        # a record from a newer version, or edited by hand, fails on reading, not after the model loads
        if self.shape not in KERNEL_SHAPES:
            raise unknown_shape(self.shape)

    def weights(self, num_layers: int) -> torch.Tensor:
        if self.min_weight_distance <= 0:
            raise ValueError("min_weight_distance must be > 0")
        distance = (torch.arange(num_layers, dtype=torch.float64) - self.max_weight_position).abs()
        if self.shape == "tent":  # the formula of earlier versions, so their records rebuild bit for bit
            weights = self.max_weight + (self.min_weight - self.max_weight) / self.min_weight_distance * distance
        else:
            x = (distance / self.min_weight_distance).clamp(max=1.0)
            weights = self.min_weight + (self.max_weight - self.min_weight) * falloff(self.shape, x)
        return torch.where(distance <= self.min_weight_distance, weights, torch.zeros_like(weights))
