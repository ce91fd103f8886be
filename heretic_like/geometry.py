"""The study's directions and layer metrics: measured from the prompt sets' residuals once,
cached beside the study (keyed by the config fingerprint), tabled and plotted."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Settings
from .detectors import Detector
from .directions import RefusalGeometry, collect_residuals, measure, winsorize
from .errors import HereticError
from .evaluation import refusal_count
from .files import write_atomically
from .model import LoadedModel, chat_texts
from .prompts import CONFIG_NAMES, PromptSets
from .store import directions_path


@dataclass(frozen=True)
class GeometryOptions:
    """What measuring the directions depends on, and where they are cached (keyed by the study's
    config fingerprint): the few settings this module reads, not the whole config."""

    winsorization_quantile: float
    orthogonalize: bool
    directions_per_layer: int
    direction_candidates: int
    position: int  # direction_position: the prompt token the residuals are read at, from the end
    cache: Path
    fingerprint: str
    filtered: bool = False  # filter_direction_prompts: the directions come from the filtered prompts

    @classmethod
    def from_settings(cls, settings: Settings) -> GeometryOptions:
        return cls(settings.winsorization_quantile, settings.orthogonalize_direction,
                   settings.directions_per_layer, settings.direction_candidates, settings.direction_position,
                   directions_path(settings), settings.study_fingerprint(),
                   settings.filter_direction_prompts)  # fmt: skip


# Bumped when the measurement itself changes (2: the last layer read before the final norm), so
# directions cached by older code are measured again rather than mixed with new ones.
GEOMETRY_VERSION = 2


def cached_geometry(options: GeometryOptions, num_layers: int) -> RefusalGeometry | None:
    """The measurements saved by an earlier run of the same study, if they still apply.

    A cache says whether its directions came from filtered prompts; one that does not say so is
    not taken for a filtered study: `export` and `chat` of 2026-12-02 to 12-05 measured unfiltered
    directions under a filtered study's key, and a resume would have edited along them."""
    if not options.cache.is_file():
        return None
    cached = torch.load(options.cache, weights_only=True)
    if (cached.get("fingerprint") != options.fingerprint or "geometry" not in cached
            or cached.get("version", 1) != GEOMETRY_VERSION
            or cached.get("filtered", False) != options.filtered):  # fmt: skip
        return None
    geometry = RefusalGeometry.from_dict(cached["geometry"])
    return geometry if geometry.num_layers == num_layers else None


@dataclass(frozen=True)
class PromptFilter:
    """`filter_direction_prompts`: how the unedited model's answers are judged (the study's
    detector, on responses of the study's length, generated with the study's scoring batch: the
    directions' small batch made this pass 6x slower on the testbed model) before the directions
    are measured."""

    detector: Detector
    response_length: int
    batch_size: int

    @classmethod
    def of(cls, settings: Settings, detector: Callable[[], Detector], batch_size: int) -> PromptFilter | None:
        """The filter `filter_direction_prompts` asks for, or None (`detector` is built only then)."""
        return cls(detector(), settings.max_response_length, batch_size) if settings.filter_direction_prompts else None


# Which verdict each direction set keeps: harmful prompts the model refuses, harmless ones it answers.
WANTED_VERDICT = {"harmful": True, "harmless": False}


def kept_prompts(prompts: list[str], refused: list[bool], want: bool) -> list[str]:
    """The prompts whose verdict is `want`, in their order."""
    return [prompt for prompt, verdict in zip(prompts, refused, strict=True) if verdict == want]


def filtered_prompts(kind: str, loaded: LoadedModel, prompts: list[str], system: str | None, response_prefix: str,
                     prompt_filter: PromptFilter) -> list[str]:  # fmt: skip
    """The direction prompts of `kind` the unedited model answers as that set should (greedy;
    reproduce generates them again with the same batching)."""
    texts = chat_texts(loaded.tokenizer, prompts, system, response_prefix)
    counted = refusal_count(loaded, texts, prompts, prompt_filter.detector, prompt_filter.response_length,
                            prompt_filter.batch_size, f"{kind} direction prompts")  # fmt: skip
    want = WANTED_VERDICT[kind]
    kept = kept_prompts(prompts, counted.refused, want)
    # Two prompts at least, or the mean is one prompt's residual: an error naming the set, not a
    # direction measured from noise.
    if len(kept) < 2:
        verdict = "refuses" if want else "answers"
        raise HereticError(f"filter_direction_prompts: the unedited model {verdict} only {len(kept)} of the "
                           f"{len(prompts)} {CONFIG_NAMES[kind]}; use a set it {verdict} or set "
                           "filter_direction_prompts = false")  # fmt: skip
    print(f"Directions from {len(kept)} of {len(prompts)} {CONFIG_NAMES[kind]} "
          f"({'refused' if want else 'answered'} by the unedited model)")  # fmt: skip
    return kept


def measure_geometry(options: GeometryOptions, loaded: LoadedModel, prompts: PromptSets, batch_size: int,
                     response_prefix: str = "",
                     prompt_filter: PromptFilter | None = None) -> RefusalGeometry:  # fmt: skip
    """Directions and layer metrics from the prompt sets' residuals (no cache); with
    `prompt_filter`, only from the direction prompts the unedited model answers as expected."""
    residuals = {}
    for kind in ("harmful", "harmless", "capability"):
        chosen = getattr(prompts, kind)
        if chosen is None:
            continue
        if prompt_filter is not None and kind in WANTED_VERDICT:
            chosen = filtered_prompts(kind, loaded, chosen, prompts.system(kind), response_prefix, prompt_filter)
        collected = collect_residuals(loaded, chosen, prompts.system(kind), batch_size, f"{kind} residuals",
                                      response_prefix, options.position)  # fmt: skip
        residuals[kind] = winsorize(collected, options.winsorization_quantile)
    return measure(residuals["harmful"], residuals["harmless"], residuals.get("capability"),
                   options.orthogonalize, options.directions_per_layer, options.direction_candidates)  # fmt: skip


def compute_geometry(options: GeometryOptions, loaded: LoadedModel, prompts: PromptSets, batch_size: int,
                     response_prefix: str = "",
                     prompt_filter: PromptFilter | None = None) -> RefusalGeometry:  # fmt: skip
    """Directions and layer metrics, cached beside the study (keyed by the config fingerprint)."""
    if options.filtered != (prompt_filter is not None):  # the cache would file one kind under the other's key
        raise ValueError(f"filter_direction_prompts = {options.filtered} but {'no' if options.filtered else 'a'} "
                         "prompt filter was given")  # fmt: skip
    geometry = cached_geometry(options, loaded.num_layers)
    if geometry is None:
        geometry = measure_geometry(options, loaded, prompts, batch_size, response_prefix, prompt_filter)
        saved = {"fingerprint": options.fingerprint, "version": GEOMETRY_VERSION, "filtered": options.filtered,
                 "geometry": geometry.to_dict()}  # fmt: skip
        write_atomically(options.cache, lambda tmp: torch.save(saved, tmp))
    return geometry
