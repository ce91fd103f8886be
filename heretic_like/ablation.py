"""The edit: W <- W - w * r * (r^T W) on every targeted module, carried as a rank-1 peft LoRA.

Every trial only rewrites the small LoRA factors (A = r^T W, B = -w r), so the model is loaded
and wrapped once; exporting merges the same factors into the weights with peft.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .directions import interpolate_direction
from .kernel import Kernel
from .model import LoadedModel


@dataclass(frozen=True)
class Edit:
    """One trial's edit, in absolute layer units. `direction_index` None means per-layer directions."""

    direction_index: float | None
    kernels: dict[str, Kernel]

    def to_dict(self) -> dict:
        return {"direction_index": self.direction_index, "kernels": {c: asdict(k) for c, k in self.kernels.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> Edit:
        return cls(data["direction_index"], {c: Kernel(**k) for c, k in data["kernels"].items()})

    def layer_directions(self, directions: torch.Tensor) -> torch.Tensor:
        """(n_layers, d): the direction each layer's edit removes."""
        if self.direction_index is None:
            return directions
        return interpolate_direction(directions, self.direction_index).expand_as(directions)


def rank1_factors(weight: torch.Tensor, direction: torch.Tensor, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (A: 1 x in, B: out x 1) with B @ A = -strength * r r^T W, in fp32."""
    r = direction.float().to(weight.device)
    a = (r @ weight.float()).unsqueeze(0)
    b = (-strength * r).unsqueeze(1)
    return a, b


def direct_edit(weight: torch.Tensor, direction: torch.Tensor, strength: float) -> torch.Tensor:
    """The same edit applied to the weight itself (reference for tests and a sanity check)."""
    r = direction.float()
    w = weight.float()
    return w - strength * torch.outer(r, r @ w)


class Abliterator:
    """Holds the peft-wrapped model and swaps the LoRA factors for each trial."""

    def __init__(self, loaded: LoadedModel, components: list[str]):
        from peft import LoraConfig, get_peft_model

        self.loaded = loaded
        self.components = list(components)
        config = LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, bias="none",
                            target_modules=loaded.target_names(self.components))  # fmt: skip
        self.peft_model = get_peft_model(loaded.model, config)
        self.peft_model.eval()
        layers = loaded.model.get_submodule(loaded.layers_path)
        from .model import COMPONENT_PATHS

        self.modules: dict[str, list[nn.Module]] = {
            c: [layer.get_submodule(COMPONENT_PATHS[c]) for layer in layers] for c in self.components
        }
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the unedited model (B = 0)."""
        for modules in self.modules.values():
            for module in modules:
                module.lora_B["default"].weight.zero_()

    @torch.no_grad()
    def apply(self, edit: Edit, directions: torch.Tensor) -> None:
        per_layer = edit.layer_directions(directions)
        for component, modules in self.modules.items():
            strengths = edit.kernels[component].weights(len(modules)) if component in edit.kernels else None
            for i, module in enumerate(modules):
                lora_a, lora_b = module.lora_A["default"].weight, module.lora_B["default"].weight
                strength = 0.0 if strengths is None else float(strengths[i])
                if strength == 0.0:
                    lora_b.zero_()
                    continue
                a, b = rank1_factors(module.base_layer.weight, per_layer[i], strength)
                lora_a.copy_(a.to(lora_a.dtype))
                lora_b.copy_(b.to(lora_b.dtype))

    def merged_model(self) -> nn.Module:
        """Fold the current factors into the weights and drop peft (consumes the wrapper)."""
        return self.peft_model.merge_and_unload()
