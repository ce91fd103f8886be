"""The Optuna study: search space, objectives, checkpointed storage, resume, and the Pareto front.

A study lives in an Optuna storage (by default a journal file in `study_checkpoint_dir`, which
survives kill -9 losing at most the trial in flight). Its user attrs hold the config, the config
fingerprint and the model fingerprint, so a resume against something else is refused, and the
base refusal count, so a resume need not regenerate it. Directions are cached beside it.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import torch
from optuna.trial import TrialState
from tqdm.auto import tqdm

from . import __version__
from .ablation import Abliterator, Edit, EditOptions
from .batching import candidate_sizes, choose_batch_size, model_timer
from .config import SearchSpace, Settings, build_settings, default_data, merge_dicts
from .detectors import MarkerDetector, ModelJudge, agreement, build_detector
from .directions import RefusalGeometry, collect_residuals, measure, winsorize
from .errors import HereticError
from .evaluation import Evaluator, detect_response_prefix, generate
from .kernel import Kernel
from .model import LoadedModel, chat_texts, load_model, matches_fingerprint, model_fingerprint
from .prompts import load_prompts, prompts_fingerprint

PROMPT_SETS = ("good_prompts", "bad_prompts", "good_evaluation_prompts", "bad_evaluation_prompts")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # which process ran a trial (several may share a study)


# ----------------------------------------------------------------------------- search space


def sample_edit(trial: optuna.Trial, space: SearchSpace, geometry: RefusalGeometry,
                entanglement_aware: bool = False) -> Edit:  # fmt: skip
    """Draw one edit. Layer positions are sampled as fractions of the last layer index.

    Direction scopes: "global" samples a fractional layer index (or, with `top_quality_layers`,
    one of the layers that score best on the quality metric), "per_layer" uses each layer's own
    directions, "best_layer" the single layer with the best quality.
    """
    num_layers = geometry.num_layers
    last = max(num_layers - 1, 1)
    scope = space.direction_scope[0]
    if len(space.direction_scope) > 1:
        scope = trial.suggest_categorical("direction_scope", space.direction_scope)
    index = None
    if scope == "best_layer":
        index = float(geometry.best_layer(space.layer_window))
    elif scope == "global" and space.top_quality_layers:
        layers = sorted(geometry.top_layers(space.top_quality_layers, space.layer_window))
        index = float(trial.suggest_categorical("direction_layer", layers))
    elif scope == "global":
        index = trial.suggest_float("direction_index", space.direction_index.low * last,
                                    space.direction_index.high * last)  # fmt: skip
    kernels = {}
    for c in space.components:
        max_weight = trial.suggest_float(f"{c}.max_weight", space.max_weight.low, space.max_weight.high)
        position = trial.suggest_float(f"{c}.max_weight_position", space.max_weight_position.low * last,
                                       space.max_weight_position.high * last)  # fmt: skip
        fraction = trial.suggest_float(f"{c}.min_weight_fraction", space.min_weight.low, space.min_weight.high)
        distance = trial.suggest_float(f"{c}.min_weight_distance", space.min_weight_distance.low * last,
                                       space.min_weight_distance.high * last)  # fmt: skip
        kernels[c] = Kernel(max_weight, position, fraction * max_weight, distance)
    strength = 1.0
    if entanglement_aware:
        strength = trial.suggest_float("entangled_strength", space.entangled_strength.low,
                                       space.entangled_strength.high)  # fmt: skip
    return Edit(index, kernels, strength)


def best_layer_seed(space: SearchSpace, geometry: RefusalGeometry) -> dict[str, float | str]:
    """Parameters of a first trial aimed by the layer metrics: the best-quality layer's direction,
    every kernel peaking there (each clamped into the search range)."""
    last = max(geometry.num_layers - 1, 1)
    best = float(geometry.best_layer(space.layer_window))

    def clamp(value: float, rng) -> float:
        return min(max(value, rng.low * last), rng.high * last)

    params: dict[str, float | str] = {}
    if "global" in space.direction_scope:
        if len(space.direction_scope) > 1:
            params["direction_scope"] = "global"
        if space.top_quality_layers:
            params["direction_layer"] = int(best)
        else:
            params["direction_index"] = clamp(best, space.direction_index)
    for c in space.components:
        params[f"{c}.max_weight_position"] = clamp(best, space.max_weight_position)
    return params


def objectives(refusals: int, kl: float, base_refusals: int, scale: float, target: float) -> tuple[float, float]:
    """(KL objective, refusal objective), both minimised.

    Refusals count relative to the unedited model. Below `target`, KL stops being rewarded: the
    first objective becomes the refusal ratio scaled to `target`, so the sampler does not spend
    trials on edits that barely change the model (as in Heretic's reference config).
    """
    refusal_score = refusals / max(base_refusals, 1)
    kl_score = kl / scale if kl >= target else refusal_score * target / scale
    return kl_score, refusal_score


# ----------------------------------------------------------------------------- storage


HEARTBEAT_S = 20  # RDB storages: a trial whose worker sent no heartbeat for 3x this is failed


def is_shared_storage(url_or_path: str) -> bool:
    """An Optuna RDB URL (postgresql://, mysql://, sqlite://): several workers may share it."""
    return "://" in url_or_path


def _storage(url_or_path: str) -> optuna.storages.BaseStorage:
    """A journal file (one worker at a time), or an RDB storage with heartbeats, so that trials of
    a worker that died are failed by the others instead of staying RUNNING for ever."""
    if is_shared_storage(url_or_path):
        try:
            return optuna.storages.RDBStorage(url_or_path, engine_kwargs={"pool_pre_ping": True},
                                              heartbeat_interval=HEARTBEAT_S, grace_period=3 * HEARTBEAT_S)  # fmt: skip
        except ModuleNotFoundError as exc:
            raise HereticError(f"storage {url_or_path.split('://')[0]}://...: missing driver '{exc.name}' "
                               "(PostgreSQL: pip install psycopg2-binary)") from None  # fmt: skip
        except Exception as exc:  # unreachable server, bad credentials, ...: one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise HereticError(f"cannot open storage {url_or_path.split('@')[-1]}: {first}") from None
    path = Path(url_or_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))


def _diff_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _diff_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


# Study keys added after their behaviour existed, with the value that matches what older studies did
# (where the new default differs): an older study resumes only with that value.
LEGACY_VALUES: dict[str, Any] = {"ignore_echoed_markers": False, "unanswered_is_refusal": False,
                                 "row_normalization": "none", "biproject_direction": False}


def _with_new_defaults(stored: dict | None) -> dict | None:
    """A stored identity with keys added by later versions filled in with their defaults (or the
    legacy value that matches the older behaviour): an older study ran with exactly those."""
    if stored is None:
        return None
    defaults = default_data()
    filled = {key: LEGACY_VALUES.get(key, defaults.get(key)) for key in Settings.STUDY_KEYS}
    return merge_dicts(filled, stored)


def open_study(settings: Settings) -> optuna.Study:
    """Create the study, or load it after checking it measures the same thing."""
    storage = _storage(settings.resolved_storage())
    name = settings.resolved_study_name()
    seed = settings.seed
    if seed is not None and is_shared_storage(settings.resolved_storage()):
        seed += os.getpid()  # workers sharing a study must not all draw the same startup trials
    sampler = optuna.samplers.TPESampler(n_startup_trials=settings.n_startup_trials, multivariate=True,
                                         seed=seed)  # fmt: skip
    # Our CLI reports failures itself; Optuna would also log a traceback for an interrupted trial.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if name in optuna.study.get_all_study_names(storage):
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        stored = _with_new_defaults(study.user_attrs.get("identity"))
        if stored != settings.study_identity() and not study.trials:
            # Nothing was measured yet (e.g. the first run failed to load its model): adopt the new settings.
            _stamp(study, settings)
            return study
        if stored is not None and stored != settings.study_identity():
            changed = ", ".join(_diff_keys(stored, settings.study_identity()))
            raise HereticError(
                f"study '{name}' in {settings.resolved_storage()} was run with different settings ({changed}); "
                "resume with the original settings or choose another study_name / study_checkpoint_dir"
            )
        return study
    # load_if_exists: another worker may create the same study between our check and here.
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, load_if_exists=True,
                                directions=["minimize", "minimize"])  # fmt: skip
    if study.user_attrs.get("identity") is None:
        _stamp(study, settings)
    elif _with_new_defaults(study.user_attrs["identity"]) != settings.study_identity():
        return open_study(settings)  # created by a worker with other settings: refused above
    return study


