"""Typed records of what a study stores beside its trials.

Optuna keeps free-form "user attributes" on a study and on each trial. They are spelled here
and nowhere else: `StudyRecord` and `TrialRecord` give each stored value a property, so the
rest of the package reads `record.base_refusals`, not `study.user_attrs["base_refusals"]`.
The stored names are the ones earlier versions wrote, so older studies read the same.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import optuna
from optuna.trial import TrialState

from . import __version__
from .ablation import Edit
from .config import Settings
from .errors import HereticError

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # which process ran a trial (several may share a study)


def worker_alive(worker: str | None) -> bool | None:
    """Whether the process named `host:pid` still runs: known on this host, None on another."""
    host, _, pid = (worker or "").rpartition(":")
    if host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class StudyRecord:
    """What a study stores beside its trials, one typed property per value."""

    def __init__(self, study: optuna.Study):
        self.study = study

    def _get(self, key: str, default: Any = None) -> Any:
        return self.study.user_attrs.get(key, default)

    def _set(self, key: str, value: Any) -> None:
        self.study.set_user_attr(key, value)

    # --- identity: what the study measures (written once, checked on every resume)
    @property
    def identity(self) -> dict | None:
        return self._get("identity")

    @property
    def config(self) -> dict:
        return self._get("config")

    @property
    def stamped_by(self) -> str | None:
        """The process (`host:pid`) that stamped the identity; None for studies before it was kept."""
        return self._get("stamped_by")

    def stamp(self, settings: Settings) -> None:
        """Record what the study measures; model-dependent values are filled in once the model loads."""
        self._set("identity", settings.study_identity())
        self._set("config", settings.model_dump(mode="json"))
        self._set("stamped_by", WORKER)
        self._set("heretic_like_version", __version__)
        for key in ("model_fingerprint", "base_refusals", "base_refused_positions", "n_harmful_eval", "num_layers",
                    "response_prefix", "batch_size", "batch_size_choice", "prompt_fingerprints"):  # fmt: skip
            if self._get(key) is not None:
                self._set(key, None)

    # --- the model and the prompts it was measured on
    @property
    def model_fingerprint(self) -> str | None:
        return self._get("model_fingerprint")

    @property
    def num_layers(self) -> int | None:
        return self._get("num_layers")

    def record_model(self, fingerprint: str, num_layers: int) -> None:
        self._set("model_fingerprint", fingerprint)
        self._set("num_layers", num_layers)

    @property
    def prompt_fingerprints(self) -> dict[str, str | None] | None:
        return self._get("prompt_fingerprints")

    @prompt_fingerprints.setter
    def prompt_fingerprints(self, value: dict[str, str | None]) -> None:
        self._set("prompt_fingerprints", value)

    @property
    def response_prefix(self) -> str | None:
        """The detected response prefix (`response_prefix = "auto"`), "" for none, None before detection."""
        return self._get("response_prefix")

    @response_prefix.setter
    def response_prefix(self, value: str) -> None:
        self._set("response_prefix", value)

    # --- batching: the scoring batch, the batch the directions were measured with, the probe
    @property
    def batch_size(self) -> int | None:
        return self._get("batch_size")

    def directions_batch(self, default: int = 8) -> int:
        """The batch the directions were measured with (their last bits depend on it); studies from
        before `directions_batch_size` measured them with the scoring batch."""
        return int(self._get("directions_batch_size") or self._get("batch_size") or default)

    def record_batches(self, scoring: int, directions: int) -> None:
        self._set("batch_size", scoring)
        self._set("directions_batch_size", directions)

    @property
    def batch_size_choice(self) -> dict | None:
        """The automatic choice: {"size", "reason", "timings": [per size]}."""
        return self._get("batch_size_choice")

    @batch_size_choice.setter
    def batch_size_choice(self, value: dict) -> None:
        self._set("batch_size_choice", value)

    # --- the unedited model
    @property
    def base_refusals(self) -> int | None:
        return self._get("base_refusals")

    @property
    def base_refused_positions(self) -> list[int]:
        return list(self._get("base_refused_positions") or ())

    @property
    def n_harmful_eval(self) -> int | None:
        return self._get("n_harmful_eval")

    def record_base(self, refusals: int, positions: list[int], n_harmful: int) -> None:
        self._set("base_refused_positions", positions)
        self._set("base_refusals", refusals)
        self._set("n_harmful_eval", n_harmful)

    @property
    def detector_agreement_unedited(self) -> dict | None:
        return self._get("detector_agreement_unedited")

    @detector_agreement_unedited.setter
    def detector_agreement_unedited(self, value: dict) -> None:
        self._set("detector_agreement_unedited", value)

    # --- after the study: long recounts, capability checks, the last run's phase times
    def long_refusals(self, number: int, length: int) -> int | None:
        """The refusal count stored for trial `number` with `length`-token responses, if measured
        (finished trials are read-only in Optuna, so these live on the study)."""
        return self._get("long_refusals", {}).get(f"{number}@{length}")

    def set_long_refusals(self, number: int, length: int, count: int) -> None:
        self._set("long_refusals", {**self._get("long_refusals", {}), f"{number}@{length}": count})

    def exported_kl(self, number: int) -> float | None:
        """First-token KL of trial `number`'s exported weights, where they are not what its trials
        scored (row_normalization "full": trials carry a low-rank approximation, export is exact)."""
        return self._get("exported_kl", {}).get(str(number))

    def set_exported_kl(self, number: int, kl: float) -> None:
        self._set("exported_kl", {**self._get("exported_kl", {}), str(number): kl})

    def front_recount(self, number: int, length: int | None = None) -> int | None:
        """Trial `number`'s refusals counted again with long responses once it was on the final
        Pareto front (`study.recount_front`); `length`: the length asked for (default: the one
        the study recounts its front with)."""
        length = length if length is not None else self._get("front_response_length")
        return None if length is None else self.long_refusals(number, length)

    def set_front_recount(self, number: int, length: int, count: int) -> None:
        self._set("front_response_length", length)
        self.set_long_refusals(number, length, count)

    @property
    def base_first_look(self) -> dict[str, list] | None:
        """The unedited model's first look per harmful prompt (original positions): `tokens`, the
        first response token; `projections`, on the probe direction (screening.py)."""
        return self._get("base_first_look")

    @base_first_look.setter
    def base_first_look(self, value: dict[str, list]) -> None:
        self._set("base_first_look", value)

    @property
    def capability(self) -> dict[str, dict[str, float]]:
        """Capability metrics by "base" or a trial number (as text)."""
        return dict(self._get("capability", {}))

    @capability.setter
    def capability(self, value: dict[str, dict[str, float]]) -> None:
        self._set("capability", value)

    @property
    def run_timings(self) -> dict[str, float]:
        return dict(self._get("run_timings", {}))

    @run_timings.setter
    def run_timings(self, value: dict[str, float]) -> None:
        self._set("run_timings", value)

    # --- trials
    def trials(self, states=FINISHED) -> list[TrialRecord]:
        return [TrialRecord(t) for t in self.study.get_trials(deepcopy=False, states=states)]

    def completed(self) -> list[TrialRecord]:
        return self.trials((TrialState.COMPLETE,))

    def trial(self, number: int) -> TrialRecord:
        """A completed trial by number."""
        for trial in self.completed():
            if trial.number == number:
                return trial
        raise HereticError(f"trial {number} is not a completed trial of study '{self.study.study_name}'")


class TrialRecord:
    """What a trial stores beside Optuna's own fields, one typed property per value. Wraps a live
    `optuna.Trial` (while it runs: the `record_*` methods) or a finished `FrozenTrial`."""

    def __init__(self, trial: optuna.Trial | optuna.trial.FrozenTrial):
        self.trial = trial

    def _get(self, key: str, default: Any = None) -> Any:
        attrs = self.trial.user_attrs
        return attrs.get(key, default)

    @property
    def number(self) -> int:
        return self.trial.number

    @property
    def state(self) -> TrialState | None:
        return getattr(self.trial, "state", None)

    @property
    def params(self) -> dict[str, Any]:
        return self.trial.params

    @property
    def edit(self) -> Edit:
        return Edit.from_dict(self._get("edit"))

    @property
    def edit_dict(self) -> dict:
        return self._get("edit", {})

    @property
    def refusals(self) -> int | None:
        """Refusals of a completed trial (None for a pruned one: see `refusals_at_least`)."""
        return self._get("refusals")

    @property
    def refusals_at_least(self) -> int | None:
        return self._get("refusals_at_least")

    @property
    def kl_divergence(self) -> float | None:
        return self._get("kl_divergence")

    @property
    def refused_positions(self) -> list[int]:
        return list(self._get("refused_positions", ()))

    @property
    def worker(self) -> str | None:
        return self._get("worker")

    def attr(self, key: str) -> Any:
        """A stored value by its name, for tables that list them all (`report`)."""
        return self._get(key)

    def record_worker(self) -> None:
        """Say which process runs the trial, first thing: others sharing the study must not take
        it for a trial left RUNNING by a dead process."""
        self.trial.set_user_attr("worker", WORKER)

    @property
    def started(self):
        return self.trial.datetime_start

    def record_edit(self, edit: Edit, approximation: tuple[float, float] | None) -> None:
        self.trial.set_user_attr("edit", edit.to_dict())
        if approximation is not None:
            self.trial.set_user_attr("approximation_error", round(approximation[0], 6))
            self.trial.set_user_attr("row_norm_error", round(approximation[1], 6))

    def record_score(self, kl: float, kl_seconds: float, generation_seconds: float, tokens: int,
                     refused_positions: list[int]) -> None:  # fmt: skip
        self.trial.set_user_attr("refused_positions", refused_positions)
        self.trial.set_user_attr("kl_divergence", kl)
        self.trial.set_user_attr("kl_seconds", round(kl_seconds, 3))
        self.trial.set_user_attr("generation_seconds", round(generation_seconds, 3))
        self.trial.set_user_attr("tokens_generated", tokens)

    def record_refusals(self, refusals: int, pruned: bool) -> None:
        self.trial.set_user_attr("refusals_at_least" if pruned else "refusals", refusals)

    def record_marker_agreement(self, marker_refusals: int, agreement: float) -> None:
        self.trial.set_user_attr("marker_refusals", marker_refusals)
        self.trial.set_user_attr("marker_agreement", agreement)

    # --- multi-fidelity: the first look (screening.py) and the long count on the front
    @property
    def opening_tokens(self) -> list[int] | None:
        """The first response token of every harmful prompt (by original position), as the
        proxy pass saw it: greedy decoding opens each response with exactly that token."""
        return self._get("opening_tokens")

    @property
    def probe_projections(self) -> list[float] | None:
        """Each harmful prompt's residual projected on the refusal direction, as the proxy pass saw it."""
        return self._get("probe_projections")

    @property
    def predicted_refusals(self) -> float | None:
        return self._get("predicted_refusals")

    @property
    def refusal_margin(self) -> float | None:
        """The mean probability that a harmful answer opens as the unedited model's refusals did
        (margin.py), measured when `refusal_margin_weight` > 0."""
        return self._get("refusal_margin")

    def record_margin(self, margin: float) -> None:
        self.trial.set_user_attr("refusal_margin", round(margin, 6))

    @property
    def screened(self) -> str | None:
        """Why the trial was decided without generating, or None if it was not."""
        return self._get("screened")

    @property
    def refusals_long(self) -> int | None:
        """Refusals with longer responses (`long_length` tokens), counted when the trial entered the front."""
        return self._get("refusals_long")

    @property
    def long_length(self) -> int | None:
        return self._get("long_length")

    def record_first_look(self, opening_tokens: list[int], projections: list[float] | None,
                          predicted: float | None) -> None:  # fmt: skip
        self.trial.set_user_attr("opening_tokens", opening_tokens)
        if projections is not None:
            self.trial.set_user_attr("probe_projections", [round(v, 4) for v in projections])
        if predicted is not None:
            self.trial.set_user_attr("predicted_refusals", round(predicted, 3))

    def record_screened(self, reason: str) -> None:
        self.trial.set_user_attr("screened", reason)

    @property
    def pruned_reason(self) -> str | None:
        """Why generation stopped early (dominated), for whoever reads the trial (the dashboard)."""
        return self._get("pruned_reason")

    def record_pruned(self, reason: str) -> None:
        self.trial.set_user_attr("pruned_reason", reason)

    def record_long(self, refusals: int, length: int, seconds: float) -> None:
        self.trial.set_user_attr("refusals_long", refusals)
        self.trial.set_user_attr("long_length", length)
        self.trial.set_user_attr("long_seconds", round(seconds, 3))


# Values every trial table lists, by their stored names.
TRIAL_VALUES = ("refusals", "refusals_at_least", "refusals_long", "kl_divergence", "refusal_margin",
                "predicted_refusals", "screened",
                "pruned_reason",
                "kl_seconds", "generation_seconds", "long_seconds", "tokens_generated", "approximation_error",
                "row_norm_error", "marker_refusals", "marker_agreement", "worker")  # fmt: skip


def response_prefix_of(settings: Settings, study: optuna.Study) -> str:
    """The text put after the generation prompt: the config's, or with "auto" the one the study
    detected from the unedited model ("" before detection)."""
    if settings.response_prefix != "auto":
        return settings.response_prefix
    return StudyRecord(study).response_prefix or ""


def trial_edit(study: optuna.Study, number: int) -> tuple[Edit, TrialRecord]:
    """A completed trial's edit and record."""
    trial = StudyRecord(study).trial(number)
    return trial.edit, trial
