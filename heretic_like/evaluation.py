"""Scoring an edit: refusals on harmful prompts (greedy generation + markers) and first-token
KL divergence from the unedited model on harmless prompts."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .model import LoadedModel, chat_texts, encode

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'", "\u00b4": "'"})


def normalize_text(text: str) -> str:
    """Lower case, straight apostrophes, no markdown emphasis, single spaces."""
    text = text.translate(_APOSTROPHES).lower().replace("*", "").replace("_", " ")
    return re.sub(r"\s+", " ", text).strip()


def is_refusal(response: str, markers: list[str]) -> bool:
    text = normalize_text(response)
    return any(normalize_text(marker) in text for marker in markers)


def kl_divergence(base_logprobs: torch.Tensor, edited_logprobs: torch.Tensor) -> float:
    """Mean over prompts of KL(base || edited) of the next-token distributions."""
    return float(F.kl_div(edited_logprobs, base_logprobs, reduction="batchmean", log_target=True))


@torch.inference_mode()
def first_token_logprobs(loaded: LoadedModel, texts: list[str], batch_size: int) -> torch.Tensor:
    """(n, vocab) fp32 log-probabilities of the first response token."""
    out = []
    for start in range(0, len(texts), batch_size):
        batch = encode(loaded.tokenizer, texts[start : start + batch_size], loaded.device)
        logits = loaded.model(**batch, use_cache=False, logits_to_keep=1).logits[:, -1, :]
        out.append(F.log_softmax(logits.float(), dim=-1).cpu())
    return torch.cat(out)


@torch.inference_mode()
def generate(
    loaded: LoadedModel, texts: list[str], max_new_tokens: int, batch_size: int, desc: str | None = None
) -> list[str]:
    """Greedy responses (decoded, special tokens stripped) for chat-formatted texts."""
    tokenizer = loaded.tokenizer
    responses: list[str] = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=desc is None):
        batch = encode(tokenizer, texts[start : start + batch_size], loaded.device)
        output = loaded.model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
            top_k=None, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        responses.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return responses


def autotune_batch_size(loaded: LoadedModel, texts: list[str], max_batch_size: int) -> int:
    """Largest power-of-two batch (up to max) that still raises generation throughput by >10%."""
    best, best_rate, size = 1, 0.0, 1
    while size <= max_batch_size:
        sample = (texts * (size // max(len(texts), 1) + 1))[:size]
        try:
            started = time.perf_counter()
            generate(loaded, sample, max_new_tokens=4, batch_size=size)
            rate = size / (time.perf_counter() - started)
        except torch.OutOfMemoryError:
            break
        if rate < best_rate * 1.1:
            break
        best, best_rate, size = size, rate, size * 2
    return best


@dataclass
class Score:
    refusals: int
    kl_divergence: float
    responses: list[str] = field(repr=False)
    kl_seconds: float = 0.0
    generation_seconds: float = 0.0


class Evaluator:
    """Holds the formatted evaluation prompts and the unedited model's reference numbers."""

    def __init__(self, loaded: LoadedModel, harmful: list[str], harmless: list[str], system_prompt: str | None,
                 markers: list[str], max_response_length: int, batch_size: int):  # fmt: skip
        self.loaded = loaded
        self.harmful_prompts = harmful
        self.harmful = chat_texts(loaded.tokenizer, harmful, system_prompt)
        self.harmless = chat_texts(loaded.tokenizer, harmless, system_prompt)
        self.markers = markers
        self.max_response_length = max_response_length
        self.batch_size = batch_size
        self.base_logprobs = first_token_logprobs(loaded, self.harmless, batch_size)

    def score(self, desc: str | None = None) -> Score:
        """Score whatever edit is currently applied to the model."""
        started = time.perf_counter()
        kl = kl_divergence(self.base_logprobs, first_token_logprobs(self.loaded, self.harmless, self.batch_size))
        mid = time.perf_counter()
        responses = generate(self.loaded, self.harmful, self.max_response_length, self.batch_size, desc)
        refusals = sum(is_refusal(r, self.markers) for r in responses)
        return Score(refusals, kl, responses, mid - started, time.perf_counter() - mid)
