"""Writing files that several workers of one study may write at the same moment."""

import threading

import pytest

from heretic_like.files import fill_directory_once, replace_directory, write_atomically


def _racing(place, content, path, writers=2):
    """`writers` threads each `place` their own `content` at `path`, all paused between their write
    and their move (the interleaving that broke a fixed temporary name); the errors they raised."""
    barrier, errors = threading.Barrier(writers), []

    def worker(n):
        def write(tmp):
            content(tmp, n)
            barrier.wait(timeout=10)

        try:
            place(path, write)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def _write_file(tmp, n):
    tmp.write_text(f"worker {n}\n")


def _fill_folder(tmp, n):
    (tmp / "weights").write_text(f"worker {n}\n")


def _new_folder(tmp, n):
    tmp.mkdir()  # as save_pretrained does
    _fill_folder(tmp, n)


def test_two_writers_at_once_both_succeed_and_one_whole_file_wins(tmp_path):
    path = tmp_path / "study.reproduce.json"
    assert _racing(write_atomically, _write_file, path) == []
    assert path.read_text() in {"worker 0\n", "worker 1\n"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.reproduce.json"]  # no temporary left


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "directions.pt"
    path.write_text("old\n")

    def broken(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, broken)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["directions.pt"]


def test_the_file_gets_the_permissions_of_a_plain_write(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    written = write_atomically(tmp_path / "sub" / "record.json", lambda tmp: tmp.write_text("{}"))
    assert written.stat().st_mode == plain.stat().st_mode  # readable by the study's other users


def test_two_fills_of_one_folder_at_once_keep_the_first_and_drop_the_other(tmp_path):
    path = tmp_path / "model-gguf-cache"
    assert _racing(fill_directory_once, _fill_folder, path) == []
    assert (path / "weights").read_text() in {"worker 0\n", "worker 1\n"}
    assert [p.name for p in tmp_path.iterdir()] == ["model-gguf-cache"]


def test_a_failed_fill_raises_and_leaves_no_folder(tmp_path):
    def broken(tmp):
        (tmp / "weights").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        fill_directory_once(tmp_path / "cache", broken)
    assert list(tmp_path.iterdir()) == []


def test_an_export_replaces_the_older_one_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / "exported"
    replace_directory(path, lambda tmp: _new_folder(tmp, 0))
    (path / "stale-shard").write_text("from an older export")
    replace_directory(path, lambda tmp: _new_folder(tmp, 1))
    assert sorted(p.name for p in path.iterdir()) == ["weights"] and (path / "weights").read_text() == "worker 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]


def test_a_failed_export_keeps_the_older_one(tmp_path):
    path = tmp_path / "exported"
    replace_directory(path, lambda tmp: _new_folder(tmp, 0))

    def broken(tmp):
        _new_folder(tmp, 1)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        replace_directory(path, broken)
    assert (path / "weights").read_text() == "worker 0\n"
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]


def test_two_exports_at_once_both_succeed_and_one_whole_folder_stays(tmp_path):
    path = tmp_path / "exported"
    replace_directory(path, lambda tmp: _new_folder(tmp, 9))  # an older export to move aside
    assert _racing(replace_directory, _new_folder, path) == []
    assert sorted(p.name for p in path.iterdir()) == ["weights"]
    assert (path / "weights").read_text() in {"worker 0\n", "worker 1\n"}
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]
