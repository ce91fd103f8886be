"""Heretic configs run unchanged: the few keys and values Heretic 1.4 spells differently, in ours.

Every key of Heretic 1.4's settings is accepted. Most have the same name and meaning here and
need nothing; this module rewrites the rest before validation, and says in one warning line
each what it could not apply. It is pure (data in, data and warnings out): `load_settings` calls
it on the user's file and on command-line overrides.
"""

from __future__ import annotations

from typing import Any

# Heretic keys with no counterpart here, and why: dropped with one warning line each.
UNSUPPORTED = {
    "collect_reproducibles": "archiving other people's reproduce.json files from the hub is not something "
    "heretic_like does",
}

# Heretic's value -> ours, where the same choice is spelled differently.
VALUE_SPELLINGS = {"export_strategy": {"merge": "merged"}}


def thinking_tags_of(skips: list) -> tuple[list[list[str]], list[str]]:
    """Heretic's `chain_of_thought_skips` are (opening, the whole empty block) pairs, e.g.
    ("<think>", "<think></think>"); our `thinking_tags` are (opener, closer) pairs, so the closer
    is the block with the opening removed. A pair whose block does not start with its opening
    has no closer to find: warned about and left out."""
    tags, warnings = [], []
    for pair in skips:
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            warnings.append(f"chain_of_thought_skips: {pair!r} is not an (opening, empty block) pair: ignored")
            continue
        opening, block = pair
        closer = block.removeprefix(opening)
        if not opening.strip() or not block.startswith(opening) or not closer.strip():
            warnings.append(f"chain_of_thought_skips: {block!r} does not start with {opening!r} followed by a "
                            "closing tag: ignored")  # fmt: skip
            continue
        tags.append([opening, closer])
    return tags, warnings


def translate(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A config (file or overrides) with Heretic's spellings rewritten to ours; plus one warning
    line per key or value that cannot apply. Keys already ours pass through untouched."""
    out, warnings = dict(data), []
    for key, why in UNSUPPORTED.items():
        if key in out:
            warnings.append(f"{key}: {why} (ignored)")
            del out[key]
    # What Heretic's offloading saves is already saved here: residuals are read one position per
    # layer and moved to the CPU as they are read (directions.py), logits the same way.
    if out.pop("offload_outputs_to_cpu", True) is False:
        warnings.append("offload_outputs_to_cpu = false: heretic_like always moves the few residuals and "
                        "log-probs it keeps to the CPU (ignored)")  # fmt: skip
    if "chain_of_thought_skips" in out:
        tags, more = thinking_tags_of(out.pop("chain_of_thought_skips") or [])
        warnings += more
        if "thinking_tags" in out:
            warnings.append("chain_of_thought_skips: thinking_tags is also set and is used instead (ignored)")
        elif tags:
            out["thinking_tags"] = tags
    for key, spellings in VALUE_SPELLINGS.items():
        if isinstance(out.get(key), str) and out[key] in spellings:
            out[key] = spellings[out[key]]
    if isinstance(out.get("max_shard_size"), int) and not isinstance(out["max_shard_size"], bool):
        out["max_shard_size"] = f"{out['max_shard_size']}B"  # Heretic also takes a byte count
    return out, warnings
