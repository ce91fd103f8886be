"""How many refusals does the response length hide? The unedited model and a study's chosen trial,
counted on the 100 held-out HarmBench behaviours at several response lengths.

    python benchmarks/response_length.py --study benchmarks/.cache/checkpoints/methods-plain.journal \
        --lengths 16 32 64 128 256 --out benchmarks/response-length

Rows stop at their first marker, so a longer budget only costs the responses that keep
complying; the table gives refusals, wall time and tokens generated per length. Writes
`OUT/summary.json` and `OUT/summary.md`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.qwen_benchmark import harmbench_prompts  # noqa: E402
from heretic_like import evaluation  # noqa: E402
from heretic_like.model import chat_texts  # noqa: E402
from heretic_like.study import (  # noqa: E402
    choose_best,
    load_existing_study,
    settings_of,
    study_abliterator,
    trial_edit,
    trials_table,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True, help="a finished benchmark study (journal file)")
    parser.add_argument("--trial", type=int, help="default: the export rule's pick")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--heldout", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/response-length")
    args = parser.parse_args()

    study = load_existing_study(args.study, None)
    settings = settings_of(study)
    number = args.trial if args.trial is not None else choose_best(trials_table(study), settings.export_kl_limit)
    edit, trial = trial_edit(study, number)
    abliterator = study_abliterator(study, settings, list(edit.kernels))
    loaded = abliterator.loaded
    prompts = harmbench_prompts(ROOT / "benchmarks" / ".cache", args.heldout)
    texts = chat_texts(loaded.tokenizer, prompts, settings.system_prompt)
    rows = []
    for which in ("unedited", f"trial {number}"):
        if which == "unedited":
            abliterator.reset()
        else:
            abliterator.apply(edit)
        for length in args.lengths:
            started = time.perf_counter()
            refused, _, tokens = evaluation.count_refusals(loaded, texts, length, args.batch_size,
                                                           settings.refusal_markers)  # fmt: skip
            seconds = time.perf_counter() - started
            rows.append({"model": which, "length": length, "refusals": refused, "prompts": len(prompts),
                         "seconds": round(seconds, 1), "tokens": tokens})  # fmt: skip
            print(rows[-1], flush=True)
    summary = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "command": " ".join(sys.argv),
        "study": study.study_name,
        "trial": number,
        "study_response_length": settings.max_response_length,
        "trial_study_refusals": f"{trial.user_attrs['refusals']}/{study.user_attrs['n_harmful_eval']}",
        "kl_divergence": trial.user_attrs["kl_divergence"],
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = ["| model | response tokens | refusals (held-out HarmBench) | seconds | tokens generated |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['model']} | {r['length']} | {r['refusals']}/{r['prompts']} | {r['seconds']} "
                     f"| {r['tokens']} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
