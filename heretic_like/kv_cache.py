"""The KV cache's name in transformers' calls and outputs, whichever version is installed.

transformers 5.24 renamed `past_key_values` to `cache` (argument and output field); the old name
still works but warns on every forward and goes in 5.40. Models not yet migrated (remote code)
keep the old name, so the name is read off each model's own `forward`, not off the version.
"""

from __future__ import annotations

import inspect
from functools import cache as memoised
from typing import Any

OLD, NEW = "past_key_values", "cache"


@memoised
def _kwarg_of(forward_type: type) -> str:
    return NEW if NEW in inspect.signature(forward_type.forward).parameters else OLD


def cache_kwarg(model: Any) -> str:
    """The keyword `model(...)` and `model.generate(...)` take a KV cache under (a peft wrapper
    passes it on to the model it wraps, so that model's name)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _kwarg_of(type(base))


def with_cache(model: Any, kwargs: dict, cache: Any) -> dict:
    """`kwargs` with `cache` passed under the model's name for it (in place, and returned)."""
    kwargs[cache_kwarg(model)] = cache
    return kwargs


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned (None if it returned none)."""
    if NEW in getattr(output, "__dataclass_fields__", {}):
        return getattr(output, NEW)
    return getattr(output, OLD, None)
