"""The live view: `python -m heretic_like dashboard` serves optuna-dashboard on a real study, checked
in a real headless browser (Debian's chromium and chromedriver, which `.ci/run` installs)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from heretic_like.cli import main
from tests.conftest import study_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, server: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"dashboard exited: {server.stdout.read()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError("dashboard did not start listening")


@pytest.fixture(scope="module")
def finished_study(tiny_llama, tmp_path_factory) -> Path:
    """A 3-trial study on the tiny model, run by the main command with its export (which attaches
    the chosen trial's plots as artifacts)."""
    tmp = tmp_path_factory.mktemp("dashboard")
    config = study_config(tmp, tiny_llama, n_trials=3, export_trial='"best"', evaluate_capabilities="false",
                          verify_response_length=0, export_dir=f'"{tmp / "export"}"', plot_residuals="true",
                          residual_plot_path=f'"{tmp / "plots"}"', residual_plot_style='"dark_background"')  # fmt: skip
    assert main(["--config", str(config)]) == 0
    (journal,) = (tmp / "checkpoints").glob("*.journal")
    return journal


def test_the_chosen_trials_plots_are_attached_as_artifacts(finished_study):
    from optuna.artifacts import get_all_artifact_meta

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(finished_study)))
    study = optuna.load_study(study_name=None, storage=storage)
    assert study.metric_names == ["KL objective", "refusal objective"]
    names = sorted(m.filename for m in get_all_artifact_meta(study))
    assert len(names) == 2 and names[0].startswith("kernels_trial") and names[1] == "pareto.png"
    folder = finished_study.with_suffix(".artifacts")
    assert sum(1 for _ in folder.iterdir()) == 2  # the two PNGs, stored beside the journal


def test_plot_residuals_draws_them_once_per_study(finished_study):
    """Heretic's plot_residuals: the study wrote its residual plot where residual_plot_path says."""
    (plot,) = (finished_study.parent.parent / "plots").glob("*.residuals.png")
    assert plot.name == finished_study.stem + ".residuals.png" and plot.read_bytes()[:4] == b"\x89PNG"


def test_missing_dashboard_package_is_one_line(finished_study, tmp_path):
    """Without optuna-dashboard (an optional extra) the command says what to install."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "optuna_dashboard.py").write_text("raise ImportError('not installed')\n")
    done = subprocess.run([sys.executable, "-m", "heretic_like", "dashboard", "--study", str(finished_study)],
                          capture_output=True, text=True, env={"PYTHONPATH": str(blocker), "PATH": ""},
                          timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: the dashboard needs optuna-dashboard: pip install optuna-dashboard "
                                   "(or the extra: pip install 'heretic_like[dashboard]')")  # fmt: skip


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver; .ci/run installs them)")  # fmt: skip
def test_dashboard_shows_the_study_in_a_headless_browser(finished_study, tmp_path):
    pytest.importorskip("optuna_dashboard")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    command = [sys.executable, "-m", "heretic_like", "dashboard", "--study", str(finished_study), "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = None
    try:
        wait_for_port(port, server)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        study = optuna.load_study(study_name=None, storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(finished_study))))  # fmt: skip

        def body_has(*texts: str):
            return lambda d: all(t in d.find_element(By.TAG_NAME, "body").text for t in texts)

        driver.get(f"http://127.0.0.1:{port}/dashboard")
        WebDriverWait(driver, 60).until(body_has(study.study_name))
        driver.save_screenshot(str(tmp_path / "studies.png"))
        driver.get(f"http://127.0.0.1:{port}/dashboard/studies/{study._study_id}/trials")
        last = f"Trial {len(study.trials) - 1}"
        WebDriverWait(driver, 60).until(body_has(last, "refusals", "kl_divergence"))
        text = driver.find_element(By.TAG_NAME, "body").text
        assert sum(f"Trial {t.number}" in text for t in study.trials) == len(study.trials) == 3
        driver.save_screenshot(str(tmp_path / "trials.png"))
        assert (tmp_path / "trials.png").stat().st_size > 10_000
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)
