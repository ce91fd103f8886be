"""Multi-fidelity trials: a cheap first look at every trial, generation only where it can matter.

The first look is one forward pass over the harmless prompts (for the KL divergence) and the
harmful ones together, reading each harmful prompt's distribution over the first response token.
Greedy decoding opens every response with the argmax of that distribution, so the proxy knows the
opening each response will have; how often each opening led to a refusal is learned from every
response scored so far (the unedited model's first, then every fully scored trial's). What follows
the opening is what the proxy cannot see: the screening margin, calibrated on trials that were
fully scored, covers it.

A trial is screened out (decided without generating) only when even `margin` fewer refusals than
predicted would leave it dominated by a finished trial: it could not have entered the Pareto
front. Startup trials and a random share of later ones are always fully scored, so the
calibration keeps seeing the proxy's errors.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F

# A proxy calibrated on fewer fully scored trials than this screens nothing.
MIN_CALIBRATION = 6


@dataclass(frozen=True)
class ScreeningOptions:
    """The settings screening reads (config keys `screen_trials`, `screening_audit_fraction`,
    `n_startup_trials`, `seed`)."""

    enabled: bool
    startup: int
    audit_fraction: float
    seed: int | None

    @classmethod
    def from_settings(cls, settings) -> ScreeningOptions:
        return cls(settings.screen_trials, settings.n_startup_trials, settings.screening_audit_fraction,
                   settings.seed)  # fmt: skip

    def audited(self, number: int) -> bool:
        """Is trial `number` fully scored whatever the proxy says (startup, or drawn for audit)?
        Deterministic per trial and seed, so a resumed study draws the same."""
        if number < self.startup:
            return True
        return random.Random(f"{self.seed}:{number}").random() < self.audit_fraction


class OpeningRates:
    """How often each first response token opened a refusal, over the responses scored so far.

    A token never seen opening a response gets rate 0: the proxy then leans towards compliance, so
    an edit that moves the model to new openings is generated and learned from, never screened
    out on a guess. (Screening errs only towards generating.)"""

    def __init__(self) -> None:
        self.refused: Counter[int] = Counter()
        self.seen: Counter[int] = Counter()

    def update(self, tokens: list[int], refused: list[bool]) -> None:
        for token, verdict in zip(tokens, refused, strict=True):
            self.seen[token] += 1
            self.refused[token] += bool(verdict)

    def rate(self, token: int, leave_out: bool | None = None) -> float:
        """The token's refusal rate; `leave_out`: without one response of that token with that
        verdict (a response's own verdict must not predict itself when the model is fitted)."""
        seen, refused = self.seen[token], self.refused[token]
        if leave_out is not None:
            seen, refused = seen - 1, refused - bool(leave_out)
        return refused / seen if seen > 0 else 0.0


@dataclass
class Observed:
    """Scored responses the proxy learns from: per prompt, the first token, the residual's
    projection on the probe direction (None when not measured) and the verdict."""

    tokens: list[int]
    projections: list[float] | None
    refused: list[bool]


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, l2: float = 1e-2) -> torch.Tensor:
    """Weights (bias first) of a logistic regression on standardised features, by L-BFGS."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    x = torch.cat([torch.ones(len(features), 1), (features - mean) / std], 1)
    w = torch.zeros(x.shape[1], requires_grad=True)
    optimiser = torch.optim.LBFGS([w], max_iter=100, line_search_fn="strong_wolfe")

    def loss():
        optimiser.zero_grad()
        value = F.binary_cross_entropy_with_logits(x @ w, labels) + l2 * (w[1:] ** 2).sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimiser.step(loss)
    w = w.detach()
    # back to raw features: logit = b + sum w_k (f_k - mean_k) / std_k
    return torch.cat([w[:1] - (w[1:] * mean / std).sum(0, keepdim=True), w[1:] / std])


def proxy_probabilities(history: list[Observed], tokens: list[int], projections: list[float] | None) -> torch.Tensor:
    """Each prompt's probability of being refused, from its opening token's refusal rate and (when
    every record has one) its projection on the refusal direction, by a logistic regression fitted
    on every scored response so far (leave-one-out rates, so a verdict never predicts itself)."""
    rates = OpeningRates()
    for seen in history:
        rates.update(seen.tokens, seen.refused)
    use_projection = projections is not None and all(h.projections is not None for h in history)
    rows, labels = [], []
    for seen in history:
        for i, (token, verdict) in enumerate(zip(seen.tokens, seen.refused, strict=True)):
            rows.append([rates.rate(token, verdict)] + ([seen.projections[i]] if use_projection else []))
            labels.append(float(verdict))
    current = torch.tensor([[rates.rate(t)] + ([projections[i]] if use_projection else [])
                            for i, t in enumerate(tokens)])  # fmt: skip
    y = torch.tensor(labels)
    if not rows or y.min() == y.max():  # nothing to separate yet: the opening rates alone
        return current[:, 0]
    w = fit_logistic(torch.tensor(rows), y)
    return torch.sigmoid(w[0] + current @ w[1:])


# The margin is calibrated on the proxy's latest errors: it learns from every scored trial, so
# its first predictions (made from the unedited model's responses alone) say little about its
# errors now.
CALIBRATION_WINDOW = 12


def screening_margin(errors: list[float], quantile: float = 0.95, extra: float = 1.0) -> float | None:
    """How many refusals fewer than predicted a trial may still turn out to have: the `quantile`
    of (predicted - counted) over the last CALIBRATION_WINDOW scored trials (at least 0), plus
    `extra` (one refusal; the audit replays others); None (screen nothing) while fewer than
    MIN_CALIBRATION trials calibrate it."""
    if len(errors) < MIN_CALIBRATION:
        return None
    return max(0.0, float(pd.Series(errors[-CALIBRATION_WINDOW:]).quantile(quantile))) + extra


def screen_reason(predicted: float, cap: int | None, margin: float | None) -> str | None:
    """Why the trial need not be generated, or None when it must be.

    `cap` is the fewest refusals of any finished trial at no higher KL: a trial with that many is
    dominated. Screened out only when predicted - margin still reaches it."""
    if cap is None or margin is None or predicted - margin < cap:
        return None
    return (f"predicted {predicted:.1f} refusals; even {margin:.1f} fewer would be dominated "
            f"(a finished trial has {cap} at no higher KL)")  # fmt: skip


@dataclass(frozen=True)
class Shadowed:
    """One generated trial of a study run with every trial audited (`screening_audit_fraction =
    1`): its KL, what the proxy predicted before it was generated, and what was counted
    (`refusals` when it finished, else the `refusals_at_least` it was stopped at)."""

    number: int
    kl: float
    predicted: float
    refusals: int | None
    refusals_at_least: int | None = None


def replay_screening(trials: list[Shadowed], startup: int, extra: float = 1.0) -> dict[int, str]:
    """The trials (by number, with the reason) the screening rule would have decided without
    generating, had none after the `startup` ones been audited. Replayed in the given order with
    what the rule would have known: a screened trial adds nothing to later caps or margins.
    `extra`: the margin's allowance above the errors' quantile (`screening_margin`).

    Measures, on a study whose every trial was generated, what screening would have cost: which
    trials of the true front it would have excluded (the proxies stored were fitted on every
    trial before, screened or not, so the replay is slightly optimistic about the proxy)."""
    finished: list[tuple[float, int]] = []  # (KL, refusals) of trials that would have finished
    errors: list[float] = []
    screened: dict[int, str] = {}
    for i, trial in enumerate(trials):
        if i >= startup:
            caps = [r for kl, r in finished if kl <= trial.kl]
            reason = screen_reason(trial.predicted, min(caps) if caps else None, screening_margin(errors, extra=extra))
            if reason is not None:
                screened[trial.number] = reason
                continue
        if trial.refusals is not None:
            finished.append((trial.kl, trial.refusals))
            errors.append(trial.predicted - trial.refusals)
        elif trial.refusals_at_least is not None:
            errors.append(trial.predicted - trial.refusals_at_least)
    return screened


def rank_correlation(predicted: list[float], counted: list[float]) -> float | None:
    """Spearman's rank correlation of the proxy with the generated counts (None below 3 pairs)."""
    if len(predicted) < 3:
        return None
    # Spearman's rho is Pearson's r of the ranks (ties share their mean rank); no scipy needed
    return float(pd.Series(predicted).rank().corr(pd.Series(counted).rank()))


