"""A Heretic 1.4 config runs unchanged.

The config is built from Heretic's real settings: `.ci/run` downloads the `heretic-llm==1.4.0`
wheel from PyPI (not installed, not copied into this repository); its `heretic/config.py` is
parsed with `ast`, and every field of `Settings` and of the prompt-set specification is written
out with its literal default, enums by value, `benchmarks` as an array of tables.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomli_w

from heretic_like.compat import thinking_tags_of, translate
from heretic_like.config import Settings, load_settings, settings_toml
from heretic_like.errors import HereticError

ROOT = Path(__file__).resolve().parents[1]


def heretic_wheel() -> Path | None:
    found = (ROOT / ".ci" / "wheels").glob("heretic_llm-1.4.0-*.whl")
    candidates = [os.environ.get("HERETIC_WHEEL", ""), *map(str, found)]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


@pytest.fixture(scope="module")
def heretic_source() -> ast.Module:
    wheel = heretic_wheel()
    if wheel is None:
        pytest.skip("heretic-llm 1.4.0 wheel not found: .ci/run downloads it to .ci/wheels "
                    "(pip download --no-deps heretic-llm==1.4.0 -d .ci/wheels), or set HERETIC_WHEEL")  # fmt: skip
    with zipfile.ZipFile(wheel) as archive:
        return ast.parse(archive.read("heretic/config.py").decode())


def _classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def _enum_values(tree: ast.Module) -> dict[str, dict[str, object]]:
    """{EnumClass: {MEMBER: value}} for the module's enums."""
    out = {}
    for name, cls in _classes(tree).items():
        if any(isinstance(b, ast.Name) and b.id == "Enum" for b in cls.bases):
            out[name] = {t.targets[0].id: ast.literal_eval(t.value) for t in cls.body if isinstance(t, ast.Assign)}
    return out


def _value(node: ast.expr, enums: dict) -> object:
    """A literal default: constants, containers, enum members by value, specification calls as tables."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in enums:
        return enums[node.value.id][node.attr]
    if isinstance(node, ast.Call):  # DatasetSpecification(...) / BenchmarkSpecification(...)
        return {kw.arg: _value(kw.value, enums) for kw in node.keywords}
    if isinstance(node, ast.List | ast.Tuple):
        return [_value(e, enums) for e in node.elts]
    return ast.literal_eval(node)


def _fields(cls: ast.ClassDef, enums: dict) -> dict[str, tuple[bool, object]]:
    """{field: (has a default, default)} of a pydantic class, from `Field(default=...)` or `= value`."""
    out = {}
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        value = node.value
        if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "Field":
            default = next((kw.value for kw in value.keywords if kw.arg == "default"), None)
            out[node.target.id] = (default is not None, None if default is None else _value(default, enums))
        else:
            out[node.target.id] = (value is not None, None if value is None else _value(value, enums))
    return out


def _drop_none(value):
    """TOML has no null: an unset value is left out, as a Heretic user's file would."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


@pytest.fixture(scope="module")
def heretic_settings(heretic_source) -> dict[str, tuple[bool, object]]:
    enums = _enum_values(heretic_source)
    return _fields(_classes(heretic_source)["Settings"], enums)


@pytest.fixture
def heretic_config(heretic_settings, tmp_path) -> Path:
    """Every Heretic 1.4 setting with its default, as a Heretic user's config.toml."""
    data = {name: default for name, (has, default) in heretic_settings.items() if has}
    data["model"] = "Qwen/Qwen2.5-0.5B-Instruct"  # Heretic's only required key
    path = tmp_path / "config.toml"
    path.write_text(tomli_w.dumps(_drop_none(data)))
    return path


def test_the_wheel_is_read_completely(heretic_source, heretic_settings):
    """Guards the parser: Heretic 1.4 has 40 settings, with its documented defaults."""
    assert len(heretic_settings) >= 40
    assert heretic_settings["orthogonalize_direction"] == (True, True)
    assert heretic_settings["row_normalization"] == (True, "full")
    assert heretic_settings["max_response_length"] == (True, 100)
    assert heretic_settings["n_trials"] == (True, 200)
    spec = _fields(_classes(heretic_source)["DatasetSpecification"], {})
    assert {"commit", "prefix", "suffix", "system_prompt", "residual_plot_label", "residual_plot_color"} <= set(spec)


def test_every_heretic_key_is_accepted(heretic_source, heretic_settings):
    """Each Heretic setting and prompt-set field is ours or read by compat.py (no "unknown key")."""
    from heretic_like.compat import UNSUPPORTED
    from heretic_like.config import PromptSpec

    translated = {"chain_of_thought_skips", "offload_outputs_to_cpu", *UNSUPPORTED}
    missing = set(heretic_settings) - set(Settings.model_fields) - translated
    assert missing == set(), f"Heretic keys heretic_like does not take: {sorted(missing)}"
    spec = _fields(_classes(heretic_source)["DatasetSpecification"], {})
    assert set(spec) - set(PromptSpec.model_fields) == set()


def test_a_heretic_config_loads_unchanged_with_its_meaning(heretic_config, capsys):
    settings = load_settings(str(heretic_config))
    assert capsys.readouterr().err == ""  # Heretic's defaults need no warning
    # Heretic's defaults ask for the norm-preserving projected method on 100-token responses
    assert settings.orthogonalize_direction and settings.row_normalization == "full"
    assert settings.max_response_length == 100 and settings.n_trials == 200 and settings.n_startup_trials == 60
    # chain_of_thought_skips -> thinking_tags: (opening, empty block) -> (opener, closer)
    assert ("<think>", "</think>") in settings.tags and ("[THINK]", "[/THINK]") in settings.tags
    assert ("<|channel|>analysis<|message|>", "<|end|><|start|>assistant<|channel|>final<|message|>") in settings.tags
    assert [b.task for b in settings.benchmarks][:2] == ["agieval", "bbh"] and len(settings.benchmarks) == 11
    assert settings.good_prompts.dataset == "mlabonne/harmless_alpaca" and settings.good_prompts.split == "train[:400]"
    assert settings.good_prompts.residual_plot_color == "royalblue"
    assert settings.residual_plot_style == "dark_background" and settings.residual_plot_path == "plots"
    assert settings.max_batch_size == 128 and settings.device_map == "auto"


