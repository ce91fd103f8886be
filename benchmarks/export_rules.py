"""Which export rule picks the best trial for the drift it costs? Replays the rules on the trials
of finished benchmark studies (their summary.json: every trial's refusals and KL, held-out
HarmBench refusals of the Pareto trials that were scored) and prints each rule's pick.

    python benchmarks/export_rules.py [SUMMARY.json ...]

No model is loaded: a pick whose held-out count was not measured shows "-".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from heretic_like.results import ExportRule, choose_trial, pareto_front  # noqa: E402

RULES = [("fewest_refusals", 0.1, 0.2), ("fewest_refusals", 0.03, 0.2)] + [
    ("balanced", 0.1, x) for x in (0.02, 0.05, 0.1, 0.2, 0.25, 0.3, 0.5, 1.0)
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summaries", nargs="*", type=Path)
    args = parser.parse_args()
    paths = args.summaries or sorted(ROOT.glob("benchmarks/results-*/summary.json"))
    paths += [] if args.summaries else sorted(ROOT.glob("benchmarks/methods/*/summary.json"))
    rows = []
    for path in paths:
        summary = json.loads(path.read_text())
        table = pd.DataFrame([t for t in summary["trials"] if t["state"] == "COMPLETE"])
        if table.empty:
            continue
        heldout = {r["trial"]: r["heldout_refusals"] for r in summary.get("pareto_heldout", [])}
        best = summary.get("best_trial") or {}
        if best.get("heldout_refusals_long") is not None:  # quality runs: the chosen trial at 128 tokens
            heldout[best["trial"]] = f"{best['heldout_refusals_long']}@128"
        # The front's long recounts, as the study stored them (per trial, or as the summary's
        # front_long_counts): the rule chooses by those counts.
        recounts = {int(k): v for k, v in (summary.get("front_long_counts") or {}).items()}
        stored = table["refusals_long"] if "refusals_long" in table else pd.Series(float("nan"), index=table.index)
        table["refusals_long"] = stored.astype(float).fillna(table["trial"].map(recounts).astype(float))
        front = pareto_front(table)
        base = int(summary["base_refusals_study_eval"])
        row = {"study": path.parent.name, "base": base, "front": len(front)}
        for name, limit, exchange in RULES:
            choice = choose_trial(table, ExportRule(name, limit, exchange, base))
            picked = table[table["trial"] == choice.trial].iloc[0]
            label = name if name != "balanced" else f"balanced x{exchange}"
            label += f" KL<={limit}" if name == "fewest_refusals" else ""
            long = "" if pd.isna(picked["refusals_long"]) else f" ({int(picked['refusals_long'])} long)"
            row[label] = (f"#{choice.trial}: {int(picked['refusals'])}{long} @ {picked['kl_divergence']:.4f}, "
                          f"held-out {heldout.get(choice.trial, '-')}")  # fmt: skip
        rows.append(row)
        print(f"{path.parent.name}: front " + ", ".join(
            f"#{int(r.trial)} {int(r.refusals)}@{r.kl_divergence:.4f}" + (f" (held-out {heldout[r.trial]})"
            if r.trial in heldout else "") for r in front.itertuples()))  # fmt: skip
    print()
    frame = pd.DataFrame(rows).set_index("study")
    frame = frame.T if len(frame) <= 13 else frame  # many studies: one row each
    with pd.option_context("display.max_colwidth", 60, "display.width", 250, "display.max_columns", None):
        print(frame.to_string())


if __name__ == "__main__":
    main()
