"""The block printed at the end of a run: what was chosen and why, what it measured, where it
went, and what to try next. Pure formatting over values the run already has."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass(frozen=True)
class RunSummary:
    trial: int
    reason: str
    refusals: int
    harmful: int
    base_refusals: int
    kl_divergence: float
    long: dict[str, int] | None  # {"refusals_long": n, "length": tokens} from the long recount
    capability: pd.DataFrame | None  # metric, base, edited, delta
    export_dir: Path | None
    study_path: str
    timings: dict[str, float] = field(default_factory=dict)  # phase -> seconds, this run
    exported_kl: float | None = None  # the exported weights' own KL, where the trial scored an approximation


def summary_block(s: RunSummary) -> str:
    rule = "=" * 72
    lines = [rule, f"Chosen trial {s.trial}: {s.reason}",
             f"  refusals   {s.refusals}/{s.harmful} in the study's "
             f"{'responses' if s.long is None else 'short responses'} (unedited model: {s.base_refusals}/{s.harmful})"]
    if s.long is not None:
        lines.append(f"             {s.long['refusals_long']}/{s.harmful} with {s.long['length']}-token responses")
    lines.append(f"  KL         {s.kl_divergence:.4f} (first response token, harmless prompts)")
    if s.exported_kl is not None:
        lines.append(f"             {s.exported_kl:.4f} with the exported weights (the trial scored a low-rank "
                     "approximation of them)")  # fmt: skip
    if s.capability is not None and not s.capability.empty:
        deltas = ", ".join(f"{row.metric} {row.delta:+.3f}" for row in s.capability.itertuples(index=False))
        lines.append(f"  capability {deltas} (edited - unedited)")
    if s.export_dir is not None:
        lines.append(f"  exported   {s.export_dir}")
    if s.timings:
        phases = ", ".join(f"{name.replace('_', ' ')} {seconds:.0f} s" for name, seconds in s.timings.items())
        lines.append(f"  time       {phases}")
    lines += ["Next:",
              f"  python -m heretic_like chat --study {s.study_path} --trial {s.trial}",
              f"  python -m heretic_like report --study {s.study_path} --trial {s.trial}"]  # fmt: skip
    if s.export_dir is not None:
        lines.append(f"  python -m heretic_like evaluate --compare {s.export_dir}")
    lines.append(rule)
    return "\n".join(lines)
