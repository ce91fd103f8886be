"""Mixture-of-experts models: the edit reaches every expert, fused 3-D expert tensors included."""

import pytest
import torch
from torch import nn

from heretic_like.ablation import Abliterator, Edit, EditOptions
from heretic_like.cli import main
from heretic_like.kernel import Kernel
from heretic_like.model import find_targets, load_model
from heretic_like.projection import edited_weight
from tests.conftest import study_config
from tests.test_ablation import PROMPTS, _logits, geometry_for
from tests.test_model import settings_for

FLAT = Edit(direction_index=0.0, kernels={"attn.o_proj": Kernel(1.0, 0.0, 1.0, 5.0),
                                          "mlp.down_proj": Kernel(1.0, 0.0, 1.0, 5.0)})  # fmt: skip


@pytest.mark.parametrize("fixture, shared", [("tiny_mixtral", False), ("tiny_qwen2_moe", True)])
@pytest.mark.parametrize("normalization", ["none", "full"])
def test_edit_reaches_every_expert_exactly_and_resets(request, tmp_path, fixture, shared, normalization):
    loaded = load_model(settings_for(request.getfixturevalue(fixture), tmp_path))
    fused = [t for t in loaded.targets() if t.fused]
    assert [t.layer for t in fused] == [0, 1] and all(t.count == 4 for t in fused)
    assert any("shared_expert" in t.name for t in loaded.targets()) is shared
    originals = {t.name: t.weight.detach().clone() for t in loaded.targets()}
    base = _logits(loaded, PROMPTS)
    geometry = geometry_for(2, k=1)
    abl = Abliterator(loaded, ["attn.o_proj", "mlp.down_proj"], geometry, EditOptions(row_normalization=normalization))
    stats = abl.apply(FLAT)  # strength 1 everywhere, layer 0's direction
    assert stats.modules["mlp.down_proj"] == 2 * (4 + shared)  # every expert of every layer (+ shared)
    v = geometry.directions[0]
    for target in fused:
        for e in range(4):
            expected = edited_weight(originals[target.name][e], v[None], torch.ones(1), normalization)
            assert torch.allclose(target.weight[e], expected, atol=1e-6)
            if normalization == "none":  # nothing is written along the direction any more
                written = v.to(target.weight.device) @ target.weight[e]
                assert torch.allclose(written, torch.zeros_like(written), atol=1e-5)
            else:  # every row keeps its norm
                assert torch.allclose(target.weight[e].norm(dim=1), originals[target.name][e].norm(dim=1), rtol=1e-5)
    assert not torch.allclose(_logits(loaded, PROMPTS), base, atol=1e-4)
    abl.reset()
    assert all(torch.equal(t.weight, originals[t.name]) for t in abl.targets if t.fused)
    assert torch.allclose(_logits(loaded, PROMPTS), base, atol=1e-6)


def test_moe_study_exports_weights_with_every_expert_edited(tiny_qwen2_moe, tmp_path):
    from transformers import AutoModelForCausalLM

    config = study_config(tmp_path, tiny_qwen2_moe, n_trials=2, n_startup_trials=2, export_trial=0,
                          prune_dominated="false", evaluate_capabilities="false",
                          export_dir=f'"{tmp_path / "export"}"',
                          search="min_weight_distance = { low = 1.0, high = 1.0 }\n"
                          "max_weight_position = { low = 0.0, high = 1.0 }\n")  # every layer edited
    assert main(["--config", str(config)]) == 0
    original = AutoModelForCausalLM.from_pretrained(tiny_qwen2_moe, dtype=torch.float32)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32)
    for layer_before, layer_after in zip(original.model.layers, exported.model.layers, strict=True):
        before, after = layer_before.mlp.experts.down_proj, layer_after.mlp.experts.down_proj
        assert all(not torch.equal(before[e], after[e]) for e in range(4))  # each expert changed
        assert not torch.equal(layer_before.mlp.shared_expert.down_proj.weight,
                               layer_after.mlp.shared_expert.down_proj.weight)  # fmt: skip
    # and the adapter strategy, which cannot hold in-place expert edits, says so in one line
    (journal,) = (tmp_path / "checkpoints").glob("*.journal")
    assert main(["export", "--study", str(journal), "--trial", "0", "--out", str(tmp_path / "a"),
                 "--export-strategy", "adapter"]) == 2  # fmt: skip


class _OddExperts(nn.Module):
    """Experts kept in a layout we do not know: must be reported, not skipped silently."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return self.inner(*args)


def test_unrecognised_experts_are_warned_about(tiny_qwen2_moe, tmp_path, capsys):
    loaded = load_model(settings_for(tiny_qwen2_moe, tmp_path))
    layer = loaded.model.model.layers[1]
    layer.mlp.experts = _OddExperts(layer.mlp.experts)
    targets, warnings = find_targets(loaded.model, loaded.layers_path)
    assert not any(t.fused and t.layer == 1 for t in targets)
    assert warnings == ["layer 1: experts _OddExperts at model.layers.1.mlp.experts store no down_proj/w2 we "
                        "recognise: NOT edited"]  # fmt: skip
    Abliterator(loaded, ["attn.o_proj", "mlp.down_proj"], geometry_for(2))
    assert "WARNING: layer 1: experts _OddExperts" in capsys.readouterr().err
