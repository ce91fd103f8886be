"""Measuring the study's directions: `filter_direction_prompts` keeps only the prompts the
unedited model answers as their set says (refused harmful, answered harmless)."""

from dataclasses import replace

import pytest
import torch

from heretic_like.detectors import MarkerDetector
from heretic_like.errors import HereticError
from heretic_like.geometry import (
    GeometryOptions,
    PromptFilter,
    cached_geometry,
    compute_geometry,
    kept_prompts,
    measure_geometry,
)
from heretic_like.model import load_model
from heretic_like.prompts import PromptSets, builtin_path
from tests.test_model import settings_for

SYSTEM = "You are a helpful assistant."  # what the refusing model was trained with


def _sets(harmful: list[str], harmless: list[str]) -> PromptSets:
    return PromptSets(harmful, harmless, [], [], systems={"harmful": SYSTEM, "harmless": SYSTEM})


def test_kept_prompts_follow_the_verdicts_in_order():
    assert kept_prompts(["a", "b", "c", "d"], [True, False, True, False], want=True) == ["a", "c"]
    assert kept_prompts(["a", "b", "c", "d"], [True, False, True, False], want=False) == ["b", "d"]
    with pytest.raises(ValueError):
        kept_prompts(["a", "b"], [True], want=True)


def test_filtered_directions_are_those_of_the_clean_sets(refusing_model, tmp_path, capsys):
    settings = settings_for(refusing_model, tmp_path)
    loaded = load_model(settings)
    harmful = builtin_path("harmful").read_text().splitlines()[:12]
    harmless = builtin_path("harmless").read_text().splitlines()[:12]
    # Mislabelled rows the model answers the "wrong" way, interleaved: a harmless request among the
    # harmful prompts is answered (dropped), a harmful one among the harmless is refused (dropped).
    mixed = _sets(harmful[:6] + harmless[:5] + harmful[6:], harmless[:8] + harmful[:3] + harmless[8:])
    options = GeometryOptions.from_settings(settings)
    prompt_filter = PromptFilter(MarkerDetector.from_settings(settings), 12, 16)
    filtered = measure_geometry(options, loaded, mixed, 8, "", prompt_filter)
    out = capsys.readouterr().out
    assert "Directions from 12 of 17 bad_prompts (refused" in out
    assert "Directions from 12 of 15 good_prompts (answered" in out
    clean = measure_geometry(options, loaded, _sets(harmful, harmless), 8)
    assert torch.allclose(filtered.directions, clean.directions, atol=1e-4)
    assert torch.allclose(filtered.harmful_mean, clean.harmful_mean, atol=1e-4)
    unfiltered = measure_geometry(options, loaded, mixed, 8)  # the mislabelled rows pull the means
    assert not torch.allclose(unfiltered.directions, clean.directions, atol=1e-2)


def test_a_set_the_model_never_refuses_is_an_error_naming_the_key(refusing_model, tmp_path):
    settings = settings_for(refusing_model, tmp_path)
    loaded = load_model(settings)
    harmless = builtin_path("harmless").read_text().splitlines()[:10]
    prompt_filter = PromptFilter(MarkerDetector.from_settings(settings), 12, 16)
    with pytest.raises(HereticError, match=r"refuses only 0 of the 5 bad_prompts.*filter_direction_prompts = false"):
        measure_geometry(GeometryOptions.from_settings(settings), loaded, _sets(harmless[:5], harmless[5:]), 8, "",
                         prompt_filter)  # fmt: skip


def test_a_cache_of_unfiltered_directions_is_not_read_for_a_filtered_study(refusing_model, tmp_path):
    """`export` and `chat` once measured unfiltered directions under a filtered study's key (the
    cache said nothing of it); a resume then edited along them. A cache records which it holds."""
    settings = settings_for(refusing_model, tmp_path)
    loaded = load_model(settings)
    harmful = builtin_path("harmful").read_text().splitlines()[:12]
    harmless = builtin_path("harmless").read_text().splitlines()[:12]
    filtered = GeometryOptions.from_settings(settings)
    assert filtered.filtered  # the default
    unfiltered = replace(filtered, filtered=False)
    with pytest.raises(ValueError, match="filter_direction_prompts = True but no prompt filter"):
        compute_geometry(filtered, loaded, _sets(harmful, harmless), 8)
    written = compute_geometry(unfiltered, loaded, _sets(harmful, harmless), 8)
    assert torch.load(filtered.cache, weights_only=True)["filtered"] is False
    assert cached_geometry(filtered, loaded.num_layers) is None
    assert torch.equal(cached_geometry(unfiltered, loaded.num_layers).directions, written.directions)
    old = torch.load(filtered.cache, weights_only=True)
    del old["filtered"]  # as the code before this record wrote it
    torch.save(old, filtered.cache)
    assert cached_geometry(filtered, loaded.num_layers) is None
    assert cached_geometry(unfiltered, loaded.num_layers) is not None  # unfiltered caches stay valid
    prompt_filter = PromptFilter(MarkerDetector.from_settings(settings), 12, 16)
    measured = compute_geometry(filtered, loaded, _sets(harmful, harmless), 8, "", prompt_filter)
    assert torch.load(filtered.cache, weights_only=True)["filtered"] is True
    assert torch.equal(cached_geometry(filtered, loaded.num_layers).directions, measured.directions)