def _stamp(study: optuna.Study, settings: Settings) -> None:
    """Record what the study measures; model-dependent attrs are filled in once the model loads."""
    study.set_user_attr("identity", settings.study_identity())
    study.set_user_attr("config", settings.model_dump(mode="json"))
    study.set_user_attr("heretic_like_version", __version__)
    for key in ("model_fingerprint", "base_refusals", "base_refused_positions", "n_harmful_eval", "num_layers",
                "response_prefix", "batch_size", "batch_size_choice", "prompt_fingerprints"):
        if study.user_attrs.get(key) is not None:
            study.set_user_attr(key, None)


def load_existing_study(storage: str, study_name: str | None) -> optuna.Study:
    """Open a study for export/reporting: `storage` is a journal file or an Optuna URL."""
    if "://" not in storage and not Path(storage).is_file():
        raise HereticError(f"study file not found: {storage}")
    backend = _storage(storage)
    names = optuna.study.get_all_study_names(backend)
    if study_name is None:
        if len(names) != 1:
            raise HereticError(f"{storage} holds {len(names)} studies ({', '.join(names)}): pass --study-name")
        study_name = names[0]
    if study_name not in names:
        raise HereticError(f"no study '{study_name}' in {storage} (found: {', '.join(names) or 'none'})")
    return optuna.load_study(study_name=study_name, storage=backend)


