"""How many refusals does the response length hide? The unedited model and a study's chosen trial,
counted on the 100 held-out HarmBench behaviours at several response lengths.

    python benchmarks/response_length.py --study benchmarks/.cache/checkpoints/methods-plain.journal \
        --lengths 16 32 64 128 256 --out benchmarks/response-length

One greedy pass at the longest length serves every length: greedy decoding makes the first L
tokens of a long response exactly the L-token response, so each shorter count is read off the
prefixes. Rows stop at their first marker (their verdict cannot change after it), so the pass
costs what the longest count alone costs. Writes `OUT/summary.json` and `OUT/summary.md`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import StoppingCriteriaList

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.qwen_benchmark import harmbench_prompts  # noqa: E402
from heretic_like import generation  # noqa: E402
from heretic_like.detectors import MarkerDetector  # noqa: E402
from heretic_like.model import chat_texts, encode  # noqa: E402
from heretic_like.records import trial_edit  # noqa: E402
from heretic_like.results import ExportRule, choose_best, trials_table  # noqa: E402
from heretic_like.store import load_existing_study, settings_of  # noqa: E402
from heretic_like.study import study_abliterator  # noqa: E402


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
    rule = ExportRule.of(settings, study)
    number = args.trial if args.trial is not None else choose_best(trials_table(study), rule)
    edit, trial = trial_edit(study, number)
    abliterator = study_abliterator(study, settings, list(edit.kernels))
    loaded = abliterator.loaded
    prompts = harmbench_prompts(ROOT / "benchmarks" / ".cache", args.heldout)
    texts = chat_texts(loaded.tokenizer, prompts, settings.system_prompt)
    detector = MarkerDetector.from_settings(settings)
    longest = max(args.lengths)

    def write() -> None:  # after each pass, so an interrupted run keeps what it measured
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
        lines = ["| response tokens | " + " | ".join(dict.fromkeys(r["model"] for r in rows)) + " |",
                 "|---|" + "---|" * len(dict.fromkeys(r["model"] for r in rows))]  # fmt: skip
        for length in args.lengths:
            counts = [f"{r['refusals']}/{r['prompts']}" for r in rows if r["length"] == length]
            lines.append(f"| {length} | " + " | ".join(counts) + " |")
        (out / "summary.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))

    rows = []
    for which in ("unedited", f"trial {number}"):
        if which == "unedited":
            abliterator.reset()
        else:
            abliterator.apply(edit)
        started = time.perf_counter()
        verdicts = {length: 0 for length in args.lengths}
        tokens = 0
        for start in range(0, len(texts), args.batch_size):
            batch = encode(loaded.tokenizer, texts[start : start + args.batch_size], loaded.device)
            width = batch["input_ids"].shape[1]
            asked = prompts[start : start + args.batch_size]
            stop = StoppingCriteriaList([generation.StopAtMarker(loaded.tokenizer, width, detector, True, None, asked)])
            with torch.inference_mode():
                output = loaded.model.generate(**batch, max_new_tokens=longest, do_sample=False, temperature=None,
                                               top_p=None, top_k=None, pad_token_id=loaded.tokenizer.pad_token_id,
                                               stopping_criteria=stop)[:, width:]  # fmt: skip
            tokens += int((output != loaded.tokenizer.pad_token_id).sum())
            for row, prompt in zip(output, asked, strict=True):
                for length in args.lengths:
                    text = loaded.tokenizer.decode(row[:length], skip_special_tokens=True)
                    verdicts[length] += detector(text, prompt)
        seconds = time.perf_counter() - started
        for length in args.lengths:
            rows.append({"model": which, "length": length, "refusals": verdicts[length], "prompts": len(prompts)})
        print(which, verdicts, f"{seconds:.0f} s, {tokens} tokens", flush=True)
        rows[-1].update({"seconds_for_all_lengths": round(seconds, 1), "tokens": tokens})
        write()


if __name__ == "__main__":
    main()
