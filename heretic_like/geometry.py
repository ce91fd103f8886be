"""The study's directions and layer metrics: measured from the prompt sets' residuals once,
cached beside the study (keyed by the config fingerprint), tabled and plotted."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Settings
from .directions import RefusalGeometry, collect_residuals, measure, winsorize
from .model import LoadedModel
from .prompts import PromptSets
from .store import directions_path


@dataclass(frozen=True)
class GeometryOptions:
    """What measuring the directions depends on, and where they are cached (keyed by the study's
    config fingerprint): the few settings this module reads, not the whole config."""

    winsorization_quantile: float
    orthogonalize: bool
    directions_per_layer: int
    direction_candidates: int
    cache: Path
    fingerprint: str

    @classmethod
    def from_settings(cls, settings: Settings) -> GeometryOptions:
        return cls(settings.winsorization_quantile, settings.orthogonalize_direction,
                   settings.directions_per_layer, settings.direction_candidates, directions_path(settings),
                   settings.study_fingerprint())  # fmt: skip


# Bumped when the measurement itself changes (2: the last layer read before the final norm), so
# directions cached by older code are measured again rather than mixed with new ones.
GEOMETRY_VERSION = 2


def cached_geometry(options: GeometryOptions, num_layers: int) -> RefusalGeometry | None:
    """The measurements saved by an earlier run of the same study, if they still apply."""
    if not options.cache.is_file():
        return None
    cached = torch.load(options.cache, weights_only=True)
    if (cached.get("fingerprint") != options.fingerprint or "geometry" not in cached
            or cached.get("version", 1) != GEOMETRY_VERSION):  # fmt: skip
        return None
    geometry = RefusalGeometry.from_dict(cached["geometry"])
    return geometry if geometry.num_layers == num_layers else None


def measure_geometry(options: GeometryOptions, loaded: LoadedModel, prompts: PromptSets, batch_size: int,
                     response_prefix: str = "") -> RefusalGeometry:  # fmt: skip
    """Directions and layer metrics from the prompt sets' residuals (no cache)."""
    residuals = {}
    for kind in ("harmful", "harmless", "capability"):
        if getattr(prompts, kind) is not None:
            collected = collect_residuals(loaded, getattr(prompts, kind), prompts.system(kind), batch_size,
                                          f"{kind} residuals", response_prefix)  # fmt: skip
            residuals[kind] = winsorize(collected, options.winsorization_quantile)
    return measure(residuals["harmful"], residuals["harmless"], residuals.get("capability"),
                   options.orthogonalize, options.directions_per_layer, options.direction_candidates)  # fmt: skip


def compute_geometry(options: GeometryOptions, loaded: LoadedModel, prompts: PromptSets, batch_size: int,
                     response_prefix: str = "") -> RefusalGeometry:  # fmt: skip
    """Directions and layer metrics, cached beside the study (keyed by the config fingerprint)."""
    geometry = cached_geometry(options, loaded.num_layers)
    if geometry is None:
        geometry = measure_geometry(options, loaded, prompts, batch_size, response_prefix)
        path = options.cache
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"fingerprint": options.fingerprint, "version": GEOMETRY_VERSION,
                    "geometry": geometry.to_dict()}, tmp)  # fmt: skip
        tmp.replace(path)
    return geometry
