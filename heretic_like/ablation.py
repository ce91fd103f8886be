"""A trial's edit and the object that applies it.

`Edit` is what a trial samples (a direction choice and a strength kernel per component);
`Abliterator` holds the model, wrapped once through an edit backend (`backends`), and swaps the
edit for each trial without reloading anything. The maths of one module's edit is `projection`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .backends import EditBackend, FusedBackend, HookBackend, LoraBackend
from .directions import RefusalGeometry, biproject, interpolate_direction, orthonormalize
from .kernel import Kernel
from .model import LoadedModel, Target
from .projection import Step, composed_weight


@dataclass(frozen=True)
class EditOptions:
    """Settings that shape every trial's edit the same way (from the config, not sampled)."""

    row_normalization: str = "none"
    full_normalization_lora_rank: int = 3
    biproject: bool = False
    entanglement_threshold: float = 0.55
    mode: str = "lora"
    second_peak: bool = False  # edits may carry a second peak: one more LoRA rank
    global_direction: bool = False  # edits may carry a global direction: one more LoRA rank
    preserve_scope: str = "edit"  # preserved_input_scope: what the kept inputs confine

    @classmethod
    def from_settings(cls, settings) -> EditOptions:
        return cls(settings.row_normalization, settings.full_normalization_lora_rank, settings.biproject_direction,
                   settings.entanglement_threshold, settings.edit_mode, settings.search.second_peak,
                   settings.search.global_direction, settings.preserved_input_scope)  # fmt: skip


@dataclass(frozen=True)
class GlobalDirection:
    """`search.global_direction`: the direction at (fractional) layer `index`, removed with strength
    `weight` from what every layer's components write."""

    index: float
    weight: float


@dataclass(frozen=True)
class Edit:
    """One trial's edit, in absolute layer units.

    `direction_index` None means each layer uses its own directions; a float blends the two
    neighbouring layers' main directions (extra directions come from the nearest layer).
    `entangled_strength` scales directions whose capability entanglement exceeds the threshold.
    `second_peak` (search.second_peak) is a second kernel, the same for every component, whose
    layers are edited along their own main direction. `global_direction` (search.global_direction)
    removes one more direction from every layer, at one strength.
    """

    direction_index: float | None
    kernels: dict[str, Kernel]
    entangled_strength: float = 1.0
    second_peak: Kernel | None = None
    global_direction: GlobalDirection | None = None

    def named_kernels(self) -> dict[str, Kernel]:
        """Every kernel under the name records and reports give it: the components', then `second_peak`."""
        return {**self.kernels, **({"second_peak": self.second_peak} if self.second_peak is not None else {})}

    def to_dict(self) -> dict:
        data = {"direction_index": self.direction_index, "entangled_strength": self.entangled_strength,
                "kernels": {c: asdict(k) for c, k in self.kernels.items()}}  # fmt: skip
        if self.second_peak is not None:  # absent otherwise: one-peak records stay as earlier versions wrote them
            data["second_peak"] = asdict(self.second_peak)
        if self.global_direction is not None:  # likewise
            data["global_direction"] = asdict(self.global_direction)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Edit:
        kernels = {c: Kernel(**k) for c, k in data["kernels"].items()}
        second, overall = data.get("second_peak"), data.get("global_direction")
        return cls(data["direction_index"], kernels, data.get("entangled_strength", 1.0),
                   Kernel(**second) if second is not None else None,
                   GlobalDirection(**overall) if overall is not None else None)  # fmt: skip

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

    def second_peak_bases(self, geometry: RefusalGeometry, options: EditOptions) -> list[Entry | None]:
        """Per layer: the second peak's ((1, d) own main direction, (1,) strength), None where it is 0."""
        n = geometry.num_layers
        if self.second_peak is None:
            return [None] * n
        out: list[Entry | None] = []
        for layer, weight in enumerate(self.second_peak.weights(n).tolist()):
            own = geometry.directions[layer : layer + 1]
            if options.biproject:
                own = biproject(own, geometry.harmless_mean[layer])
            out.append((own, torch.tensor([weight], dtype=torch.float32)) if weight != 0.0 else None)
        return out

    def global_bases(self, geometry: RefusalGeometry, options: EditOptions) -> list[Entry | None]:
        """Per layer: the global direction's ((1, d) direction, (1,) strength); None without one."""
        n = geometry.num_layers
        if self.global_direction is None or self.global_direction.weight == 0.0:
            return [None] * n
        direction = interpolate_direction(geometry.directions, self.global_direction.index)[None]
        strength = torch.tensor([self.global_direction.weight], dtype=torch.float32)
        if not options.biproject:
            return [(direction, strength)] * n
        return [(biproject(direction, geometry.harmless_mean[layer]), strength) for layer in range(n)]


Entry = tuple[torch.Tensor, torch.Tensor]  # one module's edit: ((k, d) orthonormal basis, (k,) strengths)


