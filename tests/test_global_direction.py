"""The global direction (search.global_direction): one early layer's direction removed from what
every layer writes, at one strength, on top of the kernels."""

import optuna
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from heretic_like.ablation import Abliterator, Edit, EditOptions, GlobalDirection
from heretic_like.cli import main
from heretic_like.config import SearchSpace, default_data
from heretic_like.kernel import Kernel
from heretic_like.model import load_model
from heretic_like.search import sample_edit
from tests.conftest import study_config
from tests.test_ablation import PROMPTS, _logits, geometry_for
from tests.test_model import settings_for
from tests.test_second_peak import fixed_kernels

COMPONENTS = ["attn.o_proj", "mlp.down_proj"]
OFF = {c: Kernel(0.0, 3.0, 0.0, 1.0) for c in COMPONENTS}  # kernels that edit nothing
MAIN = {"attn.o_proj": Kernel(1.0, 3.0, 0.5, 1.0), "mlp.down_proj": Kernel(1.2, 3.0, 0.4, 1.0)}


@pytest.mark.parametrize("weight", [1.0, 0.4])
def test_the_global_direction_alone_is_removed_from_every_layers_writes(tiny_llama, tmp_path, weight):
    geometry = geometry_for(4)
    loaded = load_model(settings_for(tiny_llama, tmp_path))
    originals = {(t.component, t.layer): t.weight.detach().float().clone() for t in loaded.targets()}
    abliterator = Abliterator(loaded, COMPONENTS, geometry, EditOptions(global_direction=True))
    assert abliterator.rank == 2
    abliterator.apply(Edit(3.0, OFF, global_direction=GlobalDirection(0.5, weight)))
    abliterator.merged_model()
    r = F.normalize(geometry.directions[0] + geometry.directions[1], dim=0)  # index 0.5: halfway, renormalised
    for target in loaded.targets():
        before = originals[(target.component, target.layer)]
        # every layer, both components: what it writes along r is scaled by 1 - weight
        assert torch.allclose(r @ target.weight.float(), (1 - weight) * (r @ before), atol=1e-5)


def test_stacked_on_the_kernels_lora_hooks_and_merged_weights_agree(tiny_llama, tmp_path):
    geometry = geometry_for(4)
    edit = Edit(3.0, MAIN, global_direction=GlobalDirection(1.0, 0.7))
    lora = load_model(settings_for(tiny_llama, tmp_path))
    base = _logits(lora, PROMPTS)
    editor = Abliterator(lora, COMPONENTS, geometry, EditOptions(global_direction=True))
    editor.apply(edit)
    with_lora = _logits(lora, PROMPTS)
    hooked = load_model(settings_for(tiny_llama, tmp_path))
    Abliterator(hooked, COMPONENTS, geometry, EditOptions(mode="hooks", global_direction=True)).apply(edit)
    assert not torch.allclose(with_lora, base, atol=1e-3)
    assert torch.allclose(_logits(hooked, PROMPTS), with_lora, atol=1e-4)
    # by hand: where the kernel edits a layer, the global direction removes only what it adds beyond m
    reference = load_model(settings_for(tiny_llama, tmp_path))
    m, g = geometry.directions[3], geometry.directions[1]
    with torch.no_grad():
        for target in reference.targets():
            w, w1 = target.weight.float().clone(), float(MAIN[target.component].weights(4)[target.layer])
            u = F.normalize(g - (g @ m) * m, dim=0) if w1 else g
            target.weight.copy_(w - w1 * torch.outer(m, m @ w) - 0.7 * torch.outer(u, u @ w))
    assert torch.allclose(_logits(reference, PROMPTS), with_lora, atol=1e-4)
    editor.merged_model()
    assert torch.allclose(_logits(lora, PROMPTS), with_lora, atol=1e-4)


def test_records_keep_it_and_an_editor_without_it_refuses_it(tiny_llama, tmp_path):
    edit = Edit(3.0, MAIN, global_direction=GlobalDirection(1.5, 0.3))
    assert Edit.from_dict(edit.to_dict()) == edit
    assert "global_direction" not in Edit(3.0, MAIN).to_dict()  # earlier records stay as they were
    assert Edit.from_dict(Edit(3.0, MAIN).to_dict()).global_direction is None
    plain = Abliterator(load_model(settings_for(tiny_llama, tmp_path)), COMPONENTS, geometry_for(4))
    with pytest.raises(ValueError, match="search.global_direction"):
        plain.apply(edit)
    assert plain.current is None


def test_it_is_sampled_only_when_switched_on_in_layer_units():
    space, geometry, params = fixed_kernels()
    assert sample_edit(optuna.trial.FixedTrial(params), space, geometry).global_direction is None
    on = space.model_copy(update={"global_direction": True})
    extra = {"global_direction.index": 4.0, "global_direction.weight": 0.5}
    assert sample_edit(optuna.trial.FixedTrial({**params, **extra}), on, geometry).global_direction == \
        GlobalDirection(4.0, 0.5)  # fmt: skip
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    sample_edit(trial, on, geometry)
    index = trial.distributions["global_direction.index"]  # fractions of the last layer index, 24
    assert (index.low, index.high) == pytest.approx((0.1 * 24, 0.5 * 24))


def test_a_bad_range_is_named():
    data = default_data()["search"]
    with pytest.raises(ValueError, match="global_direction_index must lie within"):
        SearchSpace(**{**data, "global_direction_index": {"low": 0.1, "high": 1.5}})
    with pytest.raises(ValueError, match="global_direction_weight.low must be >= 0"):
        SearchSpace(**{**data, "global_direction_weight": {"low": -0.1, "high": 1.0}})


def test_a_study_with_it_reports_and_exports_it(tiny_llama, tmp_path):
    config = study_config(tmp_path, tiny_llama, n_trials=1, n_startup_trials=1,
                          search="global_direction = true\ndirection_scope = [\"global\"]\n"
                                 "global_direction_weight = { low = 0.6, high = 0.6 }\n")  # fmt: skip
    assert main(["--config", str(config)]) == 0
    (journal,) = (tmp_path / "checkpoints").glob("*.journal")
    report = tmp_path / "report"
    assert main(["report", "--study", str(journal), "--out", str(report)]) == 0
    table = pd.read_csv(report / "trials.csv")
    assert table.loc[0, "global_direction.weight"] == 0.6
    assert 0.1 * 3 <= table.loc[0, "global_direction.index"] <= 0.5 * 3  # tiny_llama: 4 layers
    merged = tmp_path / "merged"
    assert main(["export", "--study", str(journal), "--trial", "0", "--out", str(merged)]) == 0
    assert (merged / "model.safetensors").is_file()
    assert "| global_direction.weight | 0.600 |" in (merged / "README.md").read_text()  # the model card
