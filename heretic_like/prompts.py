"""Prompt sets: load a list of strings from the hub, a local file or directory, or a built-in set.

Everything goes through `datasets.load_dataset`, so the split syntax (`train[:150]`) works the
same for every source. Built-in sets live in `heretic_like/data/NAME.txt`, one prompt per line.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .config import PromptSpec, Settings
from .errors import HereticError

# datasets' builder name for each local file suffix; `.txt` is one prompt per line.
_BUILDERS = {".txt": "text", ".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def builtin_path(name: str) -> Path:
    path = Path(str(resources.files("heretic_like").joinpath("data", f"{name}.txt")))
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.txt"))
        raise HereticError(f"unknown built-in prompt set 'builtin:{name}' (available: {', '.join(available)})")
    return path


def _resolve(spec: PromptSpec) -> tuple[str, dict, str]:
    """(builder or hub id, load_dataset kwargs, column) for a spec."""
    source = spec.dataset
    if source.startswith("builtin:"):
        return "text", {"data_files": str(builtin_path(source.removeprefix("builtin:")))}, "text"
    path = Path(source).expanduser()
    if path.suffix.lower() in _BUILDERS:
        if not path.is_file():
            raise HereticError(f"prompt file not found: {source}")
        builder = _BUILDERS[path.suffix.lower()]
        # datasets reports an empty file as "An error occurred while generating the dataset".
        if path.stat().st_size == 0 or (builder != "parquet" and not path.read_text(errors="replace").strip()):
            raise HereticError(f"prompt file {source} is empty")
        column = "text" if builder == "text" else spec.column
        return builder, {"data_files": str(path)}, column
    if Path(source).expanduser().is_dir():
        return str(Path(source).expanduser()), {}, spec.column  # a local dataset directory
    return source, {"revision": spec.commit} if spec.commit else {}, spec.column  # a hub id


def load_prompts(spec: PromptSpec, what: str) -> list[str]:
    """Load one prompt set; `what` names it (e.g. 'bad_prompts') in any error."""
    try:
        name, kwargs, column = _resolve(spec)
    except HereticError as exc:
        raise HereticError(f"{what}: {exc}") from None
    logging.getLogger("datasets").setLevel(logging.ERROR)
    import datasets

    datasets.disable_progress_bars()
    try:
        data = datasets.load_dataset(name, split=spec.split, **kwargs)
    except HereticError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "corresponds to no data" in first:  # a header without rows, or a slice past the end
            raise HereticError(f"{what}: '{spec.dataset}' split '{spec.split}' holds no prompts") from None
        raise HereticError(f"{what}: cannot load '{spec.dataset}' split '{spec.split}': {first}") from None
    if column not in data.column_names:
        raise HereticError(
            f"{what}: column '{column}' not in '{spec.dataset}' (columns: {', '.join(data.column_names)})"
        )
    prompts = [str(p).strip() for p in data[column] if p is not None and str(p).strip()]
    if not prompts:
        raise HereticError(f"{what}: '{spec.dataset}' split '{spec.split}' holds no prompts")
    # prefix and suffix join the prompt with a space, as in Heretic, so its configs mean the same
    return [" ".join(part for part in (spec.prefix, p, spec.suffix) if part) for p in prompts]


def prompts_fingerprint(prompts: list[str] | None) -> str | None:
    """Identity of a prompt set's content (not its source): edited files or moved data show."""
    if prompts is None:
        return None
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()[:16]


# The code says harmful/harmless; the config keeps Heretic's names. This is the one mapping.
CONFIG_NAMES = {"harmful": "bad_prompts", "harmless": "good_prompts", "harmful_eval": "bad_evaluation_prompts",
                "harmless_eval": "good_evaluation_prompts", "capability": "capability_prompts"}  # fmt: skip


@dataclass(frozen=True)
class PromptSets:
    """The prompt sets a study uses: directions are measured from `harmful` and `harmless`, each
    trial scored on `harmful_eval` (refusals) and `harmless_eval` (KL); `capability` (optional)
    gives the entanglement score."""

    harmful: list[str]
    harmless: list[str]
    harmful_eval: list[str]
    harmless_eval: list[str]
    capability: list[str] | None = None
    # each set's system prompt: its own `system_prompt` where given, else the global one
    systems: dict[str, str | None] = field(default_factory=dict)

    def system(self, kind: str) -> str | None:
        """The system prompt the set `kind` ("harmful", "harmless_eval", ...) is formatted with."""
        return self.systems[kind]

    def fingerprints(self) -> dict[str, str | None]:
        """Content fingerprint of each set, under its config name (as studies store them)."""
        return {CONFIG_NAMES[name]: prompts_fingerprint(getattr(self, name)) for name in CONFIG_NAMES}


def load_all_prompts(settings: Settings) -> PromptSets:
    """Every prompt set the config names (capability: None when unset); errors name the config key."""
    sets, systems = {}, {}
    for name, key in CONFIG_NAMES.items():
        spec = getattr(settings, key)
        sets[name] = load_prompts(spec, key) if spec is not None else None
        own = spec.system_prompt if spec is not None else None
        systems[name] = own if own is not None else settings.system_prompt
    return PromptSets(**sets, systems=systems)
