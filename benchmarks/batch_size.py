"""The automatic batch size on the real model: is the choice stable, and is it as fast as the
best fixed size for a whole trial?

    python benchmarks/batch_size.py [--runs 3] [--busy-run 2] [--fixed 8 16 32 64]
                                    [--out benchmarks/results-default/batch_size.json]

Each run loads nothing new: it runs the probe `batch_size = 0` runs (`heretic_like.batching`)
on the default config's harmful evaluation prompts and prints the choice and every size's
measured seconds per response. Run `--busy-run` (1-based; 0 = none) shares the machine with a
CPU-bound process (a Python busy loop), the situation that made the old probe choose 1. Then
each `--fixed` size scores the unedited model the way a trial is scored (KL forward on the
harmless prompts + greedy responses to the 64 harmful prompts, markers, early stops), timed, and
the chosen size's trial time is compared with the fastest fixed size's.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from heretic_like.batching import candidate_sizes, choose_batch_size, model_timer  # noqa: E402
from heretic_like.config import load_settings  # noqa: E402
from heretic_like.detectors import MarkerDetector  # noqa: E402
from heretic_like.evaluation import Evaluator  # noqa: E402
from heretic_like.model import chat_texts, load_model  # noqa: E402
from heretic_like.prompts import load_prompts  # noqa: E402
from heretic_like.testbed import fetch_qwen  # noqa: E402


def busy_loop() -> None:
    while True:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--busy-run", type=int, default=2)
    parser.add_argument("--fixed", type=int, nargs="*", default=[8, 16, 32, 64])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results-default" / "batch_size.json"))
    args = parser.parse_args()
    settings = load_settings(None, {"model": str(fetch_qwen(ROOT / "models"))})
    loaded = load_model(settings)
    harmful = load_prompts(settings.bad_evaluation_prompts, "bad_evaluation_prompts")
    harmless = load_prompts(settings.good_evaluation_prompts, "good_evaluation_prompts")
    texts = chat_texts(loaded.tokenizer, harmful, settings.system_prompt)
    result: dict = {"machine": f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
                    "max_response_length": settings.max_response_length, "probes": [], "fixed": []}  # fmt: skip
    for run in range(1, args.runs + 1):
        busy = None
        if run == args.busy_run:
            busy = multiprocessing.Process(target=busy_loop, daemon=True)
            busy.start()
        started = time.perf_counter()
        choice = choose_batch_size(model_timer(loaded, texts, settings.max_response_length),
                                   candidate_sizes(settings.max_batch_size))  # fmt: skip
        seconds = time.perf_counter() - started
        if busy is not None:
            busy.terminate()
        costs = {t.size: round(t.seconds_per_response, 4) for t in choice.timings}
        print(f"run {run}{' (busy neighbour)' if busy else ''}: chose {choice.size} in {seconds:.0f} s; "
              f"s/response {costs}; {choice.reason}", flush=True)  # fmt: skip
        result["probes"].append({"run": run, "busy": busy is not None, "seconds": round(seconds, 1),
                                 **choice.to_dict()})  # fmt: skip
    detector = MarkerDetector.from_settings(settings)
    for size in args.fixed:
        evaluator = Evaluator(loaded, harmful, harmless, settings.system_prompt, detector,
                              settings.max_response_length, size)  # fmt: skip
        started = time.perf_counter()
        score = evaluator.score()
        seconds = time.perf_counter() - started
        print(f"fixed {size}: trial {seconds:.1f} s (KL {score.kl_seconds:.1f} s, generation "
              f"{score.generation_seconds:.1f} s), {score.refusals} refusals", flush=True)  # fmt: skip
        result["fixed"].append({"size": size, "trial_seconds": round(seconds, 1), "refusals": score.refusals})
    if result["fixed"]:
        best = min(result["fixed"], key=lambda r: r["trial_seconds"])
        chosen = {p["size"] for p in result["probes"]}
        for size in sorted(chosen):
            row = next((r for r in result["fixed"] if r["size"] == size), None)
            if row is not None:
                ratio = row["trial_seconds"] / best["trial_seconds"]
                print(f"chosen {size}: {ratio:.2f}x the fastest fixed size ({best['size']})")
                result.setdefault("chosen_vs_fastest", {})[size] = round(ratio, 3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
