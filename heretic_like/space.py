"""The search space: what the Optuna sampler may choose per trial (the `[search]` table)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    """A config table: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Range(Strict):
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        return self


class SearchSpace(Strict):
    """What the Optuna sampler may choose per trial.

    Layer positions are fractions of the last layer index (0 = first layer, 1 = last) so one
    search space fits models of any depth; `min_weight` is a fraction of `max_weight`.
    """

    components: list[Literal["attn.o_proj", "mlp.down_proj"]] = Field(min_length=1)
    direction_scope: list[Literal["global", "per_layer", "best_layer"]] = Field(min_length=1)
    direction_index: Range
    max_weight: Range
    max_weight_position: Range
    min_weight: Range
    min_weight_distance: Range
    kernel_shape: list[Literal["tent", "cosine", "exponential"]] = Field(min_length=1)
    entangled_strength: Range
    second_peak: bool
    second_peak_weight: Range
    second_peak_position: Range
    second_peak_distance: Range
    global_direction: bool
    global_direction_index: Range
    global_direction_weight: Range
    top_quality_layers: int = Field(ge=0)
    seed_best_layer: bool

    @property
    def layer_window(self) -> tuple[float, float]:
        """Where "best_layer" and `top_quality_layers` look: the `direction_index` range."""
        return (self.direction_index.low, self.direction_index.high)

    @model_validator(mode="after")
    def _bounds(self) -> SearchSpace:
        for name in ("direction_index", "max_weight_position", "min_weight", "min_weight_distance",
                     "entangled_strength", "second_peak_position", "second_peak_distance", "global_direction_index"):
            rng: Range = getattr(self, name)
            if rng.low < 0 or rng.high > 1:
                raise ValueError(f"{name} must lie within [0, 1] (a fraction), got [{rng.low}, {rng.high}]")
        for name in ("min_weight_distance", "second_peak_distance"):
            if getattr(self, name).low <= 0:
                raise ValueError(f"{name}.low must be > 0")
        for name in ("max_weight", "second_peak_weight", "global_direction_weight"):
            if getattr(self, name).low < 0:
                raise ValueError(f"{name}.low must be >= 0")
        return self
