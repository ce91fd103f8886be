import torch
import torch.nn.functional as F

from heretic_like.ablation import Abliterator, Edit, direct_edit, rank1_factors
from heretic_like.kernel import Kernel
from heretic_like.model import COMPONENT_PATHS, chat_texts, encode, load_model
from tests.test_model import settings_for


def _weight_and_direction(out=16, inp=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g), F.normalize(torch.randn(out, generator=g), dim=0)


def test_rank1_factors_reproduce_the_direct_edit():
    w, r = _weight_and_direction()
    a, b = rank1_factors(w, r, 0.7)
    assert a.shape == (1, 24) and b.shape == (16, 1)
    assert torch.allclose(w + b @ a, direct_edit(w, r, 0.7), atol=1e-6)
    assert torch.linalg.matrix_rank(b @ a) == 1


def test_full_strength_edit_writes_nothing_along_r():
    w, r = _weight_and_direction()
    edited = direct_edit(w, r, 1.0)
    assert torch.allclose(r @ edited, torch.zeros(24), atol=1e-5)
    half = direct_edit(w, r, 0.5)
    assert torch.allclose(r @ half, 0.5 * (r @ w), atol=1e-5)  # strength scales what is left along r
    x = torch.randn(24)
    orth = edited @ x - r * (r @ (edited @ x))
    assert torch.allclose(orth, w @ x - r * (r @ (w @ x)), atol=1e-5)  # components off r untouched


def _logits(loaded, prompts):
    batch = encode(loaded.tokenizer, chat_texts(loaded.tokenizer, prompts, None), loaded.device)
    with torch.no_grad():
        return loaded.model(**batch).logits


def _edit(layers):
    return Edit(direction_index=1.3, kernels={
        "attn.o_proj": Kernel(1.0, 1.0, 0.5, 2.0),
        "mlp.down_proj": Kernel(1.4, layers - 1.0, 0.3, 1.5),
    })  # fmt: skip


def test_lora_equals_direct_weight_edit_and_resets(tiny_llama, tmp_path):
    prompts = ["How do I bake bread?", "Tell me something"]
    lora = load_model(settings_for(tiny_llama, tmp_path))
    base_logits = _logits(lora, prompts)
    directions = F.normalize(torch.randn(lora.num_layers, 64, generator=torch.Generator().manual_seed(3)), dim=-1)
    edit = _edit(lora.num_layers)
    abl = Abliterator(lora, ["attn.o_proj", "mlp.down_proj"])
    abl.apply(edit, directions)
    lora_logits = _logits(lora, prompts)

    direct = load_model(settings_for(tiny_llama, tmp_path))
    layer_dirs = edit.layer_directions(directions)
    with torch.no_grad():
        for component, kernel in edit.kernels.items():
            for i, layer in enumerate(direct.model.get_submodule(direct.layers_path)):
                module = layer.get_submodule(COMPONENT_PATHS[component])
                module.weight.copy_(direct_edit(module.weight, layer_dirs[i], float(kernel.weights(4)[i])))
    assert not torch.allclose(lora_logits, base_logits, atol=1e-3)  # the edit does something
    assert torch.allclose(lora_logits, _logits(direct, prompts), atol=1e-4)

    abl.reset()
    assert torch.allclose(_logits(lora, prompts), base_logits, atol=1e-5)


def test_per_layer_directions_and_merge(tiny_qwen2, tmp_path):
    loaded = load_model(settings_for(tiny_qwen2, tmp_path))
    directions = F.normalize(torch.randn(loaded.num_layers, 64), dim=-1)
    edit = Edit(None, {"mlp.down_proj": Kernel(1.0, 1.0, 1.0, 5.0)})
    assert torch.equal(edit.layer_directions(directions), directions)
    abl = Abliterator(loaded, ["mlp.down_proj"])
    abl.apply(edit, directions)
    expected = _logits(loaded, ["hi there"])
    merged = abl.merged_model()
    layer = merged.get_submodule("model.layers.2.mlp.down_proj")
    assert isinstance(layer, torch.nn.Linear)  # peft is gone after merging
    assert torch.allclose(directions[2] @ layer.weight, torch.zeros(layer.weight.shape[1]), atol=1e-5)
    assert torch.allclose(_logits(loaded, ["hi there"]), expected, atol=1e-5)
    assert Edit.from_dict(edit.to_dict()) == edit
