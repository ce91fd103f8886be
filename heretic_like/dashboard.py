"""The live view: optuna-dashboard serving a study's storage, with the chosen trial's plots
attached as Optuna artifacts so they show beside its numbers.

optuna-dashboard is an optional extra (`pip install "heretic_like[dashboard]"`); everything it
shows comes from the storage the study writes anyway, so a running study is watched live.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import optuna

from .errors import HereticError
from .store import open_storage


def artifacts_dir(storage: str, checkpoint_dir: str | Path, study_name: str) -> Path:
    """Where a study's artifacts live: beside its journal file (`NAME.journal` -> `NAME.artifacts`),
    or, for a database storage, in the checkpoint folder."""
    if "://" not in storage:
        return Path(storage).with_suffix(".artifacts")
    return Path(checkpoint_dir) / f"{study_name}.artifacts"


def attach_plots(study: optuna.Study, storage: str, checkpoint_dir: str | Path, trial: int) -> list[str]:
    """Upload the trade-off plot and `trial`'s kernel plot as artifacts of the study (a finished
    trial takes no new attributes, so the kernel plot is named after it); returns their ids.
    Called once the study has chosen its trial."""
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    from .records import StudyRecord, trial_edit
    from .report import plot_kernels, plot_pareto

    folder = artifacts_dir(storage, checkpoint_dir, study.study_name)
    folder.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(folder))
    edit, _ = trial_edit(study, trial)
    ids = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        pareto, kernels = Path(tmp) / "pareto.png", Path(tmp) / f"kernels_trial{trial}.png"
        plot_pareto(study, trial, pareto)
        plot_kernels(edit, int(StudyRecord(study).num_layers), trial, kernels)
        ids.append(upload_artifact(artifact_store=store, file_path=str(pareto), study_or_trial=study))
        ids.append(upload_artifact(artifact_store=store, file_path=str(kernels), study_or_trial=study))
    return ids


def serve(storage: str, host: str = "127.0.0.1", port: int = 8080, artifacts: Path | None = None) -> None:
    """Serve optuna-dashboard on `storage` (a journal file or an Optuna URL) until interrupted."""
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise HereticError("the dashboard needs optuna-dashboard: pip install optuna-dashboard "
                           "(or the extra: pip install 'heretic_like[dashboard]')") from None  # fmt: skip
    if "://" not in storage and not Path(storage).is_file():
        raise HereticError(f"study file not found: {storage}")
    backend = open_storage(storage)
    store = None
    if artifacts is not None and artifacts.is_dir():
        from optuna.artifacts import FileSystemArtifactStore

        store = FileSystemArtifactStore(str(artifacts))
    print(f"optuna-dashboard on {storage}: http://{host}:{port}/dashboard (Ctrl-C stops it)", flush=True)
    run_server(backend, host=host, port=port, artifact_store=store)
