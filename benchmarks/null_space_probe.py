"""How a null-space edit trades refusals for KL: one trial's edit, confined, at several strengths.

`preserved_input_rank` confines every module's edit off the inputs harmless prompts use. That
lowers the KL of an edit and also what it removes from harmful prompts whose refusal travels
through inputs they share with harmless ones, so a confined edit needs more strength. This takes
a finished study's trial, scales its strengths (every kernel's max and min weight, the global
direction's weight) by each `--scales` factor, confines it with each `--ranks` K (0: as the
trial), and scores each as a trial is scored: first-token KL on the study's harmless evaluation
prompts and refusals on its harmful ones at its response length (markers). No held-out prompt is
read, so the numbers can choose a configuration for a study without touching the held-out set.

    python benchmarks/null_space_probe.py --study STUDY_JOURNAL --trial 14 --ranks 0 64 256 \
        --scales 1 2 3 --out benchmarks/results-quality/levers/null-space-probe/trial14.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from heretic_like.ablation import Edit  # noqa: E402
from heretic_like.detectors import build_detector  # noqa: E402
from heretic_like.evaluation import Evaluator  # noqa: E402
from heretic_like.preservation import kept_inputs  # noqa: E402
from heretic_like.prompts import load_all_prompts  # noqa: E402
from heretic_like.records import StudyRecord, trial_edit  # noqa: E402
from heretic_like.store import load_existing_study, settings_of  # noqa: E402
from heretic_like.study import resolve_response_prefix, study_abliterator  # noqa: E402


def scaled(edit: Edit, factor: float) -> Edit:
    """`edit` with every strength multiplied by `factor` (the shape of each kernel kept)."""
    kernels = {c: replace(k, max_weight=k.max_weight * factor, min_weight=k.min_weight * factor)
               for c, k in edit.kernels.items()}  # fmt: skip
    overall = edit.global_direction
    if overall is not None:
        overall = replace(overall, weight=overall.weight * factor)
    second = edit.second_peak
    if second is not None:
        second = replace(second, max_weight=second.max_weight * factor, min_weight=second.min_weight * factor)
    return replace(edit, kernels=kernels, global_direction=overall, second_peak=second)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True, help="the study's journal file (run from the folder it ran in)")
    parser.add_argument("--trial", type=int, required=True)
    parser.add_argument("--ranks", type=int, nargs="+", default=[0, 64, 256])
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    study = load_existing_study(args.study, None)
    settings = settings_of(study, {})
    edit, trial = trial_edit(study, args.trial)
    started = time.perf_counter()
    abliterator = study_abliterator(study, settings, list(edit.kernels))
    loaded, prompts = abliterator.loaded, load_all_prompts(settings)
    prefix = resolve_response_prefix(settings, study)
    batch = StudyRecord(study).batch_size or settings.batch_size or 8
    evaluator = Evaluator.of_study(loaded, prompts, build_detector(settings, loaded, batch, prefix),
                                  settings.max_response_length, batch, settings.stop_at_marker, prefix)  # fmt: skip
    directions_batch = StudyRecord(study).directions_batch(settings.directions_batch_size or batch)
    rows = []
    for rank in args.ranks:
        abliterator.reset()  # the bases are read in the unedited model
        abliterator.kept = kept_inputs(rank, loaded, prompts, list(edit.kernels), prefix, directions_batch) or {}
        for factor in args.scales:
            abliterator.apply(scaled(edit, factor))
            score = evaluator.score(desc=f"K {rank}, x{factor}")
            rows.append({"rank": rank, "scale": factor, "kl": round(score.kl_divergence, 4),
                         "refusals": score.refusals, "of": len(evaluator.harmful)})  # fmt: skip
            print(f"K {rank:4d}, strengths x{factor:<4}: KL {score.kl_divergence:.4f}, "
                  f"refusals {score.refusals}/{len(evaluator.harmful)}", flush=True)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"study": args.study, "trial": args.trial, "trial_scores": [trial.kl_divergence, trial.refusals],
              "edit": edit.to_dict(), "max_response_length": settings.max_response_length,
              "seconds": round(time.perf_counter() - started), "rows": rows}  # fmt: skip
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
