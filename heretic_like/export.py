"""Export a trial: merged weights (sharded safetensors) or a peft adapter, + tokenizer + model card.

The folder is written under a temporary name and renamed at the end, so an interrupted or
failed export never leaves a half-written model where the user expects one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
import torch
from torch import nn

from .ablation import Abliterator, Edit
from .backends import LoraBackend
from .card import model_card
from .config import Settings
from .errors import HereticError
from .evaluation import kl_divergence
from .files import replace_directory
from .generation import first_token_logprobs
from .model import chat_texts
from .prompts import load_all_prompts
from .provenance import build_record, weight_hashes, write_record
from .records import StudyRecord, trial_edit
from .store import study_file
from .study import resolve_response_prefix, study_abliterator


@dataclass(frozen=True)
class KLReference:
    """The unedited model's first-token log-probs on the study's harmless prompts (`texts`, as
    the study formatted them): what an export's own KL is measured against."""

    texts: list[str]
    logprobs: torch.Tensor
    batch_size: int


def kl_reference(abliterator: Abliterator, study: optuna.Study, settings: Settings) -> KLReference:
    """Measured afresh with the edit lifted, formatted and batched as the study's trials were."""
    loaded = abliterator.loaded
    prompts = load_all_prompts(settings)
    texts = chat_texts(loaded.tokenizer, prompts.harmless_eval, prompts.system("harmless_eval"),
                       resolve_response_prefix(settings, study))  # fmt: skip
    batch = StudyRecord(study).batch_size or settings.batch_size or 8
    with abliterator.unedited():
        return KLReference(texts, first_token_logprobs(loaded, texts, batch), batch)


def merged_weights(abliterator: Abliterator, edit: Edit) -> nn.Module:
    """The plain model with `edit` written exactly into its weights (consumes the abliterator)."""
    abliterator.apply(edit)
    return abliterator.merged_model()


def save_merged(abliterator: Abliterator, model: nn.Module, out_dir: str | Path, card: str,
                max_shard_size: str = "5GB", finish: Callable[[Path], None] | None = None) -> Path:  # fmt: skip
    """Save the merged `model` (from `merged_weights`) as a model folder, atomically (`finish(folder)`
    adds files before the folder is moved into place)."""

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
                                  replace(abliterator.options, mode="lora"), abliterator.kept)  # fmt: skip
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


def exported_kl(abliterator: Abliterator, model: nn.Module, reference: KLReference) -> float:
    """First-token KL of the merged `model` from the unedited one, as the study measures a trial's."""
    loaded = replace(abliterator.loaded, model=model)
    return kl_divergence(reference.logprobs, first_token_logprobs(loaded, reference.texts, reference.batch_size))


def export_trial(study: optuna.Study, settings: Settings, number: int, out_dir: str | Path | None = None,
                 abliterator: Abliterator | None = None, reference: KLReference | None = None) -> Path:  # fmt: skip
    """Re-apply a finished trial and write it out; loads the model unless one is handed over.

    Where the trials scored an approximation of what export writes (row_normalization "full":
    a low-rank LoRA during trials, the exact norm-preserving weights here), the exported weights'
    own KL is measured (against `reference`, the run's, or one measured here) and stored, so the
    card and the summary report the KL of the model the user gets, not only the trial's."""
    edit, trial = trial_edit(study, number)
    if abliterator is None:
        abliterator = study_abliterator(study, settings, list(edit.kernels))
    out = Path(out_dir) if out_dir else default_export_dir(settings, number)
    record: dict = {}
    model = None
    if settings.export_strategy == "merged":
        approximate = settings.row_normalization == "full"
        if approximate and reference is None:
            reference = kl_reference(abliterator, study, settings)
        model = merged_weights(abliterator, edit)
        if approximate:
            kl = exported_kl(abliterator, model, reference)
            StudyRecord(study).set_exported_kl(number, kl)
            print(f"Trial {number}: KL {kl:.4f} with the exact norm-preserving weights "
                  f"(its trials' rank-{settings.full_normalization_lora_rank} approximation: "
                  f"{trial.kl_divergence:.4f})")  # fmt: skip
    card = model_card(settings, study, trial, edit)
    print(f"Exporting trial {number} ({settings.export_strategy}) to {out} ...", flush=True)

    def finish(folder: Path) -> None:  # the record, with the hashes of the weights just written
        record.update(build_record(study, settings, number, card, weight_hashes(folder)))
        write_record(record, folder / "reproduce.json")

    if settings.export_strategy == "adapter":
        out = save_adapter(abliterator, edit, out, card, finish)
    else:
        out = save_merged(abliterator, model, out, card, settings.max_shard_size, finish)
    write_record(record, study_file(settings, ".reproduce.json"))
    print(f"Rebuild it with: python -m heretic_like reproduce {out / 'reproduce.json'}")
    return out
