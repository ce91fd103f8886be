"""The search: what the sampler draws per trial, what the study minimises, and the two policies
that read the study's history to make a trial cheaper (the dominance cap, hardest prompts first)."""

from __future__ import annotations

import math
from collections import Counter

import optuna

from .ablation import Edit, GlobalDirection
from .directions import RefusalGeometry
from .kernel import Kernel
from .records import StudyRecord
from .space import SearchSpace


def sample_edit(trial: optuna.Trial, space: SearchSpace, geometry: RefusalGeometry,
                entanglement_aware: bool = False) -> Edit:  # fmt: skip
    """Draw one edit. Layer positions are sampled as fractions of the last layer index.

    Direction scopes: "global" samples a fractional layer index (or, with `top_quality_layers`,
    one of the layers that score best on the quality metric), "per_layer" uses each layer's own
    directions, "best_layer" the single layer with the best quality.
    """
    num_layers = geometry.num_layers
    last = max(num_layers - 1, 1)
    scope = space.direction_scope[0]
    if len(space.direction_scope) > 1:
        scope = trial.suggest_categorical("direction_scope", space.direction_scope)
    index = None
    if scope == "best_layer":
        index = float(geometry.best_layer(space.layer_window))
    elif scope == "global" and space.top_quality_layers:
        layers = sorted(geometry.top_layers(space.top_quality_layers, space.layer_window))
        index = float(trial.suggest_categorical("direction_layer", layers))
    elif scope == "global":
        index = trial.suggest_float("direction_index", space.direction_index.low * last,
                                    space.direction_index.high * last)  # fmt: skip
    kernels = {}
    for c in space.components:
        max_weight = trial.suggest_float(f"{c}.max_weight", space.max_weight.low, space.max_weight.high)
        position = trial.suggest_float(f"{c}.max_weight_position", space.max_weight_position.low * last,
                                       space.max_weight_position.high * last)  # fmt: skip
        fraction = trial.suggest_float(f"{c}.min_weight_fraction", space.min_weight.low, space.min_weight.high)
        distance = trial.suggest_float(f"{c}.min_weight_distance", space.min_weight_distance.low * last,
                                       space.min_weight_distance.high * last)  # fmt: skip
        shape = space.kernel_shape[0]
        if len(space.kernel_shape) > 1:
            shape = trial.suggest_categorical(f"{c}.kernel_shape", space.kernel_shape)
        kernels[c] = Kernel(max_weight, position, fraction * max_weight, distance, shape)
    strength = 1.0
    if entanglement_aware:
        strength = trial.suggest_float("entangled_strength", space.entangled_strength.low,
                                       space.entangled_strength.high)  # fmt: skip
    second = None
    if space.second_peak:  # one tent for every component, falling to 0: three numbers, not 4 per component
        second = Kernel(trial.suggest_float("second_peak.max_weight", space.second_peak_weight.low,
                                            space.second_peak_weight.high),
                        trial.suggest_float("second_peak.max_weight_position", space.second_peak_position.low * last,
                                            space.second_peak_position.high * last),
                        0.0,
                        trial.suggest_float("second_peak.min_weight_distance", space.second_peak_distance.low * last,
                                            space.second_peak_distance.high * last))  # fmt: skip
    overall = None
    if space.global_direction:  # one direction from an early layer, removed from every layer's writes
        overall = GlobalDirection(trial.suggest_float("global_direction.index", space.global_direction_index.low * last,
                                                      space.global_direction_index.high * last),
                                  trial.suggest_float("global_direction.weight", space.global_direction_weight.low,
                                                      space.global_direction_weight.high))  # fmt: skip
    return Edit(index, kernels, strength, second, overall)


def best_layer_seed(space: SearchSpace, geometry: RefusalGeometry) -> dict[str, float | str]:
    """Parameters of a first trial aimed by the layer metrics: the best-quality layer's direction,
    every kernel peaking there (each clamped into the search range)."""
    last = max(geometry.num_layers - 1, 1)
    best = float(geometry.best_layer(space.layer_window))

    def clamp(value: float, rng) -> float:
        return min(max(value, rng.low * last), rng.high * last)

    params: dict[str, float | str] = {}
    if "global" in space.direction_scope:
        if len(space.direction_scope) > 1:
            params["direction_scope"] = "global"
        if space.top_quality_layers:
            params["direction_layer"] = int(best)
        else:
            params["direction_index"] = clamp(best, space.direction_index)
    for c in space.components:
        params[f"{c}.max_weight_position"] = clamp(best, space.max_weight_position)
    return params


def objectives(refusals: int, kl: float, base_refusals: int, scale: float, target: float,
               margin: float = 0.0) -> tuple[float, float]:  # fmt: skip
    """(KL objective, refusal objective), both minimised.

    Refusals count relative to the unedited model. Below `target`, KL stops being rewarded: the
    first objective becomes the refusal ratio scaled to `target`, so the sampler does not spend
    trials on edits that barely change the model (as in Heretic's reference config). `margin`:
    the refusal margin in refusals (`refusal_margin_weight` × margin.py's margin), added to the count.
    """
    if margin < 0.0:
        raise ValueError(f"refusal margin {margin} is negative")
    refusal_score = (refusals + margin) / max(base_refusals, 1)
    kl_score = kl / scale if kl >= target else refusal_score * target / scale
    return kl_score, refusal_score


def refusal_cap(study: optuna.Study, margin: float | None = None, weight: float = 0.0):
    """For a trial at KL `kl`: the fewest refusals of any finished trial with KL <= kl. A trial
    reaching that count is dominated (no better on either axis) and need not be scored further.

    With the trial's refusal `margin` (margin.py) and its `weight`, the objective is count +
    weight × margin: a finished trial dominates at the fewest refusals c with c + weight × margin
    >= its own count + weight × its margin. An edit as strong in count but further from refusing is
    then kept, which is the point of the margin (and one nearer refusing may be dominated sooner)."""
    record = StudyRecord(study)

    def cap(kl: float) -> int | None:
        counts = [dominating_count(t.refusals, weight * ((t.refusal_margin or 0.0) - (margin or 0.0)))
                  for t in record.completed() if t.kl_divergence <= kl]  # fmt: skip
        return min(counts) if counts else None

    return cap


def dominating_count(refusals: int, lead: float) -> int:
    """The fewest refusals that score no better than `refusals` + `lead` (a finished trial's count
    and its margin's lead, in refusals): ceil, never below 0; a hair of slack for float sums."""
    return max(0, math.ceil(refusals + lead - 1e-9))


def hardest_first(study: optuna.Study) -> list[int]:
    """Harmful prompts' positions, those refused by the most finished trials (pruned ones too)
    first; ties go to those the unedited model refused. Scoring in this order, a dominated trial
    meets the prompts it will still refuse, and reaches its cap, in its first batch."""
    record = StudyRecord(study)
    counts: Counter[int] = Counter()
    for trial in record.trials():
        counts.update(trial.refused_positions)
    base = set(record.base_refused_positions)
    return sorted(set(counts) | base, key=lambda p: (-counts[p], p not in base, p))
