"""Defaults live in one place (config.default.toml); docs/config.md and the settings model must
agree with it on every key. This fails when any of the three drifts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib
from pydantic import BaseModel

from heretic_like.config import PromptSpec, SearchSpace, Settings, default_data

DOC = Path(__file__).resolve().parent.parent / "docs" / "config.md"
SECTIONS = {"search": SearchSpace, "prompt set": PromptSpec}


def doc_rows() -> dict[str, tuple[bool, str]]:
    """{qualified key: (marked study, default cell)} of every table row in docs/config.md."""
    rows, scope = {}, ""
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            heading = line.lower()
            scope = "search." if "`[search]`" in heading else "prompt set." if "prompt set fields" in heading else ""
        match = re.match(r"^\| `([a-z_]+)`( \*\*study\*\*)? \| (.*?) \| .* \|$", line)
        if match:
            key = scope + match.group(1)
            assert key not in rows, f"{key} documented twice"
            rows[key] = (bool(match.group(2)), match.group(3).strip())
    return rows


def model_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    return [prefix + name for name in model.model_fields]


def expected_default(key: str):
    """(has a default, value) from the one source: config.default.toml (PromptSpec: its fields)."""
    if key.startswith("prompt set."):
        field = PromptSpec.model_fields[key.split(".", 1)[1]]
        present = not field.is_required() and field.default is not None  # None: "unset"
        return (present, field.default if present else None)
    node = default_data()
    for part in key.split("."):
        if part not in node:
            return (False, None)
        node = node[part]
    return (True, node)


def test_every_key_is_documented_once_and_nothing_else():
    documented = set(doc_rows())
    keys = set(model_keys(Settings)) - {"search"}
    keys |= set(model_keys(SearchSpace, "search.")) | set(model_keys(PromptSpec, "prompt set."))
    assert keys - documented == set(), "keys missing from docs/config.md"
    assert documented - keys == set(), "docs/config.md documents keys the settings model lacks"


@pytest.mark.parametrize("key", sorted(doc_rows()))
def test_documented_default_is_the_default(key):
    study, cell = doc_rows()[key]
    present, value = expected_default(key)
    if cell.startswith("unset") or cell.startswith("required"):
        assert not present, f"{key}: docs say '{cell}' but config.default.toml sets {value!r}"
    elif "config.default.toml" in cell:  # long lists are shown in the file itself
        assert present and isinstance(value, list) and len(value) > 8, key
    else:
        literals = re.findall(r"`([^`]+)`", cell)
        assert len(literals) == 1, f"{key}: the default cell needs exactly one `TOML literal`: {cell!r}"
        assert present, f"{key}: docs give {literals[0]} but config.default.toml has no value"
        assert tomllib.loads(f"v = {literals[0]}")["v"] == value, f"{key}: docs {literals[0]} != default {value!r}"


@pytest.mark.parametrize("key", sorted(doc_rows()))
def test_study_marks_match_the_study_keys(key):
    study, _ = doc_rows()[key]
    top = key.split(".")[0]
    expected = key.startswith("prompt set.") or top in Settings.STUDY_KEYS
    if key.startswith("prompt set.") or key.startswith("search."):
        return  # whole sections, marked in their headings
    assert study == expected, f"{key}: docs mark it {'study' if study else 'run-only'}"


def test_the_model_holds_no_default_of_its_own():
    """A key with a value in config.default.toml is required in the model (no second default);
    a key the model lets default must default to None ("unset") and be absent from the file."""
    data = default_data()
    for model, node in ((Settings, data), (SearchSpace, data["search"])):
        for name, field in model.model_fields.items():
            if name in node:
                assert field.is_required(), f"{name}: default in both config.py and config.default.toml"
            else:
                assert not field.is_required() and field.default is None, f"{name}: no default anywhere"
