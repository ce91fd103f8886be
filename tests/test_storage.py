"""Opening a study's storage: a shared (RDB) one fails dead workers' trials by heartbeat, quietly."""

import warnings

import optuna

from heretic_like.store import HEARTBEAT_S, open_storage


def test_a_shared_storage_has_heartbeats_and_opens_without_an_experimental_warning(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")  # any SQLAlchemy URL takes this path
    assert isinstance(storage, optuna.storages.RDBStorage)
    assert storage.get_heartbeat_interval() == HEARTBEAT_S
    # every worker would otherwise print Optuna's "experimental" notice on every start
    assert not [w for w in caught if issubclass(w.category, optuna.exceptions.ExperimentalWarning)]
