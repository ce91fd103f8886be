"""Where the memory goes: peak and resident memory of each phase of a study, on the real subject.

    python benchmarks/memory_phases.py                      # Qwen2.5-Coder-0.5B-Instruct, fp32
    python benchmarks/memory_phases.py --set batch_size 8   # any config override

Linux only: before each phase the kernel's peak-RSS mark is reset (`/proc/self/clear_refs`), so
the figure printed is that phase's own peak, not the process's. The phases are those of a study:
import the libraries, load the model, fingerprint it, measure directions, compute the reference
log-probs, score the unedited model (generation), set up the edit (LoRA adapters), the trials.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


rows: list[dict] = []


def phase(name: str, fn):
    """Run fn() with the peak mark reset; record (peak, resident after, seconds)."""
    reset_peak()
    started = time.perf_counter()
    result = fn()
    rows.append({"phase": name, "peak_gib": status_kib("VmHWM") / 2**20, "rss_after_gib": status_kib("VmRSS") / 2**20,
                 "seconds": time.perf_counter() - started})  # fmt: skip
    print(f"{name:<34} peak {rows[-1]['peak_gib']:.2f} GiB, after {rows[-1]['rss_after_gib']:.2f} GiB, "
          f"{rows[-1]['seconds']:.1f} s", flush=True)  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    parser.add_argument("--trials", type=int, default=1, help="trials to run (does resident memory creep?)")
    parser.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    args = parser.parse_args()
    print(f"{'python interpreter':<34} resident {status_kib('VmRSS') / 2**20:.2f} GiB")

    def imports():
        import optuna  # noqa: F401
        import torch  # noqa: F401

        from heretic_like import study  # noqa: F401  (transformers, peft, pandas, datasets, matplotlib)

    phase("import libraries", imports)
    import optuna
    import torch

    from heretic_like.ablation import Abliterator, EditOptions
    from heretic_like.config import load_settings, overrides_to_dict
    from heretic_like.detectors import MarkerDetector
    from heretic_like.evaluation import Evaluator
    from heretic_like.geometry import GeometryOptions, PromptFilter, compute_geometry
    from heretic_like.model import load_model, model_fingerprint
    from heretic_like.prompts import load_all_prompts
    from heretic_like.search import sample_edit
    from heretic_like.testbed import fetch_qwen

    checkpoints = tempfile.mkdtemp()  # no cached directions: they are measured
    overrides = {"model": str(fetch_qwen(ROOT / "models")), "batch_size": 32, "study_checkpoint_dir": checkpoints,
                 "response_prefix": "", **overrides_to_dict(args.set)}  # fmt: skip
    settings = load_settings(None, overrides)
    prompts = load_all_prompts(settings)
    loaded = phase("load model", lambda: load_model(settings))
    phase("fingerprint the weights", lambda: model_fingerprint(loaded.model))  # a study checks it on resume
    footprint = sum(p.numel() * p.element_size() for p in loaded.model.parameters()) / 2**30
    batch = settings.batch_size
    prompt_filter = PromptFilter.of(settings, lambda: MarkerDetector.from_settings(settings), batch)  # as the run
    geometry = phase("directions", lambda: compute_geometry(GeometryOptions.from_settings(settings), loaded, prompts,
                                                            settings.directions_batch_size or batch, "", prompt_filter))
    evaluator = phase("reference log-probs (KL forward)", lambda: Evaluator(
        loaded, prompts.harmful_eval, prompts.harmless_eval, settings.system_prompt,
        MarkerDetector.from_settings(settings), settings.max_response_length, batch,
        settings.stop_at_marker))  # fmt: skip
    phase("unedited model: generation", lambda: evaluator.score("unedited"))
    abliterator = phase("edit set-up (LoRA adapters)", lambda: Abliterator(
        loaded, settings.search.components, geometry, EditOptions.from_settings(settings)))  # fmt: skip
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))

    def one_trial():
        abliterator.apply(sample_edit(study.ask(), settings.search, geometry))
        return evaluator.score("one trial")

    for number in range(args.trials):
        phase(f"trial {number} (apply, KL, generation)", one_trial)
    worst = max(r["peak_gib"] for r in rows)
    print(f"\nmodel weights {footprint:.2f} GiB ({torch.get_default_dtype()} default dtype); "
          f"worst phase peak {worst:.2f} GiB = {worst / footprint:.2f}x the weights")
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "weights_gib": footprint,
                                              "phases": rows}, indent=2))  # fmt: skip
        geometry.metrics().to_csv(Path(args.out).with_suffix(".layers.csv"), index=False)  # measured on the way


if __name__ == "__main__":
    main()
