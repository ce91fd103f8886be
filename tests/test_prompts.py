import json

import pandas as pd
import pytest

from heretic_like.config import PromptSpec
from heretic_like.errors import HereticError
from heretic_like.prompts import load_prompts

PROMPTS = ["first prompt", "second prompt", "third prompt"]


def test_builtin_sets_are_large_and_held_out_splits_disjoint():
    harmful = load_prompts(PromptSpec(dataset="builtin:harmful"), "x")
    harmless = load_prompts(PromptSpec(dataset="builtin:harmless"), "x")
    assert len(harmful) >= 200 and len(harmless) >= 200
    assert len(set(harmful)) == len(harmful) and len(set(harmless)) == len(harmless)
    train = load_prompts(PromptSpec(dataset="builtin:harmful", split="train[:150]"), "x")
    held_out = load_prompts(PromptSpec(dataset="builtin:harmful", split="train[150:]"), "x")
    assert len(train) == 150 and len(held_out) >= 50 and not set(train) & set(held_out)


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".json", ".jsonl", ".parquet"])
def test_every_local_file_kind(tmp_path, suffix):
    path = tmp_path / f"prompts{suffix}"
    frame = pd.DataFrame({"prompt": PROMPTS, "other": [1, 2, 3]})
    if suffix == ".txt":
        path.write_text("\n".join(PROMPTS) + "\n\n")
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".json":
        path.write_text(json.dumps(frame.to_dict(orient="records")))
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    assert load_prompts(PromptSpec(dataset=str(path), column="prompt"), "bad_prompts") == PROMPTS
    assert load_prompts(PromptSpec(dataset=str(path), column="prompt", split="train[1:]"), "x") == PROMPTS[1:]


def test_dataset_directory_loads_like_a_hub_repo(tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    pd.DataFrame({"text": PROMPTS}).to_csv(folder / "train.csv", index=False)
    pd.DataFrame({"text": ["held out"]}).to_csv(folder / "test.csv", index=False)
    assert load_prompts(PromptSpec(dataset=str(folder)), "x") == PROMPTS
    assert load_prompts(PromptSpec(dataset=str(folder), split="test"), "x") == ["held out"]


def test_errors_name_the_set_and_culprit(tmp_path):
    csv = tmp_path / "p.csv"
    pd.DataFrame({"prompt": PROMPTS}).to_csv(csv, index=False)
    with pytest.raises(HereticError, match="bad_prompts: column 'text' not in .*columns: prompt"):
        load_prompts(PromptSpec(dataset=str(csv)), "bad_prompts")
    with pytest.raises(HereticError, match="prompt file not found"):
        load_prompts(PromptSpec(dataset=str(tmp_path / "missing.txt")), "x")
    for name, text in (("empty.txt", ""), ("blank.txt", "\n  \n"), ("empty.csv", ""), ("empty.jsonl", "\n")):
        empty = tmp_path / name
        empty.write_text(text)
        with pytest.raises(HereticError) as err:
            load_prompts(PromptSpec(dataset=str(empty)), "good_prompts")
        assert str(err.value) == f"good_prompts: prompt file {empty} is empty"
    header_only = tmp_path / "header.csv"
    header_only.write_text("text\n")
    with pytest.raises(HereticError, match=r"good_prompts: .*header.csv' split 'train' holds no prompts"):
        load_prompts(PromptSpec(dataset=str(header_only)), "good_prompts")
    with pytest.raises(HereticError, match="unknown built-in prompt set 'builtin:nope'"):
        load_prompts(PromptSpec(dataset="builtin:nope"), "x")
    with pytest.raises(HereticError, match="x: cannot load .* split 'validation'"):
        load_prompts(PromptSpec(dataset=str(csv), column="prompt", split="validation"), "x")
    with pytest.raises(HereticError, match="x: cannot load 'no-such-org/no-such-dataset'"):
        load_prompts(PromptSpec(dataset="no-such-org/no-such-dataset"), "x")
