"""Where the held-out hard core sits on directions read at each of the last prompt tokens.

`refusal_strength.py` found that the held-out prompts every chosen edit leaves refused lie *off*
the refusal direction read at the last prompt token. This reads the unedited model's residuals at
each of the last `--positions` prompt tokens, measures a direction per token and layer from the
study's direction prompts (filtered as the default study filters them), and prints, per
position, how the held-out prompts the edits free and the hard core project on it (harmless
mean 0, harmful mean 1) and their cosine with it (residual minus the harmless mean). A position
where the hard core projects *more* strongly than the freed prompts is one whose direction sees
them; `direction_position` makes a study edit along it.

    python benchmarks/direction_positions.py benchmarks/results-quality/seed-0 \
        benchmarks/results-quality/seed-1 benchmarks/results-quality/seed-2
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from qwen_benchmark import harmbench_prompts  # noqa: E402
from refusal_strength import groups, on_direction, refused_by  # noqa: E402

from heretic_like.config import load_settings  # noqa: E402
from heretic_like.detectors import MarkerDetector  # noqa: E402
from heretic_like.directions import collect_residuals  # noqa: E402
from heretic_like.geometry import PromptFilter, filtered_prompts  # noqa: E402
from heretic_like.model import chat_texts, load_model  # noqa: E402
from heretic_like.prompts import load_all_prompts  # noqa: E402
from heretic_like.testbed import fetch_qwen  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="default_run.py output folders (the testbed model)")
    parser.add_argument("--positions", type=int, default=6, help="the last N prompt tokens")
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 10, 14, 17, 20, 22])
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    settings = load_settings(None, {"model": str(fetch_qwen(ROOT / "models"))})
    detector = MarkerDetector.from_settings(settings)
    loaded = load_model(settings)
    sets = load_all_prompts(settings)
    keep = PromptFilter(detector, settings.max_response_length, 64)
    harmful = filtered_prompts("harmful", loaded, sets.harmful, sets.system("harmful"), "", keep)
    harmless = filtered_prompts("harmless", loaded, sets.harmless, sets.system("harmless"), "", keep)
    heldout = harmbench_prompts(ROOT / "benchmarks" / ".cache", 100)
    base = refused_by(args.results[0], "base", detector)
    edited = [refused_by(folder, "best_trial", detector) for folder in args.results]
    grouped = groups(heldout, base, edited)
    hard, freed = grouped["hard core"], grouped["refusal removed by every edit"]
    tokenizer = loaded.tokenizer
    ids = tokenizer(chat_texts(tokenizer, [heldout[0]], settings.system_prompt)[0], add_special_tokens=False)
    tokens = [tokenizer.decode([i]) for i in ids["input_ids"][-args.positions :]]
    print(f"{len(harmful)} harmful and {len(harmless)} harmless direction prompts; held out: {len(freed)} refusals "
          f"every chosen edit frees, {len(hard)} in the hard core ({len(edited)} edits)")  # fmt: skip
    print("last prompt tokens of a held-out prompt:", tokens)
    read = {}
    for position in range(-args.positions, 0):
        read[position] = [collect_residuals(loaded, prompts, settings.system_prompt, args.batch_size,
                                            f"position {position}", "", position)
                          for prompts in (harmful, harmless, heldout)]  # fmt: skip
    median = statistics.median
    print("layer position  cos(r, r_-1)  projection freed / hard core  cosine freed / hard core")
    for layer in args.layers:
        last = torch.nn.functional.normalize(read[-1][0][:, layer].mean(0) - read[-1][1][:, layer].mean(0), dim=0)
        for position, (bad, good, rows) in read.items():
            high, low = bad[:, layer].mean(0), good[:, layer].mean(0)
            direction = torch.nn.functional.normalize(high - low, dim=0)
            strength, cosine = on_direction(rows[:, layer], direction, high, low)
            agree = float(direction @ last)
            print(f"{layer:5d} {position:+8d}  {agree:12.2f}  {median(strength[i] for i in freed):10.2f} / "
                  f"{median(strength[i] for i in hard):.2f}  {median(cosine[i] for i in freed):12.3f} / "
                  f"{median(cosine[i] for i in hard):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