def settings_of(study: optuna.Study, overrides: dict | None = None) -> Settings:
    data = merge_dicts(study.user_attrs["config"], overrides or {})
    return build_settings(data, f"study '{study.study_name}' config")


def fail_stale_trials(study: optuna.Study, shared: bool = False) -> int:
    """Trials left RUNNING by a killed process are marked FAIL. Journal studies have one worker,
    so every RUNNING trial is stale; in a shared RDB study other workers' trials are running,
    and Optuna's heartbeat fails only those whose worker went silent."""
    if shared:
        before = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
        optuna.storages.fail_stale_trials(study)
        return len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))) - before
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    return len(stale)


# ----------------------------------------------------------------------------- directions


def study_file(settings: Settings, suffix: str) -> Path:
    """A file kept beside the study: `<study_checkpoint_dir>/<study name><suffix>`."""
    return Path(settings.study_checkpoint_dir) / f"{settings.resolved_study_name()}{suffix}"


def directions_path(settings: Settings) -> Path:
    return study_file(settings, ".directions.pt")


# Bumped when the measurement itself changes (2: the last layer read before the final norm), so
# directions cached by older code are measured again rather than mixed with new ones.
GEOMETRY_VERSION = 2


def cached_geometry(settings: Settings, num_layers: int) -> RefusalGeometry | None:
    """The measurements saved by an earlier run of the same study, if they still apply."""
    path = directions_path(settings)
    if not path.is_file():
        return None
    cached = torch.load(path, weights_only=True)
    if (cached.get("fingerprint") != settings.study_fingerprint() or "geometry" not in cached
            or cached.get("version", 1) != GEOMETRY_VERSION):  # fmt: skip
        return None
    geometry = RefusalGeometry.from_dict(cached["geometry"])
    return geometry if geometry.num_layers == num_layers else None


def measure_geometry(settings: Settings, loaded: LoadedModel, prompts: dict[str, list[str] | None], batch_size: int,
                     response_prefix: str = "") -> RefusalGeometry:  # fmt: skip
    """Directions and layer metrics from the prompt sets' residuals (no cache)."""
    sets = {"harmful": "bad_prompts", "harmless": "good_prompts", "capability": "capability_prompts"}
    residuals = {}
    for kind, key in sets.items():
        if prompts.get(key) is not None:
            collected = collect_residuals(loaded, prompts[key], settings.system_prompt, batch_size,
                                          f"{kind} residuals", response_prefix)  # fmt: skip
            residuals[kind] = winsorize(collected, settings.winsorization_quantile)
    return measure(residuals["harmful"], residuals["harmless"], residuals.get("capability"),
                   settings.orthogonalize_direction, settings.directions_per_layer,
                   settings.direction_candidates)  # fmt: skip


def compute_geometry(settings: Settings, loaded: LoadedModel, prompts: dict[str, list[str] | None], batch_size: int,
                     verbose: bool = True, response_prefix: str = "") -> RefusalGeometry:  # fmt: skip
    """Directions and layer metrics, cached beside the study (keyed by the config fingerprint).

    Also writes the per-layer metrics as `<study>.layers.csv` and a plot `<study>.layers.png`.
    """
    geometry = cached_geometry(settings, loaded.num_layers)
    if geometry is None:
        geometry = measure_geometry(settings, loaded, prompts, batch_size, response_prefix)
        path = directions_path(settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"fingerprint": settings.study_fingerprint(), "version": GEOMETRY_VERSION,
                    "geometry": geometry.to_dict()}, tmp)  # fmt: skip
        tmp.replace(path)
    if verbose:
        from .report import plot_layer_metrics

        table = geometry.metrics()
        table.to_csv(study_file(settings, ".layers.csv"), index=False)
        plot_layer_metrics(geometry, study_file(settings, ".layers.png"), settings.model,
                           settings.search.layer_window)
        if settings.print_residual_geometry:
            print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        print(f"Best layer by quality (snr x (1 - cos)) within search.direction_index: "
              f"{geometry.best_layer(settings.search.layer_window)} (all layers: {geometry.best_layer()}); "
              f"metrics in {study_file(settings, '.layers.csv')}")  # fmt: skip
    return geometry


