"""What screening would have done to a study in which every trial was generated.

    python benchmarks/screening_audit.py STUDY.journal [--out audit.json]

Run the study with `screen_trials = true` and `screening_audit_fraction = 1`: every trial then
gets its first look and stored proxy (`predicted_refusals`) and is still generated. This replays
the screening rule over the trials in the order they finished (`screening.replay_screening`) and
prints the proxy's rank correlation with the generated counts, which trials the rule would have
decided without generating, how many of the true Pareto front's trials are among them (the
rule's misses; target <= 5 %), and the generation time they would have saved.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from heretic_like.records import StudyRecord  # noqa: E402
from heretic_like.results import pareto_front, trials_table  # noqa: E402
from heretic_like.screening import Shadowed, rank_correlation, replay_screening  # noqa: E402
from heretic_like.store import load_existing_study, settings_of  # noqa: E402


def audit(study, extra: float = 1.0) -> dict:
    settings = settings_of(study)
    record = StudyRecord(study)
    ordered = sorted((t for t in record.trials() if t.predicted_refusals is not None and not t.screened
                      and t.trial.datetime_complete is not None), key=lambda t: t.trial.datetime_complete)  # fmt: skip
    shadow = [Shadowed(t.number, t.kl_divergence, t.predicted_refusals, t.refusals, t.refusals_at_least)
              for t in ordered if t.kl_divergence is not None]  # fmt: skip
    screened = replay_screening(shadow, settings.n_startup_trials, extra)
    finished = [t for t in ordered if t.refusals is not None]
    front = set(pareto_front(trials_table(study))["trial"].astype(int))
    missed = sorted(front & set(screened))
    seconds = {t.number: (t.attr("kl_seconds") or 0.0) + (t.attr("generation_seconds") or 0.0) for t in ordered}
    saved = sum(t.attr("generation_seconds") or 0.0 for t in ordered if t.number in screened)
    return {
        "study": study.study_name,
        "n_trials": len(record.trials()),
        "n_with_proxy": len(shadow),
        "n_startup_trials": settings.n_startup_trials,
        "proxy_rank_correlation": rank_correlation([t.predicted_refusals for t in finished],
                                                   [t.refusals for t in finished]),  # fmt: skip
        "n_finished": len(finished),
        "margin_extra": extra,
        "n_would_screen": len(screened),
        "would_screen": {str(n): reason for n, reason in screened.items()},
        "true_front": sorted(front),
        "front_missed": missed,
        "front_missed_share": round(len(missed) / len(front), 3) if front else None,
        "trial_seconds": round(sum(seconds.values()), 1),
        "generation_seconds_saved": round(saved, 1),
        "proxy_vs_counted": [{"trial": t.number, "kl": t.kl_divergence, "predicted": t.predicted_refusals,
                              "refusals": t.refusals, "refusals_at_least": t.refusals_at_least,
                              "would_screen": t.number in screened} for t in ordered],  # fmt: skip
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", help="journal file or Optuna storage URL")
    parser.add_argument("--name", default=None, help="study name within the storage")
    parser.add_argument("--out", default=None, help="write the audit as JSON here")
    parser.add_argument("--margin-extra", type=float, nargs="+", default=[1.0, 0.5, 0.0, -0.5],
                        help="replay the rule with these allowances above the errors' quantile (the rule's own: 1)")
    args = parser.parse_args()
    study = load_existing_study(args.study, args.name)
    result = audit(study, args.margin_extra[0])
    for key, value in result.items():
        if key not in ("proxy_vs_counted", "would_screen"):
            print(f"{key}: {value}")
    result["margins"] = []
    print("\n| margin | trials screened | front trials screened | generation saved (s) |\n|---|---|---|---|")
    for extra in args.margin_extra:
        other = audit(study, extra)
        row = {key: other[key] for key in ("margin_extra", "n_would_screen", "would_screen", "front_missed",
                                           "generation_seconds_saved")}  # fmt: skip
        result["margins"].append(row)
        print(f"| q95 {extra:+g} | {other['n_would_screen']} {sorted(map(int, other['would_screen']))} | "
              f"{len(other['front_missed'])} of {len(other['true_front'])} | {other['generation_seconds_saved']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
