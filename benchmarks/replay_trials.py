"""Replay a study's first trials with the current code: same config, same edits, same order.

    python benchmarks/replay_trials.py benchmarks/.cache/checkpoints/bench-v4.journal --trials 20

A new study (NAME-replay) gets the old study's first N trials' parameters enqueued, so the
sampler has no say: every difference in a trial's refusals, pruning and seconds comes from the
code. Used to measure scoring-order changes (which prompts a trial meets first decides how soon a
dominated trial stops). Prints both runs side by side and writes them as JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def row(trial) -> dict:
    attrs = trial.user_attrs
    return {"state": trial.state.name, "refusals": attrs.get("refusals", attrs.get("refusals_at_least")),
            "kl": attrs.get("kl_divergence"), "tokens": attrs.get("tokens_generated"),
            "seconds": round(attrs.get("kl_seconds", 0) + attrs.get("generation_seconds", 0), 1)}  # fmt: skip


def main() -> None:
    from heretic_like.store import load_existing_study, open_study, settings_of
    from heretic_like.study import run_study

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", help="the journal (or storage URL) of the study to replay")
    parser.add_argument("--name", default=None, help="study name within the storage")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--suffix", default="replay", help="the new study is named NAME-SUFFIX")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    old = load_existing_study(args.study, args.name)
    trials = [t for t in old.trials if t.state.name in ("COMPLETE", "PRUNED")][: args.trials]
    settings = settings_of(old, {"study_name": f"{old.study_name}-{args.suffix}", "n_trials": len(trials),
                                 "export_trial": "none", "verify_response_length": 0})  # fmt: skip
    new = open_study(settings)
    if not new.trials:
        for trial in trials:
            new.enqueue_trial(trial.params)
    replayed = [t for t in run_study(settings).study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    rows = [{"trial": a.number, "before": row(a), "now": row(b)} for a, b in zip(trials, replayed, strict=False)]
    # Tokens generated do not depend on how busy the machine is; seconds do.
    print(f"\n{'trial':>5} | {'before: state, refusals, tokens, s':<36} | now: state, refusals, tokens, s")
    for r in rows:
        b, n = r["before"], r["now"]
        print(f"{r['trial']:>5} | {b['state']:<8} {b['refusals']!s:>3} {b['tokens']!s:>6} {b['seconds']:>6} s{'':<8} | "
              f"{n['state']:<8} {n['refusals']!s:>3} {n['tokens']!s:>6} {n['seconds']:>6} s")  # fmt: skip
    for state in ("COMPLETE", "PRUNED"):
        for key in ("before", "now"):
            picked = [r[key] for r in rows if r[key]["state"] == state]
            print(f"{state.lower()}, {key}: {len(picked)} trials, {sum(p['tokens'] or 0 for p in picked)} tokens, "
                  f"{sum(p['seconds'] for p in picked):.0f} s")  # fmt: skip
    total = {k: {"tokens": sum(r[k]["tokens"] or 0 for r in rows), "seconds": sum(r[k]["seconds"] for r in rows)}
             for k in ("before", "now")}  # fmt: skip
    print(f"all {len(rows)} trials: before {total['before']}, now {total['now']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows,
                                              "totals": total}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