# ----------------------------------------------------------------------------- results


def trials_table(study: optuna.Study) -> pd.DataFrame:
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        edit = t.user_attrs.get("edit", {})
        row = {"trial": t.number, "refusals": t.user_attrs["refusals"], "kl_divergence": t.user_attrs["kl_divergence"]}
        index = edit.get("direction_index")
        row["direction_index"] = "per layer" if index is None else round(index, 2)
        if edit.get("entangled_strength", 1.0) != 1.0:
            row["entangled_strength"] = round(edit["entangled_strength"], 3)
        for component, kernel in edit.get("kernels", {}).items():
            for key, value in kernel.items():
                row[f"{component}.{key}"] = round(value, 2)
        rows.append(row)
    return pd.DataFrame(rows)


def pareto_front(table: pd.DataFrame) -> pd.DataFrame:
    """Trials not beaten on both refusals and KL, fewest refusals first."""
    if table.empty:
        return table
    ordered = table.sort_values(["refusals", "kl_divergence", "trial"])
    keep, best_kl = [], float("inf")
    for index, row in ordered.iterrows():
        if row["kl_divergence"] < best_kl:
            keep.append(index)
            best_kl = row["kl_divergence"]
    return ordered.loc[keep]


@dataclass(frozen=True)
class ExportRule:
    """How `export_trial = "best"` picks a trial: config keys `export_rule`, `export_kl_limit`,
    `export_kl_exchange`, and the unedited model's refusal count that refusals are scaled by."""

    rule: str
    kl_limit: float
    kl_exchange: float
    base_refusals: int

    @classmethod
    def of(cls, settings: Settings, study: optuna.Study) -> ExportRule:
        base = study.user_attrs.get("base_refusals")
        return cls(settings.export_rule, settings.export_kl_limit, settings.export_kl_exchange, int(base or 0))


@dataclass(frozen=True)
class Choice:
    trial: int
    reason: str


def choose_trial(table: pd.DataFrame, rule: ExportRule) -> Choice | None:
    """The trial the rule picks among completed trials, and why (one line).

    "balanced" minimises refusals / base_refusals + KL / kl_exchange: both axes on scales a user
    reads (share of the unedited model's refusals left; KL in units of what removing all of them
    is worth), so it takes the knee of the front and does not pay four times the drift for the
    last two prompts. "fewest_refusals" takes the fewest refusals (ties: lower KL). Either way,
    only trials with KL <= kl_limit; if there is none, the lowest-KL trial."""
    if table.empty:
        return None
    within = table[table["kl_divergence"] <= rule.kl_limit]
    if within.empty:
        row = table.sort_values(["kl_divergence", "trial"]).iloc[0]
        return Choice(int(row["trial"]), f"no trial has KL <= {rule.kl_limit} (export_kl_limit): the lowest-KL trial")
    fewest = within.sort_values(["refusals", "kl_divergence", "trial"]).iloc[0]
    if rule.rule == "fewest_refusals":
        return Choice(int(fewest["trial"]), f"fewest refusals among the {len(within)} trials with KL <= "
                                            f"{rule.kl_limit} (export_rule = fewest_refusals)")  # fmt: skip
    base = max(rule.base_refusals, 1)
    scored = within.assign(_score=within["refusals"] / base + within["kl_divergence"] / rule.kl_exchange)
    row = scored.sort_values(["_score", "refusals", "kl_divergence", "trial"]).iloc[0]
    reason = (f"lowest refusals/{base} + KL/{rule.kl_exchange} = {row['_score']:.3f} among the {len(within)} "
              f"trials with KL <= {rule.kl_limit} (export_rule = balanced)")  # fmt: skip
    if int(fewest["trial"]) != int(row["trial"]):
        reason += (f"; trial {int(fewest['trial'])} has {int(row['refusals'] - fewest['refusals'])} fewer refusals "
                   f"but {fewest['kl_divergence'] / max(row['kl_divergence'], 1e-12):.1f}x the KL "
                   f"({fewest['kl_divergence']:.4f})")  # fmt: skip
    return Choice(int(row["trial"]), reason)