def test_the_config_command_prints_settings_that_load_back(heretic_config, tmp_path):
    done = subprocess.run([sys.executable, "-m", "heretic_like", "config", "--config", str(heretic_config),
                           "--n-trials", "7"], capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    printed = tmp_path / "effective.toml"
    printed.write_text(done.stdout)
    again = load_settings(str(printed))
    assert again == load_settings(str(heretic_config), {"n_trials": 7})
    assert again.n_trials == 7 and again.max_response_length == 100


def test_the_config_command_fails_in_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('n_trials = "many"\n')
    done = subprocess.run([sys.executable, "-m", "heretic_like", "config", "--config", str(bad)],
                          capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "n_trials" in done.stderr


def test_keys_that_cannot_apply_warn_once_each(tmp_path, capsys):
    path = tmp_path / "config.toml"
    path.write_text('model = "x"\ncollect_reproducibles = "archive"\noffload_outputs_to_cpu = false\n'
                    'chain_of_thought_skips = [["<think>", "<think></think>"], ["<a>", "<b></b>"]]\n'
                    'export_strategy = "merge"\nmax_shard_size = 2000000\n')  # fmt: skip
    settings = load_settings(str(path))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith(f"warning: {path}: ") for line in lines)
    assert any("collect_reproducibles" in w for w in lines) and any("offload_outputs_to_cpu" in w for w in lines)
    assert any("'<b></b>'" in w for w in lines)
    assert settings.tags == (("<think>", "</think>"),)
    assert settings.export_strategy == "merged" and settings.max_shard_size == "2000000B"


def test_thinking_tags_of_heretic_pairs():
    tags, warnings = thinking_tags_of([("<think>", "<think></think>"), ("<t>", "<t>"), "oops"])
    assert tags == [["<think>", "</think>"]] and len(warnings) == 2
    # our own key wins over Heretic's when both are given
    data, warnings = translate({"thinking_tags": [["<x>", "</x>"]], "chain_of_thought_skips": [["<y>", "<y></y>"]]})
    assert data == {"thinking_tags": [["<x>", "</x>"]]} and len(warnings) == 1


def test_per_set_prefix_suffix_and_system_prompt(tmp_path):
    from heretic_like.prompts import load_all_prompts

    overrides = {"bad_evaluation_prompts": {"dataset": "builtin:harmful", "split": "train[:3]", "prefix": "Please:",
                                            "suffix": "Thanks.", "system_prompt": "Answer briefly."}}  # fmt: skip
    settings = load_settings(None, overrides)
    prompts = load_all_prompts(settings)
    plain = load_all_prompts(load_settings(None, {"bad_evaluation_prompts": {"dataset": "builtin:harmful",
                                                                             "split": "train[:3]"}}))
    assert prompts.harmful_eval == [f"Please: {p} Thanks." for p in plain.harmful_eval[:3]]
    assert prompts.system("harmful_eval") == "Answer briefly."
    assert prompts.system("harmless_eval") == settings.system_prompt == "You are a helpful assistant."
    # they change what the study measures; plot labels do not
    labelled = load_settings(None, {"bad_prompts": {"residual_plot_label": "bad"}})
    assert labelled.study_identity() == load_settings(None).study_identity()
    assert settings.study_identity() != load_settings(None).study_identity()


def test_an_older_study_identity_still_matches():
    """Studies stamped before the prompt-set fields existed resume: the new fields take defaults."""
    from heretic_like.store import _with_new_defaults

    settings = load_settings(None)
    old = settings.study_identity()
    for key in ("good_prompts", "bad_prompts", "good_evaluation_prompts", "bad_evaluation_prompts"):
        old[key] = {k: old[key][k] for k in ("dataset", "split", "column")}
    assert "model_commit" not in old  # unset: absent, as in identities stamped before it existed
    assert _with_new_defaults(old) == settings.study_identity()
    # set, it is part of the identity (another revision is another model)
    assert load_settings(None, {"model_commit": "abc123"}).study_identity()["model_commit"] == "abc123"
    # direction_position came later too: at -1 (every earlier study read the last token) it is absent
    assert "direction_position" not in old
    moved = load_settings(None, {"direction_position": -5})
    assert moved.study_identity()["direction_position"] == -5
    assert moved.study_fingerprint() != settings.study_fingerprint()  # another direction: measured again


def test_benchmarks_are_offered_not_run_unless_asked(tmp_path):
    from heretic_like.capability import chosen_benchmarks

    settings = load_settings(None)
    assert chosen_benchmarks(settings, []) == []
    assert chosen_benchmarks(settings, ["MMLU", "gsm8k"]) == ["mmlu", "gsm8k"]
    assert chosen_benchmarks(settings, ["all"]) == [b.task for b in settings.benchmarks]
    with pytest.raises(HereticError, match="--benchmark nope: not among"):
        chosen_benchmarks(settings, ["nope"])


def test_settings_toml_round_trips_the_defaults():
    settings = load_settings(None)
    import tomllib

    from heretic_like.config import build_settings, default_data, merge_dicts

    assert build_settings(merge_dicts(default_data(), tomllib.loads(settings_toml(settings))), "x") == settings
