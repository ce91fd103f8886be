"""Export a trial: merged weights (sharded safetensors) or a peft adapter, + tokenizer + model card.

The folder is written under a temporary name and renamed at the end, so an interrupted or
failed export never leaves a half-written model where the user expects one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import optuna

from .ablation import Abliterator, Edit
from .backends import LoraBackend
from .card import model_card
from .config import Settings
from .errors import HereticError
from .files import replace_directory
from .provenance import build_record, weight_hashes, write_record
from .records import trial_edit
from .store import study_file
from .study import study_abliterator


def save_merged(abliterator: Abliterator, edit: Edit, out_dir: str | Path, card: str,
                max_shard_size: str = "5GB", finish: Callable[[Path], None] | None = None) -> Path:  # fmt: skip
    """Apply `edit`, write it exactly into the weights and save the model folder atomically
    (`finish(folder)` adds files before the folder is moved into place)."""
    abliterator.apply(edit)
    model = abliterator.merged_model()

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        abliterator.loaded.tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)
        if finish:
            finish(tmp)

    return replace_directory(out_dir, write)


def save_adapter(abliterator: Abliterator, edit: Edit, out_dir: str | Path, card: str,
                 finish: Callable[[Path], None] | None = None) -> Path:  # fmt: skip
    """Apply `edit` and save only its LoRA (adapter_config.json + adapter_model.safetensors), for
    `PeftModel.from_pretrained(base_model, out_dir)`. A hook-mode abliterator is rewrapped as a
    LoRA first (the same edit). With row_normalization "full" the adapter is the trial-time
    low-rank approximation, not the exact norm-preserving weights."""
    if any(t.fused for t in abliterator.targets):
        raise HereticError("export_strategy = 'adapter' cannot carry edits of fused MoE expert weights "
                           "(no LoRA wraps a 3-D expert tensor); use export_strategy = 'merged'")  # fmt: skip
    if not isinstance(abliterator.linear, LoraBackend):  # hook mode: the same edit as a LoRA
        abliterator.reset()
        abliterator.merged_model()  # no edit applied: this only removes the hooks
        abliterator = Abliterator(abliterator.loaded, abliterator.components, abliterator.geometry,
                                  replace(abliterator.options, mode="lora"))  # fmt: skip
    abliterator.apply(edit)
    lora = abliterator.linear

    def write(tmp: Path) -> None:
        lora.save(tmp)
        abliterator.loaded.tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)
        if finish:
            finish(tmp)

    return replace_directory(out_dir, write)


def default_export_dir(settings: Settings, trial_number: int) -> Path:
    if settings.export_dir:
        return Path(settings.export_dir)
    return Path(settings.study_checkpoint_dir) / f"{settings.resolved_study_name()}-trial{trial_number}"


def export_trial(study: optuna.Study, settings: Settings, number: int, out_dir: str | Path | None = None,
                 abliterator: Abliterator | None = None) -> Path:
    """Re-apply a finished trial and write it out; loads the model unless one is handed over."""
    edit, trial = trial_edit(study, number)
    if abliterator is None:
        abliterator = study_abliterator(study, settings, list(edit.kernels))
    out = Path(out_dir) if out_dir else default_export_dir(settings, number)
    card = model_card(settings, study, trial, edit)
    print(f"Exporting trial {number} ({settings.export_strategy}) to {out} ...", flush=True)
    record: dict = {}

    def finish(folder: Path) -> None:  # the record, with the hashes of the weights just written
        record.update(build_record(study, settings, number, card, weight_hashes(folder)))
        write_record(record, folder / "reproduce.json")

    if settings.export_strategy == "adapter":
        out = save_adapter(abliterator, edit, out, card, finish)
    else:
        out = save_merged(abliterator, edit, out, card, settings.max_shard_size, finish)
    write_record(record, study_file(settings, ".reproduce.json"))
    print(f"Rebuild it with: python -m heretic_like reproduce {out / 'reproduce.json'}")
    return out
