"""The edit: remove refusal directions from what each targeted module writes, W <- W - w v v^T W.

The maths is a handful of pure functions on one weight matrix and a (k, d_out) orthonormal basis
of directions with per-direction strengths:

- `row_normalization = "none"`: the classic projection, exactly a rank-k LoRA (A = V W,
  B = -V^T diag(w)).
- `"pre"`: the same projection applied to the row-normalised weight, then scaled back by each
  row's norm; still an exact rank-k LoRA.
- `"full"`: norm-preserving: the projected row directions are renormalised and recombined with
  the original row norms, so every row keeps its norm exactly. That is no longer low-rank: trials
  use the best rank-`full_normalization_lora_rank` approximation (reporting its error), export
  writes the exact weights.

`Abliterator` holds the model, wrapped once (peft LoRA, or forward hooks in "hooks" mode), and
swaps the factors for each trial without reloading anything.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .directions import RefusalGeometry, biproject, interpolate_direction, orthonormalize
from .kernel import Kernel
from .model import LoadedModel, Target, peft_quietly

# ----------------------------------------------------------------------------- pure maths


def subspace_factors(weight: torch.Tensor, basis: torch.Tensor, strengths: torch.Tensor,
                     row_normalization: str = "none") -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """LoRA factors (A: k x in, B: out x k), fp32, with B @ A the "none" or "pre" edit's delta."""
    w = weight.float()
    v = basis.float().to(w.device)
    s = strengths.float().to(w.device)
    if row_normalization == "pre":
        norms = w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return v @ (w / norms), -(norms * v.T * s)
    if row_normalization != "none":
        raise ValueError(f"no exact low-rank factors for row_normalization={row_normalization!r}")
    return v @ w, -(v.T * s)


