"""The second peak (search.second_peak): a middle-layer edit along each layer's own direction."""

from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from heretic_like.ablation import Abliterator, Edit, EditOptions, stack_edits
from heretic_like.cli import main
from heretic_like.config import SearchSpace, default_data
from heretic_like.kernel import Kernel
from heretic_like.model import load_model, peft_quietly
from heretic_like.search import sample_edit
from tests.conftest import study_config
from tests.test_ablation import PROMPTS, _logits, geometry_for
from tests.test_export import _logits as export_logits
from tests.test_model import settings_for

COMPONENTS = ["attn.o_proj", "mlp.down_proj"]
# 4 layers: the main edit (direction of layer 3) reaches layers 2-3, the second peak layers 0-2
MAIN = {"attn.o_proj": Kernel(1.0, 3.0, 0.5, 1.0), "mlp.down_proj": Kernel(1.2, 3.0, 0.4, 1.0)}
SECOND = Kernel(0.9, 1.0, 0.0, 1.5)


def test_stacked_edits_stay_orthonormal_and_keep_the_first_edit():
    g = torch.Generator().manual_seed(0)
    first = F.normalize(torch.randn(1, 16, generator=g), dim=1)
    own = F.normalize(first + 0.5 * torch.randn(1, 16, generator=g), dim=1)  # overlaps the first
    basis, strengths = stack_edits((first, torch.tensor([1.2])), (own, torch.tensor([0.7])))
    assert torch.allclose(basis @ basis.T, torch.eye(2), atol=1e-5)
    assert torch.equal(basis[0], first[0]) and strengths.tolist() == pytest.approx([1.2, 0.7])
    # the second row spans what `own` adds beyond the first
    assert torch.allclose(torch.linalg.matrix_rank(torch.cat([basis, own])), torch.tensor(2))
    # the same direction twice adds a zero row: nothing more is removed
    same, _ = stack_edits((first, torch.tensor([1.0])), (first, torch.tensor([0.5])))
    assert torch.equal(same[1], torch.zeros(16))
    assert stack_edits(None, (own, torch.tensor([0.7])))[0] is own
    assert stack_edits((first, torch.tensor([1.0])), None)[0] is first


def test_second_peak_edits_the_middle_layers_along_their_own_directions(tiny_llama, tmp_path):
    geometry = geometry_for(4)
    edit = Edit(3.0, MAIN, second_peak=SECOND)
    loaded = load_model(settings_for(tiny_llama, tmp_path))
    base = _logits(loaded, PROMPTS)
    abliterator = Abliterator(loaded, COMPONENTS, geometry, EditOptions(second_peak=True))
    assert abliterator.rank == 2
    abliterator.apply(edit)
    lora = _logits(loaded, PROMPTS)

    main, second = MAIN, SECOND.weights(4)
    assert second.tolist() == pytest.approx([0.3, 0.9, 0.3, 0.0])
    reference = load_model(settings_for(tiny_llama, tmp_path))
    with torch.no_grad():
        for target in reference.targets():
            w, layer = target.weight.float().clone(), target.layer
            m, w1, w2 = geometry.directions[3], float(main[target.component].weights(4)[layer]), float(second[layer])
            own = geometry.directions[layer]
            # where both reach: only what the layer's own direction adds beyond m; elsewhere itself
            u = F.normalize(own - (own @ m) * m, dim=0) if w1 else own
            expected = w - w1 * torch.outer(m, m @ w) - w2 * torch.outer(u, u @ w)
            target.weight.copy_(expected)
            if w1 == 0.0 and w2 > 0:  # only the second peak: nothing left along the layer's own direction
                assert torch.allclose(own @ expected, (1 - w2) * (own @ w), atol=1e-5)
    assert not torch.allclose(lora, base, atol=1e-3)
    assert torch.allclose(lora, _logits(reference, PROMPTS), atol=1e-4)
    # the merged weights are the same edit, exactly
    abliterator.merged_model()
    assert torch.allclose(_logits(loaded, PROMPTS), lora, atol=1e-4)


