"""The exported model's card: Hugging Face metadata (YAML) first, then what was done and measured.

The metadata block is what the hub reads (`base_model`, `tags`, `library_name`, `license`):
`base_model` must be a hub id and the licence is the base model's, so both are filled only where
they are known from the model itself (its hub id, its GGUF metadata, its folder's card or config);
a guess would be worse than nothing.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import optuna

from . import __version__
from .ablation import Edit
from .config import Settings
from .records import StudyRecord, TrialRecord

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TAGS = ["heretic_like", "abliterated", "uncensored"]


def _hub_id(text: str | None) -> str | None:
    """`org/name`, or a huggingface.co URL of one, when `text` is that and not a local path."""
    if not text:
        return None
    text = re.sub(r"^https?://huggingface\.co/", "", text.strip()).strip("/")
    return text if HUB_ID.match(text) and not Path(text).expanduser().exists() else None


def _gguf_metadata(path: Path) -> dict[str, str]:
    """The GGUF's `general.*` string fields (name, license, base model and source URLs)."""
    try:
        from gguf import GGUFReader

        fields = GGUFReader(str(path)).fields
        return {k: str(f.contents()) for k, f in fields.items() if k.startswith("general.") and f.types
                and f.types[0].name == "STRING"}  # fmt: skip
    except Exception:  # an unreadable file is the loader's error to report, not the card's
        return {}


def base_model_facts(settings: Settings) -> tuple[str | None, str | None]:
    """(hub id of the base model, its licence), each None where not known."""
    model = Path(settings.model).expanduser()
    if _hub_id(settings.model):  # a hub id: its licence is on the hub, which a run need not reach
        return settings.model, _card_license_of_hub(settings.model)
    gguf = model / settings.gguf_file if settings.gguf_file else model if model.suffix.lower() == ".gguf" else None
    if gguf is not None:
        meta = _gguf_metadata(gguf)
        base = next((_hub_id(meta[k]) for k in ("general.base_model.0.repo_url", "general.source.repo_url",
                                                 "general.repo_url") if _hub_id(meta.get(k))), None)  # fmt: skip
        return base, meta.get("general.license")
    base = license_ = None
    if (model / "config.json").is_file():
        base = _hub_id(json.loads((model / "config.json").read_text()).get("_name_or_path"))
    if (model / "README.md").is_file():
        from huggingface_hub import ModelCard

        try:
            license_ = ModelCard.load(model / "README.md").data.license
        except Exception:  # a card without valid metadata: the licence is not known
            license_ = None
    return base, license_


def _card_license_of_hub(repo_id: str) -> str | None:
    """The licence in a hub model's card when it is in the local hub cache (no download)."""
    try:
        from huggingface_hub import ModelCard, try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "README.md")
        return ModelCard.load(cached).data.license if isinstance(cached, str) else None
    except Exception:
        return None


def hub_metadata(settings: Settings) -> str:
    """The YAML block that opens the card, between `---` lines."""
    from huggingface_hub import ModelCardData

    base, license_ = base_model_facts(settings)
    library = "peft" if settings.export_strategy == "adapter" else "transformers"
    data = ModelCardData(base_model=base, license=license_, library_name=library, tags=TAGS)
    return f"---\n{data.to_yaml()}\n---"


def model_card(settings: Settings, study: optuna.Study, trial: TrialRecord, edit: Edit) -> str:
    record = StudyRecord(study)
    base = "?" if record.base_refusals is None else record.base_refusals
    total = "?" if record.n_harmful_eval is None else record.n_harmful_eval
    index = "per layer" if edit.direction_index is None else f"{edit.direction_index:.2f}"
    rows = [("direction_index", index), ("row_normalization", settings.row_normalization),
            ("orthogonalize_direction", str(settings.orthogonalize_direction).lower()),
            ("biproject_direction", str(settings.biproject_direction).lower()),
            ("directions_per_layer", str(settings.directions_per_layer))]
    if settings.capability_prompts is not None:
        rows.append(("entangled_strength", f"{edit.entangled_strength:.3f}"))
    for component, kernel in edit.named_kernels().items():
        for key, value in vars(kernel).items():
            rows.append((f"{component}.{key}", value if isinstance(value, str) else f"{value:.2f}"))
    if edit.global_direction is not None:  # search.global_direction
        rows += [("global_direction.index", f"{edit.global_direction.index:.2f}"),
                 ("global_direction.weight", f"{edit.global_direction.weight:.3f}")]  # fmt: skip
    params = "\n".join(f"| {k} | {v} |" for k, v in rows)
    long, length = "", settings.verify_response_length
    long_count = record.long_refusals(trial.number, length)
    if long_count is not None:
        long = f"| refusals, {length}-token responses | {long_count}/{total} | — |\n"
    capability = ""
    stored = record.capability
    if "base" in stored and str(trial.number) in stored:
        from .capability import card_section, comparison

        capability = "\n" + card_section(comparison(stored["base"], stored[str(trial.number)]))
    exported, rank = record.exported_kl(trial.number), settings.full_normalization_lora_rank
    kl = exported if exported is not None else trial.kl_divergence
    kl_rows = f"| KL divergence (first response token, harmless prompts) | {kl:.4f} | 0 (by definition) |\n"
    approximate = ""
    if exported is not None:  # the trials scored a low-rank approximation of these weights
        kl_rows += (f"| KL divergence of the study's trial (rank-{rank} approximation) | "
                    f"{trial.kl_divergence:.4f} | — |\n")
        approximate = (f"\nThe study scored this edit as a rank-{rank} approximation (row_normalization \"full\"); "
                       "this model holds it exactly, and its KL was measured again on these weights.")
    usage = ""
    if settings.export_strategy == "adapter":
        load = "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), THIS_FOLDER)"
        usage = f"\n## Usage\n\nThis folder holds only a peft LoRA adapter for `{settings.model}`:\n\n    {load}\n"
    return f"""{hub_metadata(settings)}
# {Path(settings.model).name} (abliterated)

A refusal-ablated version of `{settings.model}`, made with heretic_like {__version__}
(study `{study.study_name}`, trial {trial.number}, {datetime.now(timezone.utc):%Y-%m-%d}).
Each listed module's weight was edited as W <- W - w V^T V W (V: the refusal direction(s), one
row each; with row_normalization "full", the projection acts on the unit rows of W and every row
keeps its original norm), with the per-layer strength w given by the kernel below.

## Abliteration parameters

| parameter | value |
|---|---|
{params}

## Performance

| metric | this model | original model |
|---|---|---|
{kl_rows}| refusals (harmful evaluation prompts) | {trial.refusals}/{total} | {base}/{total} |
{long}
Refusals are counted by marker strings in greedy responses of {settings.max_response_length} tokens.{approximate}
Removing refusals does not make a model's answers correct or safe; use responsibly.
{capability}{usage}"""
