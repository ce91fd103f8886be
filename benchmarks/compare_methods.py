"""Compare the edit methods on the real subject at one budget, over several seeds.

    python benchmarks/compare_methods.py --trials 16 --seeds 0 1 2 --out benchmarks/methods-seeds

Each method is a set of config overrides (relative to config.default.toml) run through
`qwen_benchmark.py` once per seed (same prompts, same held-out HarmBench behaviours); the held-out
count of one run moves by 1-3 prompts between seeds, so methods are compared on the mean and spread
over seeds. The per-run table and the per-method aggregate are written to `OUT/comparison.md` and
`OUT/comparison.json`. Runs already summarised in OUT are reused, so an interrupted comparison
resumes; runs go seed by seed, so a stopped comparison still has whole seeds for every method.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HERETIC_PLAIN = {"orthogonalize_direction": "false", "row_normalization": "none", "biproject_direction": "false",
                 "search.direction_scope": '["global", "per_layer"]'}  # fmt: skip
METHODS: dict[str, dict[str, str]] = {
    "plain": HERETIC_PLAIN,
    "projected": {**HERETIC_PLAIN, "orthogonalize_direction": "true"},
    # Heretic 1.4's own defaults: orthogonalised, full row normalisation, global or per-layer direction
    "norm-preserving projected (Heretic 1.4 default)": {**HERETIC_PLAIN, "orthogonalize_direction": "true",
                                                        "row_normalization": "full"},
    "biprojected, best layer": {**HERETIC_PLAIN, "biproject_direction": "true",
                                "search.direction_scope": '["best_layer"]'},
    "norm-preserving (full, rank 3)": {**HERETIC_PLAIN, "row_normalization": "full"},
    # the default config
    "norm-preserving biprojected": {},
    "multi-direction k=3, entanglement-aware": {**HERETIC_PLAIN, "directions_per_layer": "3",
                                                "capability_prompts.dataset": "builtin:capability"},
}  # fmt: skip


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def spread(values: list[float], fmt: str) -> str:
    """mean (min–max) of one figure over seeds."""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--startup", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default="benchmarks/methods")
    parser.add_argument("--batch-size", default="64", help="fixed, so every method runs at the same batch")
    parser.add_argument("--only", nargs="*", help="run just these methods (names as in the table)")
    parser.add_argument("--pareto-limit", default="0", help="Pareto trials scored held out besides the chosen one")
    parser.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="override for every method, e.g. --set model /path/to/model.gguf")  # fmt: skip
    args = parser.parse_args()
    out = Path(args.out)
    methods = {name: o for name, o in METHODS.items() if not args.only or name in args.only}
    rows = []
    for seed in args.seeds:
        for name, overrides in methods.items():
            folder = out / slug(name) / f"seed-{seed}"
            summary_path = folder / "summary.json"
            if not summary_path.is_file():
                command = [sys.executable, str(ROOT / "benchmarks" / "qwen_benchmark.py"), "--trials",
                           str(args.trials), "--out", str(folder), "--pareto-limit", args.pareto_limit,
                           "--study-name", f"methods-{slug(name)}-seed{seed}",
                           "--set", "n_startup_trials", str(args.startup), "--set", "seed", str(seed),
                           "--set", "batch_size", args.batch_size]  # fmt: skip
                for key, value in [*args.set, *overrides.items()]:
                    command += ["--set", key, value]
                print("$", " ".join(command), flush=True)
                subprocess.run(command, check=True)
            s = json.loads(summary_path.read_text())
            best = s["best_trial"]
            rows.append({"method": name, "seed": seed, "overrides": overrides, "trials": s["n_trials"],
                         "base_heldout": s["base_refusals_heldout"], "best_trial": best["trial"],
                         "study_refusals": best["study_refusals"], "study_prompts": s["study_eval"]["harmful"],
                         "heldout_refusals": best["heldout_refusals"], "kl_divergence": best["kl_divergence"],
                         "overrefusal": s["overrefusal"]["best_trial"],
                         "overrefusal_prompts": s["overrefusal"]["prompts"],
                         "per_trial_s": s["timings_s"]["per_trial_mean"]})  # fmt: skip
    aggregate = []
    for name in methods:
        runs = [r for r in rows if r["method"] == name]
        if runs:
            aggregate.append({"method": name, "seeds": [r["seed"] for r in runs],
                              "heldout_refusals": [r["heldout_refusals"] for r in runs],
                              "kl_divergence": [r["kl_divergence"] for r in runs],
                              "study_refusals": [r["study_refusals"] for r in runs],
                              "overrefusal": [r["overrefusal"] for r in runs],
                              "per_trial_s": [r["per_trial_s"] for r in runs]})  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps({"runs": rows, "methods": aggregate}, indent=2))
    lines = ["| method | seeds | held-out refusals /100, mean (min–max) | KL, mean (min–max) | "
             "study-set refusals | over-refusal (edgy) | s / trial |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for a in aggregate:
        lines.append(f"| {a['method']} | {len(a['seeds'])} | {spread(a['heldout_refusals'], '.1f')} | "
                     f"{spread(a['kl_divergence'], '.4f')} | {spread(a['study_refusals'], '.1f')} | "
                     f"{spread(a['overrefusal'], '.1f')} | {spread(a['per_trial_s'], '.0f')} |")  # fmt: skip
    lines += ["", "| method | seed | chosen trial | study-set refusals | held-out refusals | KL | over-refusal |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['method']} | {r['seed']} | {r['best_trial']} | "
                     f"{r['study_refusals']}/{r['study_prompts']} | {r['heldout_refusals']}/100 | "
                     f"{r['kl_divergence']:.4f} | {r['overrefusal']}/{r['overrefusal_prompts']} |")  # fmt: skip
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
