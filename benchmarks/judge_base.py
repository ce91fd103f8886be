"""The judge cross-check on whole answers of the unedited testbed model: its 128-token answers to
the 100 held-out HarmBench behaviours, generated whole (not stopped at the first marker), counted
by the markers and by a judge model (default: the 1.5B testbed model); prints both counts, the
agreement, kappa and each disagreement, and writes them to `--out`.

    python benchmarks/judge_base.py [--judge-model PATH] [--out benchmarks/results-quality/judge-base.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from default_run import judge_check, judge_path, score  # noqa: E402
from qwen_benchmark import harmbench_prompts  # noqa: E402

from heretic_like.config import load_settings  # noqa: E402
from heretic_like.detectors import ModelJudge  # noqa: E402
from heretic_like.model import load_model  # noqa: E402
from heretic_like.testbed import fetch_qwen  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judge-model", default=None)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results-quality" / "judge-base.json"))
    args = parser.parse_args()
    heldout = harmbench_prompts(ROOT / "benchmarks" / ".cache", 100)
    settings = load_settings(None, {"model": str(fetch_qwen(ROOT / "models"))})
    started = time.perf_counter()
    loaded = load_model(settings)
    refusals, _, _, every = score(settings, loaded, heldout, args.length, args.batch_size, whole=True)
    generated = time.perf_counter() - started
    del loaded
    judge_model = judge_path(args.judge_model)
    judge = load_model(load_settings(None, {"model": judge_model}))
    checked = {"judge": Path(judge_model).name, "length": args.length,
               **judge_check(ModelJudge(judge, args.batch_size), {"base": every}),
               "seconds": {"generate": round(generated, 1),
                           "judge": round(time.perf_counter() - started - generated, 1)}}  # fmt: skip
    Path(args.out).write_text(json.dumps(checked, indent=1) + "\n")
    base = checked["base"]
    print(f"unedited model, {args.length}-token whole answers: markers {refusals}/100, judge "
          f"{base['judge']}/100 (agreement {base['agreement']}, kappa {base['kappa']})")
    for d in checked["disagreements"]:
        print(f"- markers {d['markers']}, judge {d['judge']}: {d['prompt'][:70]!r} -> {d['response'][:100]!r}")


if __name__ == "__main__":
    main()
