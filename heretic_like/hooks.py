"""Inference-time mode: project refusal directions out of what each module writes, with hooks.

No weight changes and nothing to undo but removing the hooks. Because `o_proj` and `down_proj`
write straight into the residual stream, projecting their outputs, out <- out - sum_j w_j v_j
v_j^T (out - bias), is mathematically the same as the weight edit W <- W - sum_j w_j v_j v_j^T W
(row_normalization = "none"); the tests check that to fp32 tolerance. It is also cheaper than a
LoRA (no A x product per token), which makes it a fast way to run trials.
"""

from __future__ import annotations

import torch
from torch import nn


class ProjectionHooks:
    """One forward hook per edited module; `set` changes what it removes, `clear` disables all."""

    def __init__(self) -> None:
        self.handles: dict[nn.Module, torch.utils.hooks.RemovableHandle] = {}
        self.active: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def set(self, module: nn.Module, basis: torch.Tensor, strengths: torch.Tensor) -> None:
        weight = module.weight
        self.active[module] = (basis.to(weight.device, torch.float32), strengths.to(weight.device, torch.float32))
        if module not in self.handles:
            self.handles[module] = module.register_forward_hook(self._hook)

    def clear(self) -> None:
        self.active.clear()

    def remove(self) -> None:
        for handle in self.handles.values():
            handle.remove()
        self.handles.clear()
        self.active.clear()

    def _hook(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor | None:
        entry = self.active.get(module)
        if entry is None:
            return None
        basis, strengths = entry
        written = output.float()
        if getattr(module, "bias", None) is not None:
            written = written - module.bias.float()
        removed = ((written @ basis.T) * strengths) @ basis
        return (output.float() - removed).to(output.dtype)