def rank1_factors(weight: torch.Tensor, direction: torch.Tensor, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The classic single-direction edit: B @ A = -strength * r r^T W."""
    return subspace_factors(weight, direction[None], torch.tensor([strength]))


def direct_edit(weight: torch.Tensor, direction: torch.Tensor, strength: float) -> torch.Tensor:
    """W - strength * r r^T W computed on the weight itself (a reference for tests)."""
    w = weight.float()
    r = direction.float().to(w.device)
    return w - strength * torch.outer(r, r @ w)


def edited_weight(weight: torch.Tensor, basis: torch.Tensor, strengths: torch.Tensor,
                  row_normalization: str = "none") -> torch.Tensor:  # fmt: skip
    """The exact edited weight (fp32) for any row normalisation.

    "full" follows the norm-preserving recipe: split W into row norms and unit row directions,
    project the directions, renormalise them, and recombine with the original norms.
    """
    if row_normalization != "full":
        a, b = subspace_factors(weight, basis, strengths, row_normalization)
        return weight.float() + b @ a
    w = weight.float()
    v = basis.float().to(w.device)
    norms = w.norm(dim=1, keepdim=True)
    unit = w / norms.clamp_min(1e-12)
    projected = unit - (v.T * strengths.float().to(w.device)) @ (v @ unit)
    return norms * torch.nn.functional.normalize(projected, dim=1)


def low_rank_factors(delta: torch.Tensor, rank: int, oversample: int = 8, iterations: int = 2,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Best rank-`rank` approximation B @ A of `delta` (randomised SVD with a fixed seed, so the
    same inputs always give the same factors; torch.svd_lowrank takes no generator)."""
    delta = delta.float()
    out_dim, in_dim = delta.shape
    if min(out_dim, in_dim) <= rank + oversample:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    else:
        generator = torch.Generator(device=delta.device).manual_seed(seed)
        omega = torch.randn(in_dim, rank + oversample, generator=generator, device=delta.device)
        q = torch.linalg.qr(delta @ omega).Q
        for _ in range(iterations):
            q = torch.linalg.qr(delta @ (delta.T @ q)).Q
        u_small, s, vh = torch.linalg.svd(q.T @ delta, full_matrices=False)
        u = q @ u_small
    return vh[:rank], u[:, :rank] * s[:rank]


# ----------------------------------------------------------------------------- the edit


@dataclass(frozen=True)
class EditOptions:
    """Settings that shape every trial's edit the same way (from the config, not sampled)."""

    row_normalization: str = "none"
    full_normalization_lora_rank: int = 3
    biproject: bool = False
    entanglement_threshold: float = 0.55
    mode: str = "lora"

    @classmethod
    def from_settings(cls, settings) -> EditOptions:
        return cls(settings.row_normalization, settings.full_normalization_lora_rank, settings.biproject_direction,
                   settings.entanglement_threshold, settings.edit_mode)  # fmt: skip


@dataclass(frozen=True)
class Edit:
    """One trial's edit, in absolute layer units.

    `direction_index` None means each layer uses its own directions; a float blends the two
    neighbouring layers' main directions (extra directions come from the nearest layer).
    `entangled_strength` scales directions whose capability entanglement exceeds the threshold.
    """

    direction_index: float | None
    kernels: dict[str, Kernel]
    entangled_strength: float = 1.0

    def to_dict(self) -> dict:
        return {"direction_index": self.direction_index, "entangled_strength": self.entangled_strength,
                "kernels": {c: asdict(k) for c, k in self.kernels.items()}}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict) -> Edit:
        kernels = {c: Kernel(**k) for c, k in data["kernels"].items()}
        return cls(data["direction_index"], kernels, data.get("entangled_strength", 1.0))

    def layer_directions(self, directions: torch.Tensor) -> torch.Tensor:
        """(n_layers, d): the main direction each layer's edit removes."""
        if self.direction_index is None:
            return directions
        return interpolate_direction(directions, self.direction_index).expand_as(directions)

    def layer_bases(self, geometry: RefusalGeometry, options: EditOptions) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer: ((k, d) orthonormal directions, (k,) strength multipliers)."""
        n = geometry.num_layers
        if self.direction_index is None:
            sources = list(range(n))
            bases = [geometry.subspace(layer) for layer in range(n)]
        else:
            source = min(max(round(self.direction_index), 0), n - 1)
            main = interpolate_direction(geometry.directions, self.direction_index)[None]
            basis = torch.cat([main, orthonormalize(geometry.extra[source], against=main)])
            sources, bases = [source] * n, [basis] * n
        if options.biproject:
            bases = [biproject(basis, geometry.harmless_mean[layer]) for layer, basis in enumerate(bases)]
        out = []
        for basis, source in zip(bases, sources, strict=True):
            entangled = geometry.entanglement[source] > options.entanglement_threshold  # NaN compares False
            out.append((basis, torch.where(entangled, self.entangled_strength, 1.0)))
        return out


@dataclass
class EditStats:
    """How faithfully the trial-time LoRA carries the edit (only "full" is approximate)."""

    approximation_error: float = 0.0  # max over modules of ||delta - lora|| / ||delta|| (Frobenius)
    row_norm_error: float = 0.0  # max relative deviation of a row norm from the original's
    modules: dict[str, int] = field(default_factory=dict)  # edited modules per component

    @property
    def modules_edited(self) -> int:
        return sum(self.modules.values())


class Abliterator:
    """Holds the wrapped model and swaps each trial's edit in and out.

    Linear targets get a peft LoRA (or forward hooks in "hooks" mode). Fused MoE expert weights,
    (experts, out, in) tensors no LoRA wraps, are edited in place, exactly, from an original kept
    on the CPU: every expert is edited, none skipped.
    """

    def __init__(self, loaded: LoadedModel, components: list[str], geometry: RefusalGeometry,
                 options: EditOptions | None = None):  # fmt: skip
        self.loaded = loaded
        self.components = list(components)
        self.geometry = geometry
        self.options = options or EditOptions()
        if self.options.mode == "hooks" and self.options.row_normalization != "none":
            raise ValueError("edit_mode = 'hooks' projects module outputs: it needs row_normalization = 'none'")
        for warning in loaded.target_warnings(self.components):
            print(f"WARNING: {warning}", file=sys.stderr)
        full = self.options.row_normalization == "full"
        self.rank = self.options.full_normalization_lora_rank if full else geometry.directions_per_layer
        self.peft_model = None
        self.hooks = None
        if self.options.mode == "hooks":
            from .hooks import ProjectionHooks

            self.hooks = ProjectionHooks()
        elif loaded.target_names(self.components):
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(r=self.rank, lora_alpha=self.rank, lora_dropout=0.0, bias="none",
                                target_modules=loaded.target_names(self.components))  # fmt: skip
            with peft_quietly():
                self.peft_model = get_peft_model(loaded.model, config)
            self.peft_model.eval()
        self.targets = loaded.targets(self.components)  # LoRA-wrapped modules, if any
        self.originals = {t.name: t.weight.detach().to("cpu", copy=True) for t in self.targets if t.fused}
        self.current: Edit | None = None
        self.stats = EditStats()
        self.reset()

    @property
    def modules(self) -> dict[str, list[nn.Module]]:
        """component -> its Linear targets (as wrapped), in layer order."""
        return {c: [t.module for t in self.targets if t.component == c and not t.fused] for c in self.components}

    @contextlib.contextmanager
    def unedited(self) -> Iterator[None]:
        """The original model for the duration (e.g. to act as its own refusal judge), then the
        current edit again."""
        current = self.current
        self.reset()
        try:
            yield
        finally:
            if current is not None:
                self.apply(current)

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the unedited model."""
        self.current = None
        if self.hooks is not None:
            self.hooks.clear()
        for target in self.targets:
            if target.fused:
                target.weight.copy_(self.originals[target.name])
            elif self.hooks is None:
                target.module.lora_B["default"].weight.zero_()

    def plan(self, edit: Edit) -> dict[str, list[tuple[torch.Tensor, torch.Tensor] | None]]:
        """Per component and layer: (basis, strengths) to apply, or None where the kernel is 0."""
        bases = edit.layer_bases(self.geometry, self.options)
        n = self.geometry.num_layers
        out: dict[str, list[tuple[torch.Tensor, torch.Tensor] | None]] = {}
        for component in self.components:
            kernel = edit.kernels.get(component)
            weights = kernel.weights(n) if kernel else torch.zeros(n, dtype=torch.float64)
            out[component] = [
                (basis, float(w) * mult) if float(w) != 0.0 else None
                for (basis, mult), w in zip(bases, weights, strict=True)
            ]
        return out

    def _edit_fused(self, target: Target, basis: torch.Tensor, strengths: torch.Tensor) -> None:
        """Every expert's weight, edited exactly in place (from the CPU original)."""
        weight = target.weight
        for e, original in enumerate(self.originals[target.name]):
            w = original.to(weight.device).float()
            w = w.T if target.transposed else w
            new = edited_weight(w, basis, strengths, self.options.row_normalization)
            weight[e].copy_((new.T if target.transposed else new).to(weight.dtype))

    @torch.no_grad()
    def apply(self, edit: Edit) -> EditStats:
        self.reset()
        stats = EditStats()
        plan = self.plan(edit)
        for target in self.targets:
            entry = plan[target.component][target.layer]
            stats.modules.setdefault(target.component, 0)
            if entry is None:
                continue
            stats.modules[target.component] += target.count
            basis, strengths = entry
            if target.fused:
                self._edit_fused(target, basis, strengths)
                continue
            module = target.module
            if self.hooks is not None:
                self.hooks.set(module, basis, strengths)
                continue
            weight = target.weight
            if self.options.row_normalization == "full":
                w = weight.float()
                delta = edited_weight(w, basis, strengths, "full") - w
                a, b = low_rank_factors(delta, self.rank)
                approx_delta = b @ a
                scale = delta.norm().clamp_min(1e-12)
                error = float((delta - approx_delta).norm() / scale)
                stats.approximation_error = max(stats.approximation_error, error)
                original = w.norm(dim=1)
                approx = (w + approx_delta).norm(dim=1)
                deviation = ((approx - original).abs() / original.clamp_min(1e-12)).max()
                stats.row_norm_error = max(stats.row_norm_error, float(deviation))
            else:
                a, b = subspace_factors(weight, basis, strengths, self.options.row_normalization)
            lora_a, lora_b = module.lora_A["default"].weight, module.lora_B["default"].weight
            lora_a.zero_()
            lora_a[: a.shape[0]].copy_(a.to(lora_a.dtype))
            lora_b[:, : b.shape[1]].copy_(b.to(lora_b.dtype))
        self.current = edit
        self.stats = stats
        return stats

    @torch.no_grad()
    def merged_model(self) -> nn.Module:
        """The plain model with the current edit written exactly into its weights (consumes the
        wrapper). "none"/"pre" merge the LoRA; "full" and hook mode compute the exact weights;
        fused experts already hold theirs."""
        plan = self.plan(self.current) if self.current is not None else {}
        if self.hooks is not None:
            self.hooks.remove()
            model = self.loaded.model
        elif self.peft_model is None:
            return self.loaded.model
        elif self.options.row_normalization != "full":
            return self.peft_model.merge_and_unload()
        else:
            model = self.peft_model.unload()
        for target in self.loaded.targets(list(plan)):  # plain modules again: hooks and LoRA are gone
            entry = plan[target.component][target.layer]
            if entry is None or target.fused:
                continue
            exact = edited_weight(target.weight, *entry, self.options.row_normalization)
            target.weight.copy_(exact.to(target.weight.dtype))
        return model