def history_of(study) -> tuple[list[Observed], list[float]]:
    """What the study has scored (the unedited model, then every fully scored trial) and the
    proxy's errors so far (predicted - counted; for trials stopped once dominated, the count is a
    lower bound, so the error is an upper bound and the margin only grows from it)."""
    from .records import StudyRecord

    record = StudyRecord(study)
    history, errors = [], []
    base = record.base_first_look
    if base is not None:
        refused = set(record.base_refused_positions or ())
        history.append(Observed(base["tokens"], base.get("projections"),
                                [i in refused for i in range(len(base["tokens"]))]))  # fmt: skip
    for trial in record.trials():
        if trial.opening_tokens is None or trial.predicted_refusals is None or trial.screened:
            continue
        if trial.refusals is not None:  # fully scored: every verdict is known
            refused = set(trial.refused_positions)
            verdicts = [i in refused for i in range(len(trial.opening_tokens))]
            history.append(Observed(trial.opening_tokens, trial.probe_projections, verdicts))
            errors.append(trial.predicted_refusals - trial.refusals)
        elif trial.refusals_at_least is not None:
            errors.append(trial.predicted_refusals - trial.refusals_at_least)
    return history, errors


def calibrated_proxy(study, tokens: list[int], projections: list[float] | None) -> tuple[float, float | None]:
    """(predicted refusals of the current edit, screening margin) from what the study stored."""
    history, errors = history_of(study)
    return float(proxy_probabilities(history, tokens, projections).sum()), screening_margin(errors)
