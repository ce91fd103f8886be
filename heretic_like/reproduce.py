"""Reproducibility: a `reproduce.json` for the chosen trial, and rebuilding the edit from it.

The record holds everything the edited weights depend on: the full config, the seed, the batch
size the directions were measured with, the response prefix, fingerprints of the model and of
every prompt set's content, package versions, the trial's edit and the SHA-256 of every weight
file written. `reproduce` measures the directions afresh from the prompts (no cache is trusted),
applies the recorded edit, writes the model and compares the hashes: on the same machine and
package versions the weights are bit-identical.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import optuna

from . import __version__
from .config import Settings, build_settings, merge_dicts
from .errors import HereticError

RECORD_VERSION = 1
PACKAGES = ("torch", "transformers", "peft", "optuna", "datasets", "safetensors", "accelerate", "numpy")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "heretic_like": __version__}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def weight_hashes(folder: str | Path) -> dict[str, str]:
    """SHA-256 of every safetensors file in an exported folder (weights or adapter)."""
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        out[path.name] = digest.hexdigest()
    return out


def build_record(study: optuna.Study, settings: Settings, number: int, card: str = "",
                 weights: dict[str, str] | None = None) -> dict:  # fmt: skip
    """The reproduce.json content for trial `number` of `study` (weights: hashes, if written)."""
    from .study import directions_batch, trial_edit

    _, trial = trial_edit(study, number)
    attrs = study.user_attrs
    return {
        "record_version": RECORD_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "study_name": study.study_name,
        "trial": number,
        "seed": settings.seed,
        "config": settings.model_dump(mode="json"),
        "batch_size": directions_batch(study, settings.directions_batch_size or settings.batch_size or 8),
        "response_prefix": attrs.get("response_prefix") if settings.response_prefix == "auto"
        else settings.response_prefix,
        "model_fingerprint": attrs.get("model_fingerprint"),
        "prompt_fingerprints": attrs.get("prompt_fingerprints"),
        "packages": package_versions(),
        "platform": f"{platform.system()} {platform.machine()}",
        "params": trial.params,
        "edit": trial.user_attrs["edit"],
        "scores": {"refusals": trial.user_attrs["refusals"], "kl_divergence": trial.user_attrs["kl_divergence"],
                   "base_refusals": attrs.get("base_refusals"), "n_harmful_eval": attrs.get("n_harmful_eval")},
        "weights_sha256": weights or {},
        "model_card": card,
    }  # fmt: skip


def write_record(record: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def read_record(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise HereticError(f"reproduce record not found: {path}")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise HereticError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(record, dict) or record.get("record_version") != RECORD_VERSION:
        raise HereticError(f"{path}: not a heretic_like reproduce record (version {RECORD_VERSION})")
    for key in ("config", "edit", "batch_size", "model_fingerprint", "prompt_fingerprints", "trial"):
        if key not in record:
            raise HereticError(f"{path}: missing key '{key}'")
    return record


def reproduce(path: str | Path, out_dir: str | Path | None = None, overrides: dict | None = None) -> bool | None:
    """Rebuild the recorded edit into `out_dir`. True: weights bit-identical to the record's;
    False: they differ; None: the record has no hashes to compare with."""
    from .ablation import Abliterator, Edit, EditOptions
    from .export import save_adapter, save_merged
    from .model import load_model, matches_fingerprint
    from .study import load_all_prompts, measure_geometry

    path = Path(path)
    record = read_record(path)
    settings = build_settings(merge_dicts(record["config"], overrides or {}), f"{path} config")
    changed = {k: (v, record.get("packages", {}).get(k)) for k, v in package_versions().items()
               if record.get("packages", {}).get(k) != v}  # fmt: skip
    if changed:
        listed = ", ".join(f"{k} {old} -> {new}" for k, (new, old) in changed.items())
        print(f"warning: package versions differ from the record ({listed}): weights may differ in the last bits",
              file=sys.stderr)  # fmt: skip
    prompts = load_all_prompts(settings)
    from .prompts import prompts_fingerprint

    stored = record["prompt_fingerprints"] or {}
    differ = [name for name, texts in prompts.items() if stored.get(name) != prompts_fingerprint(texts)]
    if differ:
        raise HereticError(f"{path}: the content of {', '.join(differ)} differs from the recorded prompts")
    loaded = load_model(settings)
    if record["model_fingerprint"] and not matches_fingerprint(loaded.model, record["model_fingerprint"]):
        raise HereticError(f"{path}: '{settings.model}' is not the model the record was made with "
                           "(weights or config differ); point --model at the original")  # fmt: skip
    geometry = measure_geometry(settings, loaded, prompts, int(record["batch_size"]), record["response_prefix"] or "")
    edit = Edit.from_dict(record["edit"])
    abliterator = Abliterator(loaded, list(edit.kernels), geometry, EditOptions.from_settings(settings))
    out = Path(out_dir) if out_dir else path.parent / f"{record['study_name']}-trial{record['trial']}-reproduced"
    print(f"Rebuilding trial {record['trial']} of study '{record['study_name']}' into {out} ...", flush=True)
    card = record.get("model_card", "")
    if settings.export_strategy == "adapter":
        save_adapter(abliterator, edit, out, card)
    else:
        save_merged(abliterator, edit, out, card, settings.max_shard_size)
    hashes, expected = weight_hashes(out), record.get("weights_sha256") or {}
    if not expected:
        print("The record holds no weight hashes (the trial was not exported): nothing to compare")
        return None
    if hashes == expected:
        print(f"Weights are bit-identical to the record ({len(hashes)} file(s) compared by SHA-256)")
        return True
    differing = sorted(set(hashes) ^ set(expected) | {k for k in hashes if hashes[k] != expected.get(k)})
    print(f"Weights differ from the record in {', '.join(differing)}", file=sys.stderr)
    return False
