"""Bad input, tried systematically: whatever the config or prompt file holds, the loaders either
succeed or raise one HereticError line; nothing else escapes."""

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heretic_like.config import Settings, load_settings, overrides_to_dict
from heretic_like.errors import HereticError
from heretic_like.prompts import PromptSpec, load_prompts

KEYS = list(Settings.model_fields) + ["n_trails", "search.max_weight.low", "search.bogus", "bad_prompts.split",
                                      "good_prompts.column", "search.direction_scope"]  # fmt: skip
VALUES = st.one_of(
    st.integers(-5, 500).map(str), st.floats(allow_nan=True).map(repr), st.booleans().map(lambda b: str(b).lower()),
    st.text(string.printable, max_size=12), st.just("[]"), st.just('["float32"]'), st.just("{ low = 1, high = 0 }"),
    st.just('"builtin:harmful"'), st.just("[1, 2]"),
)  # fmt: skip


def _one_line_or_ok(fn):
    try:
        fn()
    except HereticError as exc:
        assert str(exc) and "\n" not in str(exc)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=4))
def test_overrides_never_escape(pairs):
    _one_line_or_ok(lambda: load_settings(None, overrides_to_dict(pairs)))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_config_files_never_escape(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    _one_line_or_ok(lambda: load_settings(str(path)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=300), suffix=st.sampled_from([".txt", ".csv", ".json", ".jsonl", ".parquet"]),
       split=st.sampled_from(["train", "train[:2]", "train[5:]", "test", "train[:abc]"]))  # fmt: skip
def test_malformed_prompt_files_never_escape(tmp_path, content, suffix, split):
    path = tmp_path / f"p{suffix}"
    path.write_bytes(content)
    _one_line_or_ok(lambda: load_prompts(PromptSpec(dataset=str(path), split=split, column="text"), "bad_prompts"))
