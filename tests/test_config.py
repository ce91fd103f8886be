import pytest

from heretic_like.config import load_settings, overrides_to_dict, parse_override_value
from heretic_like.errors import HereticError


def test_defaults_load_and_match_reference_keys():
    s = load_settings()
    assert s.n_trials >= 1 and s.refusal_markers
    for key in (
        "dtypes",
        "quantization",
        "device_map",
        "batch_size",
        "max_batch_size",
        "max_response_length",
        "print_responses",
        "print_residual_geometry",
        "kl_divergence_scale",
        "kl_divergence_target",
        "orthogonalize_direction",
        "winsorization_quantile",
        "n_trials",
        "n_startup_trials",
        "study_checkpoint_dir",
        "refusal_markers",
        "system_prompt",
        "good_prompts",
        "bad_prompts",
        "good_evaluation_prompts",
        "bad_evaluation_prompts",
    ):
        assert key in type(s).model_fields, key


def test_user_file_and_overrides_merge(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("n_trials = 7\n[search]\nmax_weight = { low = 0.5, high = 1.0 }\n")
    s = load_settings(str(cfg), overrides_to_dict([("n-trials", "9"), ("search.min-weight.high", "0.5")]))
    assert s.n_trials == 9
    assert (s.search.max_weight.low, s.search.max_weight.high) == (0.5, 1.0)
    assert s.search.min_weight.high == 0.5
    assert s.bad_prompts.dataset == "builtin:harmful"  # untouched defaults survive a partial table


def test_override_values_parse_as_toml_or_text():
    assert parse_override_value("5") == 5
    assert parse_override_value('["float32"]') == ["float32"]
    assert parse_override_value("true") is True
    assert parse_override_value("org/model-name") == "org/model-name"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("n_trails = 3", "unknown key 'n_trails'"),
        ('n_trials = "many"', "key 'n_trials'"),
        ("n_trials = 0", "key 'n_trials'"),
        ("winsorization_quantile = 1.5", "key 'winsorization_quantile'"),
        ("kl_divergence_scale = 0", "key 'kl_divergence_scale'"),
        ("refusal_markers = []", "key 'refusal_markers'"),
        ('dtypes = ["float8"]', "key 'dtypes.0'"),
        ("[search]\ndirection_index = { low = 0.9, high = 0.2 }", "key 'search.direction_index'"),
        ("[search]\nmin_weight_distance = { low = 0.0, high = 0.2 }", "min_weight_distance.low must be > 0"),
        ("[search]\nsecond_peak_distance = { low = 0.0, high = 0.2 }", "second_peak_distance.low must be > 0"),
        ("[search]\nsecond_peak_position = { low = 0.2, high = 1.5 }", "second_peak_position must lie within"),
        ('[search]\ncomponents = ["mlp.up_proj"]', "key 'search.components.0'"),
        ('[search]\nkernel_shape = ["gauss"]', "key 'search.kernel_shape.0'"),
        ("[search]\nkernel_shape = []", "key 'search.kernel_shape'"),
        ("[bad_prompts]\nsplitt = 'train'", "unknown key 'bad_prompts.splitt'"),
        ("n_trials = ", "invalid TOML"),
    ],
)
def test_bad_config_gives_one_line_naming_the_key(tmp_path, text, expected):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text + "\n")
    with pytest.raises(HereticError) as err:
        load_settings(str(cfg))
    message = str(err.value)
    assert expected in message and "\n" not in message
    assert str(cfg) in message


def test_missing_config_file():
    with pytest.raises(HereticError, match="config file not found: nope.toml"):
        load_settings("nope.toml")


def test_study_identity_ignores_run_only_keys():
    a = load_settings()
    b = load_settings(overrides={"n_trials": 3, "batch_size": 4, "export_trial": "none"})
    c = load_settings(overrides={"search": {"max_weight": {"low": 0.1, "high": 0.2}}})
    assert a.study_fingerprint() == b.study_fingerprint()
    assert a.study_fingerprint() != c.study_fingerprint()
