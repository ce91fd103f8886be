"""The layer kernel: how strongly each layer is edited, from four numbers per component."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Kernel:
    """Peak `max_weight` at layer `max_weight_position`, falling linearly to `min_weight` at
    `min_weight_distance` layers away; zero beyond that distance."""

    max_weight: float
    max_weight_position: float
    min_weight: float
    min_weight_distance: float

    def weights(self, num_layers: int) -> torch.Tensor:
        if self.min_weight_distance <= 0:
            raise ValueError("min_weight_distance must be > 0")
        distance = (torch.arange(num_layers, dtype=torch.float64) - self.max_weight_position).abs()
        slope = (self.min_weight - self.max_weight) / self.min_weight_distance
        weights = self.max_weight + slope * distance
        return torch.where(distance <= self.min_weight_distance, weights, torch.zeros_like(weights))
