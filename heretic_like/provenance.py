"""Provenance of an export, `reproduce.json`: everything an exported trial's weights depend on.

The full config, the seed, the batch size the directions were measured with, the response
prefix, fingerprints of the model and of every prompt set's content, package versions, the
trial's edit and the SHA-256 of every weight file written. `reproduce` rebuilds from it.
"""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import optuna

from . import __version__
from .config import Settings
from .errors import HereticError
from .files import write_atomically
from .records import StudyRecord

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
    stored = StudyRecord(study)
    trial = stored.trial(number)
    return {
        "record_version": RECORD_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "study_name": study.study_name,
        "trial": number,
        "seed": settings.seed,
        "config": settings.model_dump(mode="json"),
        "batch_size": stored.directions_batch(settings.directions_batch_size or settings.batch_size or 8),
        "scoring_batch_size": stored.batch_size,  # generations before the directions (filter_direction_prompts)
        "response_prefix": stored.response_prefix if settings.response_prefix == "auto" else settings.response_prefix,
        "model_fingerprint": stored.model_fingerprint,
        "prompt_fingerprints": stored.prompt_fingerprints,
        "packages": package_versions(),
        "platform": f"{platform.system()} {platform.machine()}",
        "params": trial.params,
        "edit": trial.edit_dict,
        "scores": {"refusals": trial.refusals, "kl_divergence": trial.kl_divergence,
                   "base_refusals": stored.base_refusals, "n_harmful_eval": stored.n_harmful_eval},
        "weights_sha256": weights or {},
        "model_card": card,
    }  # fmt: skip


def write_record(record: dict, path: str | Path) -> Path:
    text = json.dumps(record, indent=2, ensure_ascii=False) + "\n"
    return write_atomically(path, lambda tmp: tmp.write_text(text))


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
