"""Compare the edit methods on the real subject at one budget: one benchmark run per method.

    python benchmarks/compare_methods.py --trials 24 --out benchmarks/methods

Each method is a set of config overrides run through `qwen_benchmark.py` (same prompts, same
held-out HarmBench behaviours, same seed); the table of their chosen trials is written to
`OUT/comparison.md` and `OUT/comparison.json`. Runs already summarised in OUT are reused, so an
interrupted comparison resumes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

METHODS: dict[str, dict[str, str]] = {
    "plain": {},
    "projected": {"orthogonalize_direction": "true"},
    "biprojected, best layer": {"biproject_direction": "true", "search.direction_scope": '["best_layer"]'},
    "norm-preserving (full, rank 3)": {"row_normalization": "full"},
    "norm-preserving biprojected": {"row_normalization": "full", "biproject_direction": "true",
                                    "orthogonalize_direction": "true", "search.direction_scope": '["best_layer"]'},
    "multi-direction k=3, entanglement-aware": {"directions_per_layer": "3",
                                                "capability_prompts.dataset": "builtin:capability"},
}  # fmt: skip


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--startup", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/methods")
    parser.add_argument("--batch-size", default="16", help="fixed, so every method runs at the same batch")
    parser.add_argument("--only", nargs="*", help="run just these methods (names as in the table)")
    parser.add_argument("--pareto-limit", default="2", help="Pareto trials scored held out besides the chosen one")
    parser.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="override for every method, e.g. --set model /path/to/model.gguf")  # fmt: skip
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    for name, overrides in METHODS.items():
        if args.only and name not in args.only:
            continue
        folder = out / slug(name)
        summary_path = folder / "summary.json"
        if not summary_path.is_file():
            command = [sys.executable, str(ROOT / "benchmarks" / "qwen_benchmark.py"), "--trials", str(args.trials),
                       "--out", str(folder), "--pareto-limit", args.pareto_limit,
                       "--study-name", f"methods-{slug(name)}", "--set", "n_startup_trials", str(args.startup),
                       "--set", "seed", "0",
                       "--set", "batch_size", args.batch_size]  # fmt: skip
            for key, value in [*args.set, *overrides.items()]:
                command += ["--set", key, value]
            print("$", " ".join(command), flush=True)
            subprocess.run(command, check=True)
        s = json.loads(summary_path.read_text())
        best = s["best_trial"]
        chosen = next((t for t in s["trials"] if t["trial"] == best["trial"]), {})
        rows.append({"method": name, "overrides": overrides, "trials": s["n_trials"],
                     "base_heldout": s["base_refusals_heldout"], "best_trial": best["trial"],
                     "study_refusals": f"{best['study_refusals']}/{s['study_eval']['harmful']}",
                     "heldout_refusals": best["heldout_refusals"], "kl_divergence": best["kl_divergence"],
                     "overrefusal": f"{s['overrefusal']['best_trial']}/{s['overrefusal']['prompts']}",
                     "per_trial_s": s["timings_s"]["per_trial_mean"], "directions_s": s["timings_s"]["directions"],
                     "approximation_error": chosen.get("approximation_error")})  # fmt: skip
    (out / "comparison.json").write_text(json.dumps(rows, indent=2))
    lines = ["| method | chosen trial | refusals, study set | refusals, 100 held-out HarmBench | KL | "
             "over-refusal (edgy) | s / trial | LoRA approx. error |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        err = "—" if r["approximation_error"] is None else f"{r['approximation_error']:.3f}"
        lines.append(f"| {r['method']} | {r['best_trial']} | {r['study_refusals']} | {r['heldout_refusals']} | "
                     f"{r['kl_divergence']:.4f} | {r['overrefusal']} | {r['per_trial_s']} | {err} |")  # fmt: skip
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
