"""Rebuilding an exported trial from its `reproduce.json` (see `provenance`).

The directions are measured afresh from the prompts (no cache is trusted), the recorded edit is
applied, the model written and the hashes compared: on the same machine and package versions
the weights are bit-identical.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .ablation import Abliterator, Edit, EditOptions
from .detectors import build_detector
from .errors import HereticError
from .export import merged_weights, save_adapter, save_merged
from .geometry import GeometryOptions, PromptFilter, measure_geometry
from .model import load_model, matches_fingerprint
from .preservation import kept_inputs
from .prompts import load_all_prompts
from .provenance import package_versions, read_record, weight_hashes
from .store import stored_settings


def reproduce(path: str | Path, out_dir: str | Path | None = None, overrides: dict | None = None) -> bool | None:
    """Rebuild the recorded edit into `out_dir`. True: weights bit-identical to the record's;
    False: they differ; None: the record has no hashes to compare with."""
    path = Path(path)
    record = read_record(path)
    try:
        edit = Edit.from_dict(record["edit"])
    except (KeyError, TypeError, ValueError) as exc:
        raise HereticError(f"{path}: the recorded edit cannot be read ({exc})") from None
    settings = stored_settings(record["config"], f"{path} config", overrides)
    changed = {k: (v, record.get("packages", {}).get(k)) for k, v in package_versions().items()
               if record.get("packages", {}).get(k) != v}  # fmt: skip
    if changed:
        listed = ", ".join(f"{k} {old} -> {new}" for k, (new, old) in changed.items())
        print(f"warning: package versions differ from the record ({listed}): weights may differ in the last bits",
              file=sys.stderr)  # fmt: skip
    prompts = load_all_prompts(settings)
    stored = record["prompt_fingerprints"] or {}
    differ = [name for name, fingerprint in prompts.fingerprints().items() if stored.get(name) != fingerprint]
    if differ:
        raise HereticError(f"{path}: the content of {', '.join(differ)} differs from the recorded prompts")
    loaded = load_model(settings)
    if record["model_fingerprint"] and not matches_fingerprint(loaded.model, record["model_fingerprint"]):
        raise HereticError(f"{path}: '{settings.model}' is not the model the record was made with "
                           "(weights or config differ); point --model at the original")  # fmt: skip
    prefix, batch_size = record["response_prefix"] or "", int(record["batch_size"])
    # the study's verdicts, generated again with the same batching (a record without the field was
    # written by the filter's first version, which generated in the directions' batches)
    scoring = int(record.get("scoring_batch_size") or batch_size)
    prompt_filter = PromptFilter.of(settings, lambda: build_detector(settings, loaded, scoring, prefix), scoring)
    geometry = measure_geometry(GeometryOptions.from_settings(settings), loaded, prompts, batch_size, prefix,
                                prompt_filter)  # fmt: skip
    kept = kept_inputs(settings.preserved_input_rank, loaded, prompts, list(edit.kernels), prefix, batch_size)
    abliterator = Abliterator(loaded, list(edit.kernels), geometry, EditOptions.from_settings(settings), kept)
    out = Path(out_dir) if out_dir else path.parent / f"{record['study_name']}-trial{record['trial']}-reproduced"
    print(f"Rebuilding trial {record['trial']} of study '{record['study_name']}' into {out} ...", flush=True)
    card = record.get("model_card", "")
    if settings.export_strategy == "adapter":
        save_adapter(abliterator, edit, out, card)
    else:
        save_merged(abliterator, merged_weights(abliterator, edit), out, card, settings.max_shard_size)
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
