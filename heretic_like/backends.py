"""Ways of putting an edit into a loaded model, one small object each (peft's `LoraVariant` idea):

- `LoraBackend`: a peft LoRA on every targeted Linear, its factors swapped per trial;
- `HookBackend`: forward hooks projecting the directions out of what each module writes;
- `FusedBackend`: MoE experts stored as one (experts, out, in) tensor, which no LoRA wraps,
  edited exactly in place from an original kept on the CPU.

Each has `clear` (back to the unedited model), `set` (one module's edit) and `release` (drop the
mechanism and hand back the plain model; `Abliterator.merged_model` then writes exact weights).
`Abliterator` picks a backend per target and never branches on the mode itself.
"""

from __future__ import annotations

from typing import Protocol

from torch import nn

from .hooks import ProjectionHooks
from .model import LoadedModel, Target, peft_quietly
from .projection import Step, composed_factors, composed_weight, low_rank_factors


class Approximation(Protocol):
    """How well a trial-time LoRA matches the exact edit (`ablation.EditStats`)."""

    approximation_error: float
    row_norm_error: float


class EditBackend(Protocol):
    def clear(self) -> None: ...

    def set(self, target: Target, steps: list[Step], stats: Approximation) -> None: ...

    def release(self, model: nn.Module) -> nn.Module: ...


class LoraBackend:
    """A peft LoRA of `rank` on the Linear targets. Exact for "none"/"pre" (the edit is low-rank);
    for "full" the best rank-`rank` approximation, its error recorded per trial."""

    def __init__(self, loaded: LoadedModel, components: list[str], rank: int):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none",
                            target_modules=loaded.target_names(components))  # fmt: skip
        with peft_quietly():
            self.peft_model = get_peft_model(loaded.model, config)
        self.peft_model.eval()
        self.rank = rank
        self.modules = [t.module for t in loaded.targets(components) if not t.fused]  # as wrapped

    def clear(self) -> None:
        for module in self.modules:
            module.lora_B["default"].weight.zero_()

    def set(self, target: Target, steps: list[Step], stats: Approximation) -> None:
        weight = target.weight
        if any(row_normalization == "full" for _, _, row_normalization, _ in steps):
            w = weight.float()
            delta = composed_weight(w, steps) - w
            a, b = low_rank_factors(delta, self.rank)
            approx_delta = b @ a
            error = float((delta - approx_delta).norm() / delta.norm().clamp_min(1e-12))
            stats.approximation_error = max(stats.approximation_error, error)
            original = w.norm(dim=1)
            deviation = (((w + approx_delta).norm(dim=1) - original).abs() / original.clamp_min(1e-12)).max()
            stats.row_norm_error = max(stats.row_norm_error, float(deviation))
        else:
            a, b = composed_factors(weight, steps)
        lora_a, lora_b = target.module.lora_A["default"].weight, target.module.lora_B["default"].weight
        lora_a.zero_()
        lora_a[: a.shape[0]].copy_(a.to(lora_a.dtype))
        lora_b[:, : b.shape[1]].copy_(b.to(lora_b.dtype))

    def release(self, model: nn.Module) -> nn.Module:
        """The base model, the LoRA dropped unmerged (see `Abliterator.merged_model` for why)."""
        return self.peft_model.unload()

    def save(self, folder) -> None:
        """The adapter alone (`PeftModel.from_pretrained(base, folder)`)."""
        self.peft_model.save_pretrained(folder)


class HookBackend:
    """Forward hooks on the Linear targets: the same edit as "none", no weight touched."""

    def __init__(self):
        self.hooks = ProjectionHooks()

    def clear(self) -> None:
        self.hooks.clear()

    def set(self, target: Target, steps: list[Step], stats: Approximation) -> None:
        (basis, strengths, _, kept), *more = steps
        if kept is not None or more:  # an output hook cannot see which inputs to leave alone
            raise ValueError("edit_mode = 'hooks' edits in one unconfined step (preserved_input_rank = 0)")
        self.hooks.set(target.module, basis, strengths)

    def release(self, model: nn.Module) -> nn.Module:
        self.hooks.remove()
        return model


class FusedBackend:
    """Fused MoE expert weights, every expert edited exactly in place from a CPU original."""

    def __init__(self, targets: list[Target]):
        self.targets = targets
        self.originals = {t.name: t.weight.detach().to("cpu", copy=True) for t in targets}

    def clear(self) -> None:
        for target in self.targets:
            target.weight.copy_(self.originals[target.name])

    def set(self, target: Target, steps: list[Step], stats: Approximation) -> None:
        if any(kept is not None for *_, kept in steps):  # each expert reads other inputs: one basis does not fit
            raise ValueError("fused expert weights cannot be confined (preserved_input_rank)")
        weight = target.weight
        for e, original in enumerate(self.originals[target.name]):
            w = original.to(weight.device).float()
            w = w.T if target.transposed else w
            new = composed_weight(w, steps)
            weight[e].copy_((new.T if target.transposed else new).to(weight.dtype))

    def release(self, model: nn.Module) -> nn.Module:
        return model  # the weights already hold the exact edit
