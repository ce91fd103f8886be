"""Time the KL forward (first-token log-probs over the harmless evaluation prompts) on the real
model: a plain left-padded forward vs shared-prefix KV reuse with length-sorted batches.

    python benchmarks/kl_forward.py [--reps 3] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from heretic_like.config import load_settings  # noqa: E402
from heretic_like.generation import first_token_logprobs, shared_prefix_length  # noqa: E402
from heretic_like.model import chat_texts, encode, load_model  # noqa: E402
from heretic_like.prompts import load_prompts  # noqa: E402
from heretic_like.testbed import fetch_qwen  # noqa: E402


@torch.inference_mode()
def plain(loaded, texts, batch_size):
    out = []
    for start in range(0, len(texts), batch_size):
        batch = encode(loaded.tokenizer, texts[start : start + batch_size], loaded.device)
        out.append(F.log_softmax(loaded.model(**batch, logits_to_keep=1).logits[:, -1].float(), -1))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    settings = load_settings(overrides={"model": str(fetch_qwen(ROOT / "models"))})
    loaded = load_model(settings)
    prompts = load_prompts(settings.good_evaluation_prompts, "good_evaluation_prompts")
    texts = chat_texts(loaded.tokenizer, prompts, settings.system_prompt)
    rows = loaded.tokenizer(texts, add_special_tokens=False)["input_ids"]
    prefix = shared_prefix_length(rows)
    print(f"{len(texts)} prompts, mean {sum(map(len, rows)) / len(rows):.1f} tokens, shared prefix {prefix} tokens")
    for name, fn in [("plain", plain), ("prefix reuse + sorted", first_token_logprobs)]:
        times = []
        for _ in range(args.reps):
            started = time.perf_counter()
            result = fn(loaded, texts, args.batch_size)
            times.append(time.perf_counter() - started)
        print(f"{name:>24}: best {min(times):.2f} s, mean {sum(times) / len(times):.2f} s over {args.reps} runs")
        if name == "plain":
            reference = result
        else:
            print(f"max |difference| of log-probs: {(result - reference).abs().max():.2e}")


if __name__ == "__main__":
    main()
