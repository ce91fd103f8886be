"""How strongly the unedited model's residual carries the refusal direction, per held-out prompt.

Why the same few held-out prompts stay refused on every seed and lever: this reads the unedited
model's residual at the last prompt token of each of the 100 held-out HarmBench behaviours at the
study's best layer, and prints its projection on that layer's refusal direction (taken from a
study's cached geometry), shifted so the harmless mean is 0 and the harmful mean 1 (the
direction prompts' means), and the cosine between the residual minus the harmless mean and the
direction. The prompts are grouped by the stored 128-token answers of `default_run.py` folders:
answered by the unedited model; refused by it but answered after every chosen edit; refused
after at least one chosen edit (the hard core). A hard core with a larger projection is a stronger
refusal along the same direction; one with a smaller cosine is a refusal the direction misses.

    python benchmarks/refusal_strength.py --geometry CHECKPOINTS/NAME.directions.pt \
        benchmarks/results-quality/seed-0 benchmarks/results-quality/seed-1 benchmarks/results-quality/seed-2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from qwen_benchmark import harmbench_prompts  # noqa: E402

from heretic_like.config import load_settings  # noqa: E402
from heretic_like.detectors import MarkerDetector  # noqa: E402
from heretic_like.directions import RefusalGeometry, collect_residuals  # noqa: E402
from heretic_like.model import load_model  # noqa: E402
from heretic_like.testbed import fetch_qwen  # noqa: E402


def refused_by(folder: Path, model: str, detector: MarkerDetector) -> dict[str, bool]:
    """prompt -> refused, for the stored 128-token answers of one model of a results folder."""
    rows = json.loads((folder / "heldout_responses.json").read_text())[model]
    verdicts = detector.classify([r["prompt"] for r in rows], [r["response"] for r in rows])
    return {r["prompt"]: bool(v) for r, v in zip(rows, verdicts, strict=True)}


def on_direction(rows: torch.Tensor, direction: torch.Tensor, harmful_mean: torch.Tensor,
                 harmless_mean: torch.Tensor) -> tuple[list[float], list[float]]:  # fmt: skip
    """Per row (n, d): the projection on `direction`, scaled so the harmless mean is 0 and the
    harmful mean 1, and the cosine between the row minus the harmless mean and the direction."""
    centred = rows - harmless_mean
    strength = centred @ direction / ((harmful_mean - harmless_mean) @ direction)
    return strength.tolist(), (centred @ direction / centred.norm(dim=1)).tolist()


def scores(residuals: torch.Tensor, geometry: RefusalGeometry, layer: int) -> tuple[list[float], list[float]]:
    """`on_direction` at `layer`, along the study's own direction there."""
    return on_direction(residuals[:, layer], geometry.directions[layer], geometry.harmful_mean[layer],
                        geometry.harmless_mean[layer])  # fmt: skip


def groups(heldout: list[str], base: dict[str, bool], edited: list[dict[str, bool]]) -> dict[str, list[int]]:
    """Indices of the held-out prompts: answered by the unedited model; refused by it and answered
    after every chosen edit; refused after at least one chosen edit (the hard core)."""
    out: dict[str, list[int]] = {"answered unedited": [], "refusal removed by every edit": [], "hard core": []}
    for i, prompt in enumerate(heldout):
        removed = "hard core" if any(e[prompt] for e in edited) else "refusal removed by every edit"
        out[removed if base[prompt] else "answered unedited"].append(i)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="default_run.py output folders (same model)")
    parser.add_argument("--geometry", type=Path, required=True, help="a study's cached NAME.directions.pt")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    settings = load_settings(None, {"model": str(fetch_qwen(ROOT / "models"))})
    detector = MarkerDetector.from_settings(settings)
    if not args.geometry.is_file():
        sys.exit(f"--geometry: no such file: {args.geometry}")
    geometry = RefusalGeometry.from_dict(torch.load(args.geometry, weights_only=True)["geometry"])
    layer = geometry.best_layer(settings.search.layer_window)
    heldout = harmbench_prompts(ROOT / "benchmarks" / ".cache", 100)
    base = refused_by(args.results[0], "base", detector)
    edited = [refused_by(folder, "best_trial", detector) for folder in args.results]
    for folder, answers in zip(args.results, edited, strict=True):
        if set(answers) != set(heldout) or set(base) != set(heldout):
            sys.exit(f"{folder}: its held-out answers are not for the 100 held-out HarmBench prompts")
    residuals = collect_residuals(load_model(settings), heldout, settings.system_prompt, args.batch_size)
    strength, cosine = scores(residuals, geometry, layer)
    times = [sum(e[prompt] for e in edited) for prompt in heldout]  # chosen edits that still refuse it
    grouped = groups(heldout, base, edited)
    print(f"layer {layer}; projection scaled so harmless mean = 0, harmful mean = 1; {len(edited)} chosen edits")
    for name, rows in grouped.items():
        if rows:
            print(f"{name} ({len(rows)}): projection median {statistics.median(strength[i] for i in rows):.2f}, "
                  f"cosine median {statistics.median(cosine[i] for i in rows):.3f}")  # fmt: skip
    print("hard core, most often refused first:")
    for i in sorted(grouped["hard core"], key=lambda i: -times[i]):
        print(f"  {times[i]}/{len(edited)}  projection {strength[i]:.2f}  "
              f"cosine {cosine[i]:.3f}  {heldout[i][:80]}")  # fmt: skip
    ranked = sorted(range(len(heldout)), key=lambda i: -strength[i])
    print(
        "rank of each hard-core prompt by projection among the 100:",
        sorted(ranked.index(i) + 1 for i in grouped["hard core"]),
    )
    print("every layer's own direction, medians (projection / cosine): removed by every edit | hard core")
    for other in range(geometry.num_layers):
        s, c = scores(residuals, geometry, other)
        median = statistics.median
        cells = [f"{median(s[i] for i in grouped[g]):.2f} / {median(c[i] for i in grouped[g]):.3f}"
                 for g in ("refusal removed by every edit", "hard core") if grouped[g]]  # fmt: skip
        print(f"  layer {other:2d}{' (used)' if other == layer else '       '}  {' | '.join(cells)}")


if __name__ == "__main__":
    main()
