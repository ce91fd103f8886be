"""Settings: one validated object built from the default config, a user TOML file and CLI overrides.

Keys mirror Heretic's reference config where they apply (same names, same meaning), so a user
can carry a config across. Validation is strict: unknown keys, wrong types and out-of-range
values are rejected with one line that names the key.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from .errors import HereticError
from .space import SearchSpace
from .space import Strict as _Strict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

COMPONENTS = ("attn.o_proj", "mlp.down_proj")


class PromptSpec(_Strict):
    """Where a prompt set comes from.

    `dataset` is a Hugging Face hub id, a local directory, a local file (.txt one prompt per
    line, .csv, .json, .jsonl, .parquet) or `builtin:NAME` for a set shipped in the package.
    `split` uses the `datasets` slice syntax (`train[:150]`); local files have one split, `train`.
    """

    dataset: str = Field(min_length=1)
    split: str = "train"
    column: str = "text"
    commit: str | None = None  # hub revision of the dataset (Heretic's key)
    prefix: str = ""  # put before each prompt, with a space (as Heretic does)
    suffix: str = ""  # put after each prompt, with a space
    system_prompt: str | None = None  # this set's system prompt instead of the global one
    residual_plot_label: str | None = None  # the set's name in residual plots
    residual_plot_color: str | None = None  # a matplotlib colour for it there


# Prompt-set fields that only label plots: changing them does not change what a study measures.
PLOT_ONLY_FIELDS = {"residual_plot_label", "residual_plot_color"}


# Fields added to prompt sets later (Heretic's), left out of a study's identity while at their
# defaults: studies stamped before they existed keep their identity and their cached directions.
LATER_SPEC_FIELDS = {"commit": None, "prefix": "", "suffix": "", "system_prompt": None}


def prompt_spec_identity(spec: dict[str, Any]) -> dict[str, Any]:
    """What a prompt set contributes to a study's identity: every field that changes the prompts,
    none that only labels plots."""
    data = PromptSpec.model_validate(spec).model_dump(mode="json", exclude=PLOT_ONLY_FIELDS)
    return {k: v for k, v in data.items() if k not in LATER_SPEC_FIELDS or v != LATER_SPEC_FIELDS[k]}


# Study keys added after studies were stamped without them, and the value every such study had:
# at that value the key is left out of the identity, so those studies keep their fingerprint (and
# their cached directions) and resume.
LATER_STUDY_KEYS: dict[str, Any] = {"model_commit": None, "direction_position": -1, "refusal_margin_weight": 0.0,
                                    "preserved_input_rank": 0, "preserved_input_scope": "edit"}  # fmt: skip


def normal_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """A study identity in the one form stored and compared: prompt sets as `prompt_spec_identity`
    gives them, keys of `LATER_STUDY_KEYS` absent at their earlier value."""
    out = {key: prompt_spec_identity(v) if isinstance(v, dict) and "dataset" in v else v for key, v in identity.items()}
    return {key: v for key, v in out.items() if key not in LATER_STUDY_KEYS or v != LATER_STUDY_KEYS[key]}


class Benchmark(_Strict):
    """An lm-evaluation-harness task the `evaluate` command offers (Heretic's `benchmarks`)."""

    task: str = Field(min_length=1)
    name: str = Field(min_length=1)
    description: str = ""


class Settings(_Strict):
    """Every key of the config. Defaults live in one place, `config.default.toml`, which
    `load_settings` always reads first: a key with a default is required here, and only keys
    whose default is "unset" (commented out in the file) default to None in this class."""

    # --- model ---
    model: str = Field(min_length=1)
    model_commit: str | None = None
    gguf_file: str | None = None
    dtypes: list[Literal["auto", "float32", "float16", "bfloat16"]] = Field(min_length=1)
    quantization: Literal["none", "bnb_4bit"]
    device_map: str | dict[str, int | str]
    max_memory: dict[str, str] | None = None
    cache_dir: str
    chat_template: str | None = None
    system_prompt: str | None
    response_prefix: str
    thinking_tags: list[tuple[str, str]]
    # --- throughput ---
    batch_size: int = Field(ge=0)
    max_batch_size: int = Field(ge=1)
    directions_batch_size: int = Field(ge=0)  # 0: batch_size
    # --- scoring ---
    max_response_length: int = Field(ge=1)
    verify_response_length: int = Field(ge=0)
    print_responses: bool
    print_residual_geometry: bool
    kl_divergence_scale: float = Field(gt=0)
    kl_divergence_target: float = Field(ge=0)
    refusal_margin_weight: float = Field(ge=0)
    refusal_markers: list[str] = Field(min_length=1)
    ignore_echoed_markers: bool
    unanswered_is_refusal: bool
    stop_at_marker: bool
    refusal_detector: Literal["markers", "judge", "endpoint"]
    refusal_judge_model: str | None = None
    refusal_judge_url: str | None = None
    refusal_judge_api_key_env: str | None
    prune_dominated: bool
    screen_trials: bool
    screening_audit_fraction: float = Field(ge=0, le=1)
    front_response_length: int = Field(ge=0)
    # --- directions and edits ---
    orthogonalize_direction: bool
    winsorization_quantile: float = Field(gt=0, le=1)
    filter_direction_prompts: bool
    direction_position: int = Field(le=-1)
    row_normalization: Literal["none", "pre", "full"]
    full_normalization_lora_rank: int = Field(ge=1, le=64)
    preserved_input_rank: int = Field(ge=0)
    preserved_input_scope: Literal["edit", "global_direction"]
    biproject_direction: bool
    directions_per_layer: int = Field(ge=1, le=16)
    direction_candidates: int = Field(ge=1, le=64)
    entanglement_threshold: float = Field(ge=0, le=1)
    edit_mode: Literal["lora", "hooks"]
    # --- study ---
    n_trials: int = Field(ge=1)
    n_startup_trials: int = Field(ge=0)
    seed: int | None = None
    study_checkpoint_dir: str
    study_name: str | None = None
    storage: str | None = None
    search: SearchSpace
    # --- export ---
    export_trial: int | Literal["best", "none"]
    export_rule: Literal["balanced", "fewest_refusals"]
    export_kl_exchange: float = Field(gt=0)
    export_dir: str | None = None
    export_kl_limit: float = Field(ge=0)
    export_strategy: Literal["merged", "adapter"]
    max_shard_size: str = Field(pattern=r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")
    # --- capability evaluation (after the study, on the chosen trial; and `evaluate`) ---
    evaluate_capabilities: bool
    overrefusal_prompts: PromptSpec | None
    lm_eval_tasks: list[str]
    lm_eval_limit: int | None = Field(None, ge=1)
    benchmarks: list[Benchmark]
    evaluate_model: str | None = None
    # --- other runs of the main command (Heretic's keys) ---
    reproduce: str | None = None
    # --- plots of the residuals (PaCMAP when installed, else PCA) ---
    plot_residuals: bool
    residual_plot_path: str
    residual_plot_title: str
    residual_plot_style: str
    # --- prompts ---
    good_prompts: PromptSpec
    bad_prompts: PromptSpec
    good_evaluation_prompts: PromptSpec
    bad_evaluation_prompts: PromptSpec
    capability_prompts: PromptSpec | None = None

    @model_validator(mode="after")
    def _compatible(self) -> Settings:
        if self.refusal_detector == "endpoint" and not (self.refusal_judge_url and self.refusal_judge_model):
            raise ValueError("refusal_detector = 'endpoint' needs refusal_judge_url and refusal_judge_model")
        if self.edit_mode == "hooks" and self.row_normalization != "none":
            raise ValueError(f"edit_mode = 'hooks' needs row_normalization = 'none' (got '{self.row_normalization}')")
        if self.edit_mode == "hooks" and self.preserved_input_rank:  # an output hook cannot see the inputs
            raise ValueError(f"edit_mode = 'hooks' needs preserved_input_rank = 0 (got {self.preserved_input_rank})")
        if self.preserved_input_scope == "global_direction" and not self.search.global_direction:
            raise ValueError("preserved_input_scope = 'global_direction' needs search.global_direction = true")
        return self

    @field_validator("thinking_tags")
    @classmethod
    def _tags(cls, tags: list[tuple[str, str]]) -> list[tuple[str, str]]:
        if any(not opener.strip() or not closer.strip() for opener, closer in tags):
            raise ValueError("each pair needs a non-empty opener and closer")
        return tags

    @field_validator("refusal_markers")
    @classmethod
    def _markers(cls, markers: list[str]) -> list[str]:
        if any(not m.strip() for m in markers):
            raise ValueError("markers must be non-empty strings")
        return markers

    # Keys that define what a study measures: resuming with any of them changed is refused.
    STUDY_KEYS: ClassVar[tuple[str, ...]] = (
        "model", "model_commit", "gguf_file", "quantization", "chat_template", "system_prompt", "response_prefix",
        "thinking_tags", "max_response_length", "kl_divergence_scale", "kl_divergence_target", "refusal_margin_weight",
        "refusal_markers",
        "ignore_echoed_markers", "unanswered_is_refusal", "refusal_detector", "refusal_judge_model",
        "refusal_judge_url",
        "orthogonalize_direction", "winsorization_quantile", "filter_direction_prompts", "direction_position",
        "row_normalization",
        "full_normalization_lora_rank", "preserved_input_rank", "preserved_input_scope", "biproject_direction",
        "directions_per_layer",
        "direction_candidates", "entanglement_threshold", "search", "good_prompts", "bad_prompts",
        "good_evaluation_prompts", "bad_evaluation_prompts", "capability_prompts",
    )  # fmt: skip

    @property
    def tags(self) -> tuple[tuple[str, str], ...]:
        """`thinking_tags` as hashable pairs (TOML gives lists)."""
        return tuple((opener, closer) for opener, closer in self.thinking_tags)

    def study_identity(self) -> dict[str, Any]:
        """The config subset a study's results depend on (JSON-ready)."""
        data = self.model_dump(mode="json")
        return normal_identity({key: data[key] for key in self.STUDY_KEYS})

    def study_fingerprint(self) -> str:
        blob = json.dumps(self.study_identity(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def resolved_study_name(self) -> str:
        if self.study_name:
            return self.study_name
        stem = Path(self.gguf_file or self.model.rstrip("/")).name
        for suffix in (".gguf", ".GGUF"):
            stem = stem.removesuffix(suffix)
        return "".join(c if c.isalnum() or c in "-_." else "-" for c in stem) or "study"

    def resolved_storage(self) -> str:
        """An Optuna storage URL, or a journal-file path inside the checkpoint dir."""
        if self.storage:
            return self.storage
        return str(Path(self.study_checkpoint_dir) / f"{self.resolved_study_name()}.journal")


def default_config_text() -> str:
    return resources.files("heretic_like").joinpath("config.default.toml").read_text()


@functools.cache
def _default_data() -> dict[str, Any]:
    return _read_toml(default_config_text(), "config.default.toml")


def default_data() -> dict[str, Any]:
    """The built-in defaults as plain TOML data (a fresh copy): the one place defaults live."""
    return copy.deepcopy(_default_data())


def _read_toml(text: str, origin: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise HereticError(f"{origin}: invalid TOML: {exc}") from None


def merge_dicts(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def parse_override_value(raw: str) -> Any:
    """`--n-trials 5` gives 5, `--dtypes '["float32"]'` a list, `--model foo/bar` the string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def overrides_to_dict(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Turn `--search.max-weight.high 2` style pairs into a nested dict."""
    out: dict[str, Any] = {}
    for key, raw in pairs:
        parts = key.replace("-", "_").split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise HereticError(f"--{key}: conflicts with another override")
        node[parts[-1]] = parse_override_value(raw)
    return out


def format_validation_error(exc: ValidationError, origin: str) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{origin}: unknown key '{loc}'"
    if err["type"] == "missing":
        return f"{origin}: missing required key '{loc}'"
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {json.dumps(value, default=str)})"
    more = f" [+{len(exc.errors()) - 1} more]" if len(exc.errors()) > 1 else ""
    if not err["loc"]:
        return f"{origin}: {msg}{more}"
    return f"{origin}: key '{loc}': {msg}{shown}{more}"


def build_settings(data: dict[str, Any], origin: str) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise HereticError(format_validation_error(exc, origin)) from None


def _ours(data: dict[str, Any], origin: str) -> dict[str, Any]:
    """A user's config with Heretic 1.4's spellings rewritten (compat.py); one warning line on
    stderr per key that cannot apply."""
    from .compat import translate

    data, warnings = translate(data)
    for warning in warnings:
        print(f"warning: {origin}: {warning}", file=sys.stderr)
    return data


def load_settings(config_path: str | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Default config, then the user's file (if any), then CLI overrides; validated once. A
    Heretic config is read as it is (compat.py)."""
    data = default_data()
    origin = "config.default.toml"
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise HereticError(f"config file not found: {config_path}")
        data = merge_dicts(data, _ours(_read_toml(path.read_text(), str(path)), str(path)))
        origin = str(path)
    elif Path("config.toml").is_file():
        data = merge_dicts(data, _ours(_read_toml(Path("config.toml").read_text(), "config.toml"), "config.toml"))
        origin = "config.toml"
    if overrides:
        data = merge_dicts(data, _ours(overrides, "command line"))
        origin = f"{origin} + command-line overrides"
    return build_settings(data, origin)


def settings_toml(settings: Settings) -> str:
    """The effective settings as a TOML config that loads back to the same settings (unset keys
    are left out: TOML has no null)."""
    import tomli_w

    return tomli_w.dumps(settings.model_dump(mode="json", exclude_none=True))
