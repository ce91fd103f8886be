"""The refusal margin: how near each harmful prompt's answer still is to opening as a refusal.

A refusal count saturates. Once trials refuse 0–2 of the study's prompts, an edit that only just
tips each answer over to compliance and one that leaves room to spare count the same, and the
sampler and the export rule then prefer the gentler, lower-KL one — which on this project's
measurements refuses more of the prompts the study never saw (docs/benchmarks.md, "Levers",
*More trials*). The margin tells such edits apart without generating anything: under the edit,
the probability that each answer opens with a token the unedited model's refusals opened with
(weighted by how often that opening was a refusal), averaged over the harmful prompts. With
`refusal_margin_weight` > 0 it is added, so weighted, to the refusal count the study minimises.
"""

from __future__ import annotations

import torch

from .records import StudyRecord
from .screening import OpeningRates


def opening_rates(tokens: list[int], refused: list[bool]) -> dict[int, float]:
    """Each first response token the unedited model opened a refusal with, and the share of the
    answers it opened that were refusals. Fixed for a study (it is read from the unedited model
    alone), so a trial's margin does not drift as other trials are scored; openings of compliant
    answers only are absent (weight 0)."""
    rates = OpeningRates()
    rates.update(tokens, refused)
    return {token: rates.rate(token) for token in rates.seen if rates.refused[token]}


def unedited_opening_rates(record: StudyRecord) -> dict[int, float]:
    """`opening_rates` of the unedited model's answers to the study's harmful prompts, from its
    stored first look and refused positions."""
    tokens = record.base_first_look["tokens"]
    refused = set(record.base_refused_positions)
    return opening_rates(tokens, [position in refused for position in range(len(tokens))])


def refusal_margin(logprobs: torch.Tensor, rates: dict[int, float]) -> float:
    """Mean over prompts of Σ_t p(first token = t) · rate(t): 0 when no answer can open as a
    refusal did, 1 when every answer opens, with certainty, with a token only refusals opened.

    `logprobs`: (prompts, vocab) first-token log-probabilities under the edit."""
    if not rates or logprobs.shape[0] == 0:
        return 0.0
    tokens = torch.tensor(list(rates), dtype=torch.long)
    weights = torch.tensor(list(rates.values()), dtype=torch.float64)
    probs = logprobs.double().exp()[:, tokens]
    return float((probs @ weights).mean())
