"""The redesign's behaviour check: a seeded study on a tiny model trained to refuse, run with the
code at ROOT; prints every trial's parameters, objective values, refusals and KL as JSON.

    python benchmarks/architecture/seeded_study.py ROOT MODEL_DIR WORK_DIR > trials.json

Run once with a checkout from before a change and once after, on the same model folder (build
it with `tests.conftest.build_model` + `train_refusal`), and compare the two files byte for byte.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> None:
    root, model, out = sys.argv[1:4]
    sys.path.insert(0, root)
    os.environ["TQDM_DISABLE"] = "1"
    from heretic_like.config import load_settings
    from heretic_like.study import run_study

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.conftest import study_config

    work = Path(out)
    work.mkdir(parents=True, exist_ok=True)
    search = ("max_weight = { low = 1.5, high = 3.0 }\nmax_weight_position = { low = 0.0, high = 1.0 }\n"
              "direction_index = { low = 0.0, high = 0.5 }\nmin_weight_distance = { low = 0.5, high = 1.0 }\n")
    config = study_config(work, Path(model), n_trials=8, n_startup_trials=4, seed=3, prune_dominated="true",
                          search=search)  # fmt: skip
    config.write_text(config.read_text().replace("train[150:174]", "train[:24]"))
    print(sys.modules["heretic_like"].__file__, file=sys.stderr)
    study = run_study(load_settings(str(config))).study
    rows = [{"n": t.number, "state": t.state.name, "params": t.params, "values": t.values,
             "refusals": t.user_attrs.get("refusals"), "kl": t.user_attrs.get("kl_divergence")} for t in study.trials]
    print(json.dumps(rows, sort_keys=True))


if __name__ == "__main__":
    main()
