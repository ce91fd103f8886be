"""The KL of what a user gets: each kept study's chosen trial exported, its exact weights' KL measured.

With `row_normalization = "full"` (the default) every trial scores a low-rank LoRA approximation of
the norm-preserving edit, and export writes the exact weights, so the KL a study reports for its
chosen trial is the approximation's. `export_trial` now measures the exported weights' own KL;
this runs it on the chosen trial of every results folder given (one that kept its study in
`checkpoints/`) and prints both figures side by side. The folders are not changed: each study is
exported from a copy, in a scratch folder that is removed afterwards.

    python benchmarks/exported_kl.py benchmarks/results-quality/levers/*/ \
        --out benchmarks/results-quality/exported-kl.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from heretic_like.export import export_trial  # noqa: E402
from heretic_like.records import StudyRecord  # noqa: E402
from heretic_like.store import load_existing_study, settings_of  # noqa: E402
from heretic_like.testbed import fetch_qwen  # noqa: E402


def measure(folder: Path, scratch: Path) -> dict:
    """Export `folder`'s chosen trial from a copy of its study; the scored and the exported KL."""
    summary = json.loads((folder / "summary.json").read_text())
    number = summary["best_trial"]["trial"]
    work = scratch / folder.name
    shutil.copytree(folder / "checkpoints", work / "checkpoints")
    (work / "models").symlink_to(fetch_qwen(ROOT / "models").parent.resolve())
    os.chdir(work)  # the study's paths (model, checkpoints) are relative to where it ran
    (journal,) = (work / "checkpoints").glob("*.journal")
    study = load_existing_study(str(journal), None)
    started = time.perf_counter()
    export_trial(study, settings_of(study, {}), number, work / "export")
    exported = StudyRecord(study).exported_kl(number)
    shutil.rmtree(work)
    return {"folder": str(folder.resolve().relative_to(ROOT)), "command": summary["command"], "trial": number,
            "kl_scored": round(summary["best_trial"]["kl_divergence"], 4),
            "kl_exported": None if exported is None else round(exported, 4),
            "heldout_refusals_long": summary["best_trial"]["heldout_refusals_long"],
            "seconds": round(time.perf_counter() - started)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", help="default_run.py results folders")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the table")
    args = parser.parse_args()
    folders = [f.resolve() for f in args.folders if list(f.glob("checkpoints/*.journal"))]
    if not folders:
        sys.exit("no folder given kept its study (checkpoints/*.journal)")
    out = args.out.resolve()
    rows = []
    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks" / ".cache") as scratch:
        for folder in folders:
            rows.append(measure(folder, Path(scratch)))
            print(json.dumps(rows[-1]), flush=True)
            out.write_text(json.dumps(rows, indent=1) + "\n")  # after each: a stopped run keeps its rows
    os.chdir(ROOT)
    print(f"{'folder':60s} trial  scored  exported  held out (128)")
    for row in rows:
        print(f"{row['folder'][-60:]:60s} {row['trial']:5d}  {row['kl_scored']:.4f}  {row['kl_exported']}  "
              f"{row['heldout_refusals_long']}")  # fmt: skip


if __name__ == "__main__":
    main()
