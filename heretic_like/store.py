"""The study store: the Optuna storage a study lives in (journal file or RDB), creating and
resuming a study with its identity checked, stale trials, and the files kept beside it. What a
study stores is read and written through `records`."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from .config import Settings, build_settings, default_data, merge_dicts, normal_identity
from .errors import HereticError
from .prompts import PromptSets
from .records import WORKER, StudyRecord, TrialRecord, worker_alive

HEARTBEAT_S = 20  # RDB storages: a trial whose worker sent no heartbeat for 3x this is failed


def is_shared_storage(url_or_path: str) -> bool:
    """An Optuna RDB URL (postgresql://, mysql://, sqlite://): several workers may share it."""
    return "://" in url_or_path


def open_storage(url_or_path: str) -> optuna.storages.BaseStorage:
    """A journal file (one worker at a time), or an RDB storage with heartbeats, so that trials of
    a worker that died are failed by the others instead of staying RUNNING for ever."""
    if is_shared_storage(url_or_path):
        try:
            with warnings.catch_warnings():  # Optuna still flags heartbeats "experimental"; stable in use
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url_or_path, engine_kwargs={"pool_pre_ping": True},
                    heartbeat_interval=HEARTBEAT_S, grace_period=3 * HEARTBEAT_S,
                )  # fmt: skip
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
                                 "row_normalization": "none", "biproject_direction": False,
                                 "filter_direction_prompts": False}


def _with_new_defaults(stored: dict | None) -> dict | None:
    """A stored identity with keys added by later versions filled in with their defaults (or the
    legacy value that matches the older behaviour): an older study ran with exactly those."""
    if stored is None:
        return None
    defaults = default_data()
    filled = {key: LEGACY_VALUES.get(key, defaults.get(key)) for key in Settings.STUDY_KEYS}
    return normal_identity(merge_dicts(filled, stored))


# The two values of every trial (search.objectives), as Optuna stores and the dashboard shows them.
OBJECTIVE_NAMES = ("KL objective", "refusal objective")


def open_study(settings: Settings) -> optuna.Study:
    """Create the study, or load it after checking it measures the same thing."""
    storage = open_storage(settings.resolved_storage())
    name = settings.resolved_study_name()
    seed = settings.seed
    if seed is not None and is_shared_storage(settings.resolved_storage()):
        seed += os.getpid()  # workers sharing a study must not all draw the same startup trials
    sampler = optuna.samplers.TPESampler(n_startup_trials=settings.n_startup_trials, multivariate=True,
                                         seed=seed)  # fmt: skip
    # Our CLI reports failures itself; Optuna would also log a traceback for an interrupted trial.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if name not in optuna.study.get_all_study_names(storage):  # (an existing study is only read)
        try:
            # Creating a study is the one atomic step storages offer (its name is unique): whoever
            # creates it stamps its identity; everyone else loads it and is checked against that.
            study = optuna.create_study(study_name=name, storage=storage, sampler=sampler,
                                        directions=["minimize", "minimize"])  # fmt: skip
            with warnings.catch_warnings():  # "experimental" since Optuna 3.2; stable in use
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(list(OBJECTIVE_NAMES))  # what optuna-dashboard labels the axes with
            StudyRecord(study).stamp(settings)
            return study
        except optuna.exceptions.DuplicatedStudyError:
            pass  # created an instant ago by another worker
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    record = StudyRecord(study)
    _await_stamp(record)
    stored = _with_new_defaults(record.identity)
    stamper = record.stamped_by
    gone = stamper is None or stamper == WORKER or worker_alive(stamper) is False
    if stored != settings.study_identity() and not study.trials and gone:
        # Nothing was measured yet and whoever stamped it is gone (e.g. the first run failed to
        # load its model): adopt the new settings. A live first worker, still measuring its
        # directions, keeps its study: a second one with other settings is refused below.
        record.stamp(settings)
        return study
    if stored is not None and stored != settings.study_identity():
        changed = ", ".join(_diff_keys(stored, settings.study_identity()))
        raise HereticError(
            f"study '{name}' in {settings.resolved_storage()} was run with different settings ({changed}); "
            "resume with the original settings or choose another study_name / study_checkpoint_dir"
        )
    return study


STAMP_WAIT_S = 30.0  # how long a joining worker waits for the creator's stamp