def test_second_peak_in_hooks_mode_and_records(tiny_llama, tmp_path):
    geometry = geometry_for(4)
    edit = Edit(3.0, MAIN, second_peak=SECOND)
    lora = load_model(settings_for(tiny_llama, tmp_path))
    Abliterator(lora, COMPONENTS, geometry, EditOptions(second_peak=True)).apply(edit)
    hooked = load_model(settings_for(tiny_llama, tmp_path))
    Abliterator(hooked, COMPONENTS, geometry, EditOptions(mode="hooks", second_peak=True)).apply(edit)
    assert torch.allclose(_logits(hooked, PROMPTS), _logits(lora, PROMPTS), atol=1e-4)

    assert Edit.from_dict(edit.to_dict()) == edit
    assert "second_peak" not in Edit(3.0, MAIN).to_dict()  # one-peak records stay as before
    assert Edit.from_dict(Edit(3.0, MAIN).to_dict()).second_peak is None
    # an editor set up without the second peak has no LoRA rank for it: a clear error, nothing edited
    plain = Abliterator(load_model(settings_for(tiny_llama, tmp_path)), COMPONENTS, geometry)
    with pytest.raises(ValueError, match="search.second_peak"):
        plain.apply(edit)
    assert plain.current is None


def fixed_kernels():
    """The default search space (best layer: no direction parameter), a 25-layer geometry, and
    fixed kernel parameters for every component: what a FixedTrial needs besides an option's own."""
    space = SearchSpace(**{**default_data()["search"], "direction_scope": ["best_layer"]})
    values = {"max_weight": 1.0, "min_weight_fraction": 0.5, "max_weight_position": 20.0, "min_weight_distance": 5.0}
    return space, geometry_for(25), {f"{c}.{name}": v for c in space.components for name, v in values.items()}


def test_second_peak_is_sampled_only_when_switched_on():
    space, geometry, params = fixed_kernels()
    assert sample_edit(optuna.trial.FixedTrial(params), space, geometry).second_peak is None
    on = space.model_copy(update={"second_peak": True})
    peak = {"second_peak.max_weight": 0.6, "second_peak.max_weight_position": 10.0,
            "second_peak.min_weight_distance": 3.0}  # fmt: skip
    edit = sample_edit(optuna.trial.FixedTrial({**params, **peak}), on, geometry)
    assert edit.second_peak == Kernel(0.6, 10.0, 0.0, 3.0)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    sample_edit(trial, on, geometry)
    position = trial.distributions["second_peak.max_weight_position"]  # fractions of the last layer index, 24
    assert (position.low, position.high) == pytest.approx((0.25 * 24, 0.55 * 24))
    distance = trial.distributions["second_peak.min_weight_distance"]
    assert (distance.low, distance.high) == pytest.approx((0.05 * 24, 0.25 * 24))


def test_a_study_with_a_second_peak_exports_merged_and_adapter_alike(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = study_config(tmp_path, tiny_llama, n_trials=1, n_startup_trials=1,
                          search="second_peak = true\ndirection_scope = [\"global\"]\n"
                                 "second_peak_weight = { low = 0.8, high = 0.8 }\n")  # fmt: skip
    assert main(["--config", str(config)]) == 0
    (journal,) = (tmp_path / "checkpoints").glob("*.journal")
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    assert main(["export", "--study", str(journal), "--trial", "0", "--out", str(merged)]) == 0
    assert main(["export", "--study", str(journal), "--trial", "0", "--out", str(adapter),
                 "--export-strategy", "adapter"]) == 0  # fmt: skip
    assert "second_peak.max_weight" in (merged / "README.md").read_text()
    # the report's trials table and kernel plot carry the second peak beside the components' kernels
    report = tmp_path / "report"
    assert main(["report", "--study", str(journal), "--out", str(report), "--trial", "0"]) == 0
    table = pd.read_csv(report / "trials.csv")
    assert table.loc[0, "second_peak.max_weight"] == 0.8
    assert {f"{c}.max_weight" for c in COMPONENTS} <= set(table.columns)
    assert (report / "kernels_trial0.png").stat().st_size > 0
    tokenizer = AutoTokenizer.from_pretrained(merged)
    merged_logits = export_logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), tokenizer)
    base = AutoModelForCausalLM.from_pretrained(Path(tiny_llama), dtype=torch.float32)
    with peft_quietly():  # peft asks transformers for a deprecated property, not our code
        with_adapter = export_logits(PeftModel.from_pretrained(base, adapter), tokenizer)
    assert torch.allclose(with_adapter, merged_logits, atol=1e-4)
