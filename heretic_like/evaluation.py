"""Scoring an edit: refusals on harmful prompts (greedy generation + a detector) and first-token
KL divergence from the unedited model on harmless prompts. Generation itself is `generation`."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .detectors import Detector
from .generation import Prefilled, first_token_logprobs, first_token_look, generate_batches, leading_rows
from .model import LoadedModel, chat_texts
from .prompts import PromptSets


def detect_response_prefix(responses: list[str], tags: Sequence[tuple[str, str]] = (), prompt: str = "") -> str:
    """The thinking block every response opens with, as a prefix to put after the generation
    prompt so that KL and refusal checks look where answers begin ("" when there is none).

    A block the responses close identically (an empty `<think>\n\n</think>\n\n`) is kept as it
    is; one they leave open is closed empty, so the model answers straight away. Other common
    text is not taken: an opening such as "I'm " shared by a few responses is content, not format.
    A chat template that itself opens the block (the `prompt` ends with an opener) gets it closed.
    """
    for opener, closer in tags:
        if prompt.rstrip().endswith(opener):
            return f"\n\n{closer}\n\n"
    common = os.path.commonprefix(responses) if len(responses) > 1 else ""
    body = common.lstrip()
    lead = common[: len(common) - len(body)]
    for opener, closer in tags:
        if body.startswith(opener):
            end = body.find(closer)
            if end < 0:
                return f"{lead}{opener}\n\n{closer}\n\n"
            rest = body[end + len(closer) :]
            return lead + body[: end + len(closer)] + rest[: len(rest) - len(rest.lstrip())]
    return ""


def kl_divergence(base_logprobs: torch.Tensor, edited_logprobs: torch.Tensor) -> float:
    """Mean over prompts of KL(base || edited) of the next-token distributions."""
    return float(F.kl_div(edited_logprobs, base_logprobs, reduction="batchmean", log_target=True))


@dataclass
class Counted:
    refusals: int  # with `pruned`, a lower bound: generation stopped once it reached the cap
    responses: list[str]
    refused: list[bool]  # the detector's verdict per response
    tokens: int
    pruned: bool = False


def refusal_count(loaded: LoadedModel, texts: list[str], prompts: list[str], detector: Detector, max_new_tokens: int,
                  batch_size: int, desc: str | None = None, stop_rows: bool = True,
                  cap: int | None = None, prefilled: Prefilled | None = None) -> Counted:  # fmt: skip
    """The one refusal-counting loop: greedy responses to chat-formatted `texts` under the current
    edit, judged by `detector` against the plain requests `prompts`.

    With a streaming detector (markers) rows stop at their first marker when `stop_rows`, so long
    responses only cost those that comply. With `cap`, generation stops once that many refusals
    are counted (the trial is dominated: `pruned`), and does not start when it is 0; its first batch
    is then a small one (`leading_rows`), where the hardest prompts go first. `prefilled`:
    the texts' KV caches under the current edit, from its first look (`generation.Prefilled`)."""
    responses: list[str] = []
    refused: list[bool] = []
    tokens = 0
    if cap != 0:
        budget = (lambda: cap - sum(refused)) if cap is not None else None
        for batch, count in generate_batches(loaded, texts, max_new_tokens, batch_size, desc, detector, stop_rows,
                                             budget, prompts, prefilled, leading_rows(cap, batch_size)):  # fmt: skip
            refused += detector.classify(prompts[len(responses) : len(responses) + len(batch)], batch)
            responses += batch
            tokens += count
            if cap is not None and sum(refused) >= cap:
                break
    return Counted(sum(refused), responses, refused, tokens, cap is not None and sum(refused) >= cap)


def count_refusals(loaded: LoadedModel, texts: list[str], max_new_tokens: int, batch_size: int, detector: Detector,
                   desc: str | None = None,
                   prompts: list[str] | None = None) -> tuple[int, list[str], int]:  # fmt: skip
    """(refusals, responses, tokens generated): `refusal_count` without a cap."""
    counted = refusal_count(loaded, texts, prompts or [""] * len(texts), detector, max_new_tokens, batch_size, desc)
    return counted.refusals, counted.responses, counted.tokens


@dataclass
class Score:
    refusals: int  # with `pruned`, a lower bound: generation stopped once it reached the cap
    kl_divergence: float
    responses: list[str] = field(repr=False)
    kl_seconds: float = 0.0
    generation_seconds: float = 0.0
    pruned: bool = False
    tokens_generated: int = 0
    refused: list[bool] = field(default_factory=list, repr=False)  # the detector's verdict per response


@dataclass
class FirstLook:
    """What one forward without generation tells about the current edit (`Evaluator.first_look`)."""

    kl_divergence: float
    harmful_logprobs: torch.Tensor  # (n_harmful, vocab), by original position
    projections: torch.Tensor | None  # (n_harmful,) on the probe direction, by original position
    seconds: float
    # the harmful prompts' KV caches under the edit looked at: generating for that same edit starts
    # from them instead of prefilling again (`score(first_look=...)`)
    prefilled: Prefilled = field(default_factory=dict, repr=False)