def _await_stamp(record: StudyRecord) -> None:
    """A study created an instant ago by another worker may not carry its stamp yet: wait for it
    (a creator that died before stamping leaves none; then the joiner adopts the study)."""
    deadline = time.monotonic() + STAMP_WAIT_S
    while record.identity is None and not record.study.trials and time.monotonic() < deadline:
        time.sleep(0.2)


def load_existing_study(storage: str, study_name: str | None) -> optuna.Study:
    """Open a study for export/reporting: `storage` is a journal file or an Optuna URL."""
    if "://" not in storage and not Path(storage).is_file():
        raise HereticError(f"study file not found: {storage}")
    backend = open_storage(storage)
    names = optuna.study.get_all_study_names(backend)
    if study_name is None:
        if len(names) != 1:
            raise HereticError(f"{storage} holds {len(names)} studies ({', '.join(names)}): pass --study-name")
        study_name = names[0]
    if study_name not in names:
        raise HereticError(f"no study '{study_name}' in {storage} (found: {', '.join(names) or 'none'})")
    return optuna.load_study(study_name=study_name, storage=backend)


def stored_settings(config: dict, origin: str, overrides: dict | None = None) -> Settings:
    """Settings saved by an earlier run (a study, a reproduce.json): keys added since then take
    the values that match what it ran with (LEGACY_VALUES, else today's defaults)."""
    data = merge_dicts(merge_dicts(default_data(), LEGACY_VALUES), config)
    return build_settings(merge_dicts(data, overrides or {}), origin)


def settings_of(study: optuna.Study, overrides: dict | None = None) -> Settings:
    return stored_settings(StudyRecord(study).config, f"study '{study.study_name}' config", overrides)


UNCLAIMED_S = 120  # a RUNNING trial that never said which process runs it is stale after this


def _abandoned(trial: TrialRecord) -> bool:
    """Left RUNNING by a process that is gone. A trial names its worker first thing (`host:pid`):
    on this host the process is checked; on another host it cannot be, so it is left alone."""
    if trial.worker is None:
        return trial.started is None or (datetime.now() - trial.started).total_seconds() > UNCLAIMED_S
    return worker_alive(trial.worker) is False


def fail_stale_trials(study: optuna.Study, shared: bool = False) -> int:
    """Trials left RUNNING by a killed process are marked FAIL. In an RDB study Optuna's heartbeat
    fails those whose worker went silent; in a journal file, those whose worker process is gone.
    A trial another live process is running is never failed."""
    if shared:
        before = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
        optuna.storages.fail_stale_trials(study)
        return len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))) - before
    return _fail_running(study, _abandoned)


def fail_own_running_trials(study: optuna.Study, shared: bool = False) -> int:
    """Trials this process left RUNNING are marked FAIL; returns how many. A Ctrl-C that lands
    while Optuna creates or closes a trial (outside the objective, which Optuna closes itself)
    leaves one running. In a journal file (one worker at a time) an unnamed running trial is this
    process's too; in a shared storage it may be another worker's newest, so it is left alone."""
    return _fail_running(study, lambda t: t.worker == WORKER or (t.worker is None and not shared))


def _fail_running(study: optuna.Study, which: Callable[[TrialRecord], bool]) -> int:
    """Mark the RUNNING trials `which` selects as FAIL; returns how many."""
    chosen = [t for t in StudyRecord(study).trials((TrialState.RUNNING,)) if which(t)]
    for trial in chosen:
        study._storage.set_trial_state_values(trial.trial._trial_id, TrialState.FAIL)
    return len(chosen)


def study_file(settings: Settings, suffix: str) -> Path:
    """A file kept beside the study: `<study_checkpoint_dir>/<study name><suffix>`."""
    return Path(settings.study_checkpoint_dir) / f"{settings.resolved_study_name()}{suffix}"


def directions_path(settings: Settings) -> Path:
    return study_file(settings, ".directions.pt")


def check_prompt_fingerprints(study: optuna.Study, prompts: PromptSets) -> dict[str, str | None]:
    """Refuse to resume when a prompt set's content changed since the study began (same config,
    but an edited file or a dataset that moved on); record the fingerprints on first use."""
    current = prompts.fingerprints()
    record = StudyRecord(study)
    stored = record.prompt_fingerprints
    if stored is None:
        record.prompt_fingerprints = current
        return current
    changed = [name for name in current if stored.get(name) != current[name]]
    if changed:
        raise HereticError(f"study '{study.study_name}': the content of {', '.join(changed)} changed since the study "
                           "began; restore the prompts or choose another study_name")  # fmt: skip
    return current