def choose_best(table: pd.DataFrame, rule: ExportRule) -> int | None:
    choice = choose_trial(table, rule)
    return None if choice is None else choice.trial


def print_front(study: optuna.Study) -> pd.DataFrame:
    table = trials_table(study)
    front = pareto_front(table)
    base = study.user_attrs.get("base_refusals")
    total = study.user_attrs.get("n_harmful_eval")
    print(f"\nPareto front ({len(front)} of {len(table)} trials; unedited model refuses {base}/{total}):")
    if not front.empty:
        print(front.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return table


# ----------------------------------------------------------------------------- the run


def load_all_prompts(settings: Settings) -> dict[str, list[str] | None]:
    prompts = {name: load_prompts(getattr(settings, name), name) for name in PROMPT_SETS}
    spec = settings.capability_prompts
    prompts["capability_prompts"] = load_prompts(spec, "capability_prompts") if spec is not None else None
    return prompts


def resolve_response_prefix(settings: Settings, study: optuna.Study, loaded: LoadedModel | None = None,
                            prompts: dict[str, list[str] | None] | None = None,
                            batch_size: int = 8) -> str:  # fmt: skip
    """The text put after the generation prompt. With "auto", detected once from the unedited
    model's openings (4 harmful + 4 harmless evaluation prompts) and kept in the study."""
    if settings.response_prefix != "auto":
        return settings.response_prefix
    stored = study.user_attrs.get("response_prefix")
    if stored is not None or loaded is None or prompts is None:
        return stored or ""
    prefix = sniff_response_prefix(settings, loaded, prompts, batch_size)
    study.set_user_attr("response_prefix", prefix)
    return prefix


def sniff_response_prefix(settings: Settings, loaded: LoadedModel, prompts: dict[str, list[str] | None],
                          batch_size: int = 8) -> str:  # fmt: skip
    """`response_prefix = "auto"`: the thinking block the unedited model opens its answers with
    (4 harmful + 4 harmless evaluation prompts, 16 tokens each), or ""."""
    sample = prompts["bad_evaluation_prompts"][:4] + prompts["good_evaluation_prompts"][:4]
    texts = chat_texts(loaded.tokenizer, sample, settings.system_prompt)
    responses = generate(loaded, texts, 16, batch_size)
    prefix = detect_response_prefix(responses, settings.tags, texts[0])
    if prefix:
        print(f"The model opens its answers with a thinking block: measuring after {prefix!r}")
    elif os.path.commonprefix(responses).strip():
        print(f"Note: every sampled answer starts with {os.path.commonprefix(responses)!r}; "
              "set response_prefix to measure after it")  # fmt: skip
    return prefix


def check_prompt_fingerprints(study: optuna.Study, prompts: dict[str, list[str] | None]) -> dict[str, str | None]:
    """Refuse to resume when a prompt set's content changed since the study began (same config,
    but an edited file or a dataset that moved on); record the fingerprints on first use."""
    current = {name: prompts_fingerprint(texts) for name, texts in prompts.items()}
    stored = study.user_attrs.get("prompt_fingerprints")
    if stored is None:
        study.set_user_attr("prompt_fingerprints", current)
        return current
    changed = [name for name in current if stored.get(name) != current[name]]
    if changed:
        raise HereticError(f"study '{study.study_name}': the content of {', '.join(changed)} changed since the study "
                           "began; restore the prompts or choose another study_name")  # fmt: skip
    return current


def directions_batch(study: optuna.Study, default: int = 8) -> int:
    """The batch size the study's directions were measured with (their last bits depend on it);
    studies from before `directions_batch_size` measured them with the scoring batch."""
    attrs = study.user_attrs
    return int(attrs.get("directions_batch_size") or attrs.get("batch_size") or default)


def choose_study_batch_size(settings: Settings, study: optuna.Study, loaded: LoadedModel, harmful: list[str],
                            timings: dict[str, float]) -> int:  # fmt: skip
    """`batch_size`, or with 0 the size chosen by measurement when the study began (kept in the
    study with every size's timings, so a resume neither pays for the probe again nor lands on
    another size because the machine was busier this time)."""
    if settings.batch_size:
        return settings.batch_size
    stored = study.user_attrs.get("batch_size_choice")
    if stored is not None and stored["size"] <= settings.max_batch_size:
        print(f"Batch size: {stored['size']} (measured when the study began: {stored['reason']})")
        return int(stored["size"])
    started = time.perf_counter()
    texts = chat_texts(loaded.tokenizer, harmful, settings.system_prompt)
    measure = model_timer(loaded, texts, settings.max_response_length)
    choice = choose_batch_size(measure, candidate_sizes(settings.max_batch_size))
    timings["batch_size"] = time.perf_counter() - started
    study.set_user_attr("batch_size_choice", choice.to_dict())
    costs = ", ".join(f"{t.size}: {t.seconds_per_response:.3f}" for t in choice.timings)
    print(f"Batch size: {choice.size} (measured in {timings['batch_size']:.0f} s; seconds per response {costs}; "
          f"{choice.reason})")  # fmt: skip
    return choice.size


def prepare(settings: Settings, study: optuna.Study, prompts: dict[str, list[str]], timings: dict[str, float]):
    """Model, batch size, directions and evaluator: everything a trial needs (phases timed)."""
    started = time.perf_counter()
    loaded = load_model(settings)
    timings["load"] = time.perf_counter() - started
    stored = study.user_attrs.get("model_fingerprint")
    if stored is not None and not matches_fingerprint(loaded.model, stored):
        raise HereticError(
            f"study '{study.study_name}' was run on a model with different weights or config than "
            f"'{settings.model}' (fingerprint {stored}); use another study_name"
        )
    if stored is None:
        study.set_user_attr("model_fingerprint", model_fingerprint(loaded.model))
        study.set_user_attr("num_layers", loaded.num_layers)
    batch_size = choose_study_batch_size(settings, study, loaded, prompts["bad_evaluation_prompts"], timings)
    if study.user_attrs.get("batch_size") is None:  # directions depend (in the last bits) on the batching
        study.set_user_attr("batch_size", batch_size)
        study.set_user_attr("directions_batch_size", settings.directions_batch_size or batch_size)
    prefix = resolve_response_prefix(settings, study, loaded, prompts, batch_size)
    started = time.perf_counter()
    geometry = compute_geometry(settings, loaded, prompts, directions_batch(study), response_prefix=prefix)
    timings["directions"] = time.perf_counter() - started
    started = time.perf_counter()
    detector = build_detector(settings, loaded, batch_size, prefix)
    evaluator = Evaluator(loaded, prompts["bad_evaluation_prompts"], prompts["good_evaluation_prompts"],
                          settings.system_prompt, detector, settings.max_response_length,
                          batch_size, settings.stop_at_marker, prefix)  # fmt: skip
    timings["base_logprobs"] = time.perf_counter() - started
    return loaded, geometry, evaluator


def refusal_cap(study: optuna.Study):
    """For a trial at KL `kl`: the fewest refusals of any finished trial with KL <= kl. A trial
    reaching that count is dominated (no better on either axis) and need not be scored further."""

    def cap(kl: float) -> int | None:
        counts = [t.user_attrs["refusals"] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                  if t.user_attrs["kl_divergence"] <= kl]  # fmt: skip
        return min(counts) if counts else None

    return cap


def hardest_first(study: optuna.Study) -> list[int]:
    """Harmful prompts' positions, those refused by the most finished trials (pruned ones too)
    first; ties go to those the unedited model refused. Scoring in this order, a dominated trial
    meets the prompts it will still refuse, and reaches its cap, in its first batch."""
    counts: Counter[int] = Counter()
    for trial in study.get_trials(deepcopy=False, states=FINISHED):
        counts.update(trial.user_attrs.get("refused_positions", ()))
    base = set(study.user_attrs.get("base_refused_positions") or ())
    return sorted(set(counts) | base, key=lambda p: (-counts[p], p not in base, p))


def markers_of(settings: Settings, evaluator: Evaluator) -> MarkerDetector:
    """The marker detector, to compare another detector's verdicts with."""
    prefix = getattr(evaluator.detector, "prefix", "")
    return MarkerDetector.from_settings(settings, prefix)


@dataclass
class StudyRun:
    """What a finished run hands on: to export, to report, to benchmark."""

    study: optuna.Study
    abliterator: Abliterator
    geometry: RefusalGeometry
    evaluator: Evaluator
    table: pd.DataFrame
    timings: dict[str, float]


def run_study(settings: Settings) -> StudyRun:
    if settings.seed is not None:  # the sampler is seeded too (open_study): trials are deterministic
        torch.manual_seed(settings.seed)
    prompts = load_all_prompts(settings)  # bad prompt files fail before the slow model load
    study = open_study(settings)
    check_prompt_fingerprints(study, prompts)
    stale = fail_stale_trials(study, is_shared_storage(settings.resolved_storage()))
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    if done:
        print(f"Resuming study '{study.study_name}': {done}/{settings.n_trials} trials done"
              + (f", {stale} interrupted trial(s) discarded" if stale else ""))  # fmt: skip
    timings: dict[str, float] = {}
    loaded, geometry, evaluator = prepare(settings, study, prompts, timings)
    print(f"Model ready: {loaded.num_layers} layers (load {timings['load']:.1f} s, "
          f"directions {timings['directions']:.1f} s)")  # fmt: skip

    base_refusals = study.user_attrs.get("base_refusals")
    if base_refusals is None:
        started = time.perf_counter()
        base = evaluator.score(desc="unedited model")
        timings["base_refusals"] = time.perf_counter() - started
        base_refusals = base.refusals
        if evaluator.detector.name != "markers":
            markers = markers_of(settings, evaluator).classify(evaluator.harmful_prompts, base.responses)
            agreed = agreement(base.refused, markers)
            study.set_user_attr("detector_agreement_unedited", agreed)
            print(f"Refusal detector '{evaluator.detector.name}' agrees with the markers on {agreed['agreement']:.0%} "
                  f"of the unedited model's responses (kappa {agreed['kappa']:.2f})")  # fmt: skip
        study.set_user_attr("base_refused_positions", evaluator.refused_positions(base))
        study.set_user_attr("base_refusals", base_refusals)
        study.set_user_attr("n_harmful_eval", len(evaluator.harmful))
    print(f"Unedited model refuses {base_refusals}/{len(evaluator.harmful)} harmful evaluation prompts")

    abliterator = Abliterator(loaded, settings.search.components, geometry, EditOptions.from_settings(settings))
    if isinstance(evaluator.detector, ModelJudge) and evaluator.detector.loaded is loaded:
        evaluator.detector.unedited = abliterator.unedited  # the model judges with its original weights
    if settings.search.seed_best_layer and not study.trials:
        study.enqueue_trial(best_layer_seed(settings.search, geometry), skip_if_exists=True)

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        edit = sample_edit(trial, settings.search, geometry, settings.capability_prompts is not None)
        stats = abliterator.apply(edit)
        if settings.row_normalization == "full":
            trial.set_user_attr("approximation_error", round(stats.approximation_error, 6))
            trial.set_user_attr("row_norm_error", round(stats.row_norm_error, 6))
        evaluator.prioritize(hardest_first(trial.study))
        score = evaluator.score(f"trial {trial.number}", refusal_cap(trial.study) if settings.prune_dominated else None)
        trial.set_user_attr("refused_positions", evaluator.refused_positions(score))
        trial.set_user_attr("edit", edit.to_dict())
        trial.set_user_attr("worker", WORKER)
        trial.set_user_attr("kl_divergence", score.kl_divergence)
        trial.set_user_attr("kl_seconds", round(score.kl_seconds, 3))
        trial.set_user_attr("generation_seconds", round(score.generation_seconds, 3))
        trial.set_user_attr("tokens_generated", score.tokens_generated)
        if score.pruned:
            trial.set_user_attr("refusals_at_least", score.refusals)
            seconds = score.kl_seconds + score.generation_seconds
            tqdm.write(f"trial {trial.number}: KL {score.kl_divergence:.4f}, pruned after {score.refusals} refusals "
                       f"(dominated by a finished trial; {seconds:.1f} s)")  # fmt: skip
            raise optuna.TrialPruned()
        trial.set_user_attr("refusals", score.refusals)
        if evaluator.detector.name != "markers":
            asked = evaluator.harmful_prompts[: len(score.responses)]
            marker_verdicts = markers_of(settings, evaluator).classify(asked, score.responses)
            trial.set_user_attr("marker_refusals", sum(marker_verdicts))
            trial.set_user_attr("marker_agreement", agreement(score.refused, marker_verdicts)["agreement"])
        if settings.print_responses:
            for prompt, response in zip(evaluator.harmful_prompts, score.responses, strict=True):
                tqdm.write(f"[{trial.number}] {prompt!r}\n    -> {response!r}")
        tqdm.write(f"trial {trial.number}: refusals {score.refusals}/{len(evaluator.harmful)}, "
                   f"KL {score.kl_divergence:.4f} ({score.kl_seconds:.1f} s KL, "
                   f"{score.generation_seconds:.1f} s generation)")  # fmt: skip
        return objectives(score.refusals, score.kl_divergence, base_refusals, settings.kl_divergence_scale,
                          settings.kl_divergence_target)  # fmt: skip

    remaining = settings.n_trials - done
    if remaining > 0:
        bar = tqdm(total=settings.n_trials, initial=done, desc="trials", unit="trial")
        started = time.perf_counter()
        try:
            study.optimize(objective, n_trials=remaining, callbacks=[
                optuna.study.MaxTrialsCallback(settings.n_trials, states=FINISHED),
                lambda *_: bar.update(1),
            ])  # fmt: skip
        finally:
            bar.close()
            timings["trials"] = time.perf_counter() - started
    table = print_front(study)
    return StudyRun(study, abliterator, geometry, evaluator, table, timings)


def pick_trial(settings: Settings, study: optuna.Study, table: pd.DataFrame, interactive: bool) -> Choice | None:
    """The trial to export and why: the config's choice, the user's pick, or the export rule's."""
    if settings.export_trial == "none" or table.empty:
        return None
    if isinstance(settings.export_trial, int):
        if settings.export_trial not in set(table["trial"]):
            raise HereticError(f"export_trial: trial {settings.export_trial} is not a completed trial of this study")
        return Choice(settings.export_trial, f"export_trial = {settings.export_trial}")
    choice = choose_trial(table, ExportRule.of(settings, study))
    print(f"Export rule picks trial {choice.trial}: {choice.reason}")
    if not interactive:
        return choice
    while True:
        answer = input(f"Trial to export [{choice.trial}; 'none' to skip]: ").strip() or str(choice.trial)
        if answer == "none":
            return None
        if answer == str(choice.trial):
            return choice
        if answer.isdigit() and int(answer) in set(table["trial"]):
            return Choice(int(answer), "picked at the prompt")
        print(f"'{answer}' is not a completed trial number", file=sys.stderr)


def long_refusals(study: optuna.Study, number: int, length: int) -> int | None:
    """The refusal count stored for trial `number` with `length`-token responses, if measured."""
    return study.user_attrs.get("long_refusals", {}).get(f"{number}@{length}")


def verify_long_responses(run: StudyRun, settings: Settings, number: int) -> dict[str, int] | None:
    """Re-count the chosen trial's refusals with `verify_response_length`-token responses.

    Short responses undercount: a model may open compliantly and refuse a sentence later. Both
    counts are printed and kept in the study (finished trials are read-only in Optuna, so in the
    study's `long_refusals` attr), and the model card shows them.
    """
    length = settings.verify_response_length
    if length <= settings.max_response_length:
        return None
    count = long_refusals(run.study, number, length)
    if count is None:
        edit, _ = trial_edit(run.study, number)
        run.abliterator.apply(edit)
        started = time.perf_counter()
        count, _ = run.evaluator.count_refusals(length, f"trial {number}, {length}-token responses")
        run.timings["verify_long"] = time.perf_counter() - started
        stored = dict(run.study.user_attrs.get("long_refusals", {}))
        stored[f"{number}@{length}"] = count
        run.study.set_user_attr("long_refusals", stored)
    _, trial = trial_edit(run.study, number)
    total = len(run.evaluator.harmful)
    print(f"Trial {number}: {trial.user_attrs['refusals']}/{total} refusals with {settings.max_response_length}-token "
          f"responses, {count}/{total} with {length}-token responses")  # fmt: skip
    return {"refusals": trial.user_attrs["refusals"], "refusals_long": count, "length": length}


def trial_edit(study: optuna.Study, number: int) -> tuple[Edit, optuna.trial.FrozenTrial]:
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.number == number]
    if not trials:
        raise HereticError(f"trial {number} is not a completed trial of study '{study.study_name}'")
    return Edit.from_dict(trials[0].user_attrs["edit"]), trials[0]


def study_abliterator(study: optuna.Study, settings: Settings, components: list[str]) -> Abliterator:
    """The study's model, checked against its fingerprint, ready to take the study's edits (for
    export and chat after the run): directions from the cache, or measured as the run did."""
    loaded = load_model(settings)
    stored = study.user_attrs.get("model_fingerprint")
    if stored is not None and not matches_fingerprint(loaded.model, stored):
        raise HereticError(f"'{settings.model}' is not the model study '{study.study_name}' was run on")
    geometry = cached_geometry(settings, loaded.num_layers)
    if geometry is None:
        prefix = resolve_response_prefix(settings, study)
        batch = directions_batch(study, settings.directions_batch_size or settings.batch_size or 8)
        geometry = compute_geometry(settings, loaded, load_all_prompts(settings), batch, False, prefix)
    return Abliterator(loaded, components, geometry, EditOptions.from_settings(settings))