def stack_edits(first: Entry | None, second: Entry | None) -> Entry | None:
    """Two edits of one module as one: the second's directions made orthogonal to the first's, so
    it removes only what the first leaves (a direction the first already removes adds a zero row,
    which edits nothing) and the basis stays orthonormal, as the projection needs."""
    if first is None or second is None:
        return first if second is None else second
    (basis, strengths), (more, more_strengths) = first, second
    extra = orthonormalize(more.to(basis.dtype), against=basis, rtol=1e-4)  # a restated direction: a zero row
    return torch.cat([basis, extra]), torch.cat([strengths.float(), more_strengths.float()])


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
    """Holds the loaded model with its edit mechanisms (`backends`) and swaps each trial's edit in
    and out without reloading anything: Linear targets through a peft LoRA (or forward hooks in
    "hooks" mode), fused MoE expert weights edited in place, every expert, none skipped."""

    def __init__(self, loaded: LoadedModel, components: list[str], geometry: RefusalGeometry,
                 options: EditOptions | None = None,
                 kept: dict[tuple[str, int], torch.Tensor] | None = None):  # fmt: skip
        """`kept`: per (component, layer), the inputs each edit leaves alone (`preservation`)."""
        self.loaded = loaded
        self.components = list(components)
        self.geometry = geometry
        self.options = options or EditOptions()
        self.kept = kept or {}
        if self.options.mode == "hooks" and self.options.row_normalization != "none":
            raise ValueError("edit_mode = 'hooks' projects module outputs: it needs row_normalization = 'none'")
        if self.options.mode == "hooks" and self.kept:
            raise ValueError("edit_mode = 'hooks' cannot confine edits: it needs preserved_input_rank = 0")
        for warning in loaded.target_warnings(self.components):
            print(f"WARNING: {warning}", file=sys.stderr)
        full = self.options.row_normalization == "full"
        self.rank = (self.options.full_normalization_lora_rank if full
                     else geometry.directions_per_layer + int(self.options.second_peak)
                     + int(self.options.global_direction))  # fmt: skip
        self.linear: EditBackend | None = None
        if self.options.mode == "hooks":
            self.linear = HookBackend()
        elif loaded.target_names(self.components):
            self.linear = LoraBackend(loaded, self.components, self.rank)
        self.targets = loaded.targets(self.components)  # LoRA-wrapped modules, if any
        fused = [t for t in self.targets if t.fused]
        self.fused = FusedBackend(fused) if fused else None
        self.backends: list[EditBackend] = [b for b in (self.linear, self.fused) if b is not None]
        self.current: Edit | None = None
        self.stats = EditStats()
        self.reset()

    def backend(self, target: Target) -> EditBackend:
        return self.fused if target.fused else self.linear

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
        for backend in self.backends:
            backend.clear()

    def plan(self, edit: Edit) -> dict[str, list[list[Step]]]:
        """Per component and layer: the projections to apply in order (none where every kernel is 0).

        One step, confined off the layer's kept inputs when there are any; with `preserved_input_scope
        = "global_direction"` two: the kernels' edit as it is, then the global direction, plain and
        confined (the edit's own directions travel mostly through inputs harmless prompts share)."""
        if edit.second_peak is not None and not self.options.second_peak:
            # the LoRA has no rank for it: fail before any module is touched, not inside peft
            raise ValueError("this edit has a second peak, but the editor was set up without search.second_peak")
        if edit.global_direction is not None and not self.options.global_direction:
            raise ValueError("this edit has a global direction, but the editor was set up without "
                             "search.global_direction")  # fmt: skip
        bases = edit.layer_bases(self.geometry, self.options)
        second = edit.second_peak_bases(self.geometry, self.options)
        overall = edit.global_bases(self.geometry, self.options)
        n, normalization = self.geometry.num_layers, self.options.row_normalization
        # without kept inputs (preserved_input_rank = 0) the scope changes nothing: one step, as ever
        split = self.options.preserve_scope == "global_direction" and bool(self.kept)
        out: dict[str, list[list[Step]]] = {}
        for component in self.components:
            kernel = edit.kernels.get(component)
            weights = kernel.weights(n) if kernel else torch.zeros(n, dtype=torch.float64)
            out[component] = []
            for layer, ((basis, mult), w, extra, everywhere) in enumerate(zip(bases, weights, second, overall,
                                                                              strict=True)):  # fmt: skip
                kept = self.kept.get((component, layer))
                main = stack_edits((basis, float(w) * mult) if float(w) != 0.0 else None, extra)
                if split:
                    steps = [(*main, normalization, None)] if main is not None else []
                    steps += [(*everywhere, "none", kept)] if everywhere is not None else []
                else:
                    entry = stack_edits(main, everywhere)
                    steps = [(*entry, normalization, kept)] if entry is not None else []
                out[component].append(steps)
        return out

    @torch.no_grad()
    def apply(self, edit: Edit) -> EditStats:
        self.reset()
        stats = EditStats()
        plan = self.plan(edit)
        for target in self.targets:
            steps = plan[target.component][target.layer]
            stats.modules.setdefault(target.component, 0)
            if not steps:
                continue
            stats.modules[target.component] += target.count
            self.backend(target).set(target, steps, stats)
        self.current = edit
        self.stats = stats
        return stats

    @torch.no_grad()
    def merged_model(self) -> nn.Module:
        """The plain model with the current edit written exactly into its weights (consumes the
        backends): each backend hands back the plain model (the LoRA dropped unmerged, hooks
        removed, fused experts already exact) and each edited Linear gets its exact weight.

        Merging the LoRA would add B @ A to every wrapped module, also where the kernel is 0: B is
        zero there, but W + 0 turns every -0.0 of W into +0.0 (and which ones follow the sign of
        0 * x in the matmul, so it differed from run to run), so an export and its rebuild were
        numerically equal yet not byte-identical. Modules with zero strength are not touched."""
        plan = self.plan(self.current) if self.current is not None else {}
        model = self.loaded.model
        for backend in self.backends:
            model = backend.release(model)
        self.backends = []
        for target in self.loaded.targets(list(plan)):  # plain modules again: hooks and LoRA are gone
            steps = plan[target.component][target.layer]
            if not steps or target.fused:
                continue
            target.weight.copy_(composed_weight(target.weight, steps).to(target.weight.dtype))
        return model