class Evaluator:
    """Holds the formatted evaluation prompts and the unedited model's reference numbers."""

    def __init__(self, loaded: LoadedModel, harmful: list[str], harmless: list[str],
                 system_prompt: str | None | tuple[str | None, str | None], detector: Detector,
                 max_response_length: int, batch_size: int, stop_at_marker: bool = True,
                 response_prefix: str = ""):  # fmt: skip
        """`system_prompt`: one for both sets, or (harmful's, harmless's) where the sets differ."""
        harmful_system, harmless_system = system_prompt if isinstance(system_prompt, tuple) else (system_prompt,) * 2
        self.loaded = loaded
        self.harmful_prompts = harmful
        self.harmful = chat_texts(loaded.tokenizer, harmful, harmful_system, response_prefix)
        self.order = list(range(len(harmful)))  # harmful prompts' original positions, in scoring order
        self.harmless = chat_texts(loaded.tokenizer, harmless, harmless_system, response_prefix)
        self.detector = detector
        self.max_response_length = max_response_length
        self.batch_size = batch_size
        self.stop_at_marker = stop_at_marker
        self.base_logprobs = first_token_logprobs(loaded, self.harmless, batch_size)

    @classmethod
    def of_study(cls, loaded: LoadedModel, prompts: PromptSets, detector: Detector, max_response_length: int,
                 batch_size: int, stop_at_marker: bool, response_prefix: str) -> Evaluator:  # fmt: skip
        """A study's evaluator: its two evaluation sets, each formatted with its own system prompt."""
        return cls(loaded, prompts.harmful_eval, prompts.harmless_eval,
                   (prompts.system("harmful_eval"), prompts.system("harmless_eval")), detector,
                   max_response_length, batch_size, stop_at_marker, response_prefix)  # fmt: skip

    def prioritize(self, first: list[int]) -> None:
        """Score the harmful prompts at these original positions first, in the order given; the
        rest after them, in their original order.

        Putting the prompts most likely to be refused first makes a dominated trial reach its
        refusal cap, and stop, as early as possible. (Batches then hold other prompts side by
        side, which can move logits in their last bits, as any change of batching can.)"""
        rank = {position: i for i, position in enumerate(dict.fromkeys(first))}
        order = sorted(range(len(self.order)), key=lambda p: (0, rank[p]) if p in rank else (1, p))
        texts = dict(zip(self.order, self.harmful, strict=True))
        prompts = dict(zip(self.order, self.harmful_prompts, strict=True))
        self.order = order
        self.harmful = [texts[i] for i in order]
        self.harmful_prompts = [prompts[i] for i in order]

    def first_look(self, probe: tuple[int, torch.Tensor] | None = None) -> FirstLook:
        """KL divergence and, by the harmful prompts' original positions, their first-token
        log-probs and (with `probe` = (layer, direction)) the projection of that layer's residual
        on the direction: one forward over both sets, one shared prefix, no generation."""
        started = time.perf_counter()
        layer, direction = probe if probe is not None else (None, None)
        n = len(self.harmless)
        both, residuals, prefilled = first_token_look(self.loaded, self.harmless + self.harmful, self.batch_size,
                                                      layer, keep=range(n, n + len(self.harmful)))  # fmt: skip
        harmful = torch.empty_like(both[n:])
        harmful[self.order] = both[n:]
        projections = None
        if residuals is not None:
            projections = torch.empty(len(self.harmful))
            projections[self.order] = residuals[n:] @ (direction.float().cpu() / direction.float().norm())
        kl = kl_divergence(self.base_logprobs, both[:n])
        return FirstLook(kl, harmful, projections, time.perf_counter() - started, prefilled)

    def score(self, desc: str | None = None, refusal_cap: Callable[[float], int | None] | None = None,
              first_look: FirstLook | None = None) -> Score:  # fmt: skip
        """Score whatever edit is currently applied to the model.

        `refusal_cap(kl)` may return a refusal count at which the trial is already dominated
        (a finished trial has no more refusals at no higher KL): generation then stops as soon as
        the count reaches it, and is skipped entirely when it is 0. `first_look`: what
        `first_look()` measured for this same edit: its KL is not measured again, and its KV
        caches spare the generation's prefill.
        """
        started = time.perf_counter()
        if first_look is None:
            kl = kl_divergence(self.base_logprobs, first_token_logprobs(self.loaded, self.harmless, self.batch_size))
        else:
            kl, started = first_look.kl_divergence, started - first_look.seconds
        mid = time.perf_counter()
        cap = refusal_cap(kl) if refusal_cap else None
        counted = refusal_count(self.loaded, self.harmful, self.harmful_prompts, self.detector,
                                self.max_response_length, self.batch_size, desc, self.stop_at_marker, cap,
                                first_look.prefilled if first_look is not None else None)  # fmt: skip
        return Score(counted.refusals, kl, counted.responses, mid - started, time.perf_counter() - mid, counted.pruned,
                     counted.tokens, counted.refused)  # fmt: skip

    def count_refusals(self, max_new_tokens: int, desc: str | None = None) -> tuple[int, list[str]]:
        """Refusals of the current edit on the harmful prompts with `max_new_tokens`-token responses."""
        refusals, responses, _ = count_refusals(self.loaded, self.harmful, max_new_tokens, self.batch_size,
                                                self.detector, desc, self.harmful_prompts)  # fmt: skip
        return refusals, responses

    def refused_positions(self, score: Score) -> list[int]:
        """Original positions of the harmful prompts `score` counted as refused."""
        return [self.order[i] for i, refused in enumerate(score.refused) if refused]
