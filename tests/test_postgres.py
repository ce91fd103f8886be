"""Several workers on one study through PostgreSQL (a real server: .ci/run starts one and sets
HERETIC_TEST_POSTGRES; without it these tests are skipped)."""

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest

from tests.conftest import study_config

URL = os.environ.get("HERETIC_TEST_POSTGRES")
pytestmark = pytest.mark.skipif(not URL, reason="HERETIC_TEST_POSTGRES (a PostgreSQL URL) is not set")
ROOT = Path(__file__).resolve().parents[1]


def _worker(config: Path, name: str, trials: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "heretic_like", "--config", str(config), "--storage", URL,
               "--study-name", name, "--n-trials", str(trials)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "CI": "1"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def test_two_workers_share_one_study_without_duplicates(tiny_llama, tmp_path):
    # Slow trials (2 prompts per batch, every response generated) so that the workers overlap.
    config = study_config(tmp_path, tiny_llama, batch_size=3, prune_dominated="false", n_startup_trials=16)
    name = f"workers-{uuid.uuid4().hex[:8]}"
    first = _worker(config, name, 16, tmp_path / "a.log")
    storage = optuna.storages.RDBStorage(URL)
    deadline = time.time() + 120
    while time.time() < deadline:  # the second worker joins once the first is running trials
        if name in optuna.get_all_study_names(storage) and optuna.load_study(study_name=name, storage=storage).trials:
            break
        assert first.poll() is None, (tmp_path / "a.log").read_text()[-2000:]
        time.sleep(0.2)
    second = _worker(config, name, 16, tmp_path / "b.log")
    for proc, log in ((first, "a.log"), (second, "b.log")):
        assert proc.wait(timeout=300) == 0, (tmp_path / log).read_text()[-2000:]

    trials = optuna.load_study(study_name=name, storage=storage).trials
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert 16 <= len(finished) <= 17  # n_trials in all (a trial in flight when the other stops may add one)
    assert not [t for t in trials if t.state.name in ("RUNNING", "FAIL")]
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    workers = {t.user_attrs["worker"] for t in finished}
    assert len(workers) == 2  # both did trials
    params = [tuple(sorted(t.params.items())) for t in finished]
    assert len(set(params)) == len(params)  # no trial was sampled twice


def test_unreachable_server_is_one_line(tiny_llama, tmp_path, capsys):
    from heretic_like.cli import main

    config = study_config(tmp_path, tiny_llama)
    bad = URL.rsplit("/", 1)[0].replace(URL.split("@")[-1].split("/")[0], "127.0.0.1:9") + "/postgres"
    assert main(["--config", str(config), "--storage", bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot open storage 127.0.0.1:9/postgres") and len(err.strip().splitlines()) == 1
