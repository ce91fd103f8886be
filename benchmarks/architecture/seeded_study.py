"""Seeded tiny-model study with the code at sys.argv[1]; prints trials (params, values, refusals, KL)."""
import json, os, sys
root, model, out = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, root)
os.environ["TQDM_DISABLE"] = "1"
from heretic_like.config import load_settings
from heretic_like.study import run_study
sys.path.insert(0, "/work/main")
from tests.conftest import study_config
from pathlib import Path
work = Path(out); work.mkdir(parents=True, exist_ok=True)
config = study_config(work, Path(model), n_trials=8, n_startup_trials=4, seed=3, prune_dominated="true", search="max_weight = { low = 1.5, high = 3.0 }\nmax_weight_position = { low = 0.0, high = 1.0 }\ndirection_index = { low = 0.0, high = 0.5 }\nmin_weight_distance = { low = 0.5, high = 1.0 }\n")
config.write_text(config.read_text().replace("train[150:174]", "train[:24]"))
print(__import__("heretic_like.study").__file__, file=sys.stderr)
run = run_study(load_settings(str(config)))
rows = [{"n": t.number, "state": t.state.name, "params": t.params, "values": t.values,
         "refusals": t.user_attrs.get("refusals"), "kl": t.user_attrs.get("kl_divergence")} for t in run.study.trials]
print(json.dumps(rows, sort_keys=True))
