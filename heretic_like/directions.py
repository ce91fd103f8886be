"""Refusal directions from residual activations (pure tensor maths plus one collection pass).

Layer i's direction is measured at the output of decoder layer i, at the last prompt token (or the
token `direction_position` names): that is the stream the edits of layer i's o_proj and down_proj
write into.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from .errors import HereticError
from .model import LoadedModel, chat_texts, encode


@torch.inference_mode()
def collect_residuals(
    loaded: LoadedModel, prompts: list[str], system_prompt: str | None, batch_size: int, desc: str = "residuals",
    response_prefix: str = "", position: int = -1,
) -> torch.Tensor:
    """(n_prompts, n_layers, d_model) fp32 residuals at prompt token `position` counted from the end
    (-1: the last, after the response prefix, where the answer begins), on the CPU.

    Read by forward hooks on the decoder layers, one position each: `output_hidden_states` would
    keep every position of every layer (the biggest activation peak of a run), and its last entry
    is the *final-norm* output, not what the last layer's edits write into the residual stream.
    """
    texts = chat_texts(loaded.tokenizer, prompts, system_prompt, response_prefix)
    layers = loaded.model.get_submodule(loaded.layers_path)
    seen: list[torch.Tensor | None] = [None] * len(layers)

    def keeper(index: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            seen[index] = hidden[:, position, :].float().cpu()

        return hook

    handles = [layer.register_forward_hook(keeper(i)) for i, layer in enumerate(layers)]
    out = []
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", leave=False):
            batch = encode(loaded.tokenizer, texts[start : start + batch_size], loaded.device)
            # Rows are left-padded: a prompt shorter than -position tokens would be read at padding,
            # a residual of no prompt at all. An error naming it, not a silently wrong mean.
            short = (batch["attention_mask"][:, position] == 0).nonzero()
            if len(short):
                prompt = prompts[start + int(short[0, 0])]
                raise HereticError(f"direction_position = {position}: the prompt {prompt[:60]!r} has fewer than "
                                   f"{-position} tokens with the chat template")  # fmt: skip
            loaded.model(**batch, use_cache=False, logits_to_keep=1)
            out.append(torch.stack(seen, dim=1))
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(out)


def winsorize(residuals: torch.Tensor, quantile: float) -> torch.Tensor:
    """Clamp each residual vector's components to its own `quantile` of absolute values.

    Tames "massive activations": a few huge components would otherwise dominate the means.
    """
    if quantile >= 1.0:
        return residuals
    limit = torch.quantile(residuals.abs().float(), quantile, dim=-1, keepdim=True)
    return residuals.clamp(-limit, limit)


def refusal_directions(harmful: torch.Tensor, harmless: torch.Tensor, orthogonalize: bool = False) -> torch.Tensor:
    """(n_layers, d) unit directions: mean(harmful) - mean(harmless) per layer.

    With `orthogonalize`, the component along the harmless mean is removed first (projected
    abliteration), so the edit leaves what harmless prompts write untouched.
    """
    diff = harmful.double().mean(0) - harmless.double().mean(0)
    if orthogonalize:
        good = torch.nn.functional.normalize(harmless.double().mean(0), dim=-1)
        diff = diff - (diff * good).sum(-1, keepdim=True) * good
    return torch.nn.functional.normalize(diff, dim=-1).float()


def interpolate_direction(directions: torch.Tensor, index: float) -> torch.Tensor:
    """Unit direction at a fractional layer index: linear blend of the two neighbouring layers."""
    n = directions.shape[0]
    if not 0 <= index <= n - 1:
        raise ValueError(f"direction index {index} outside [0, {n - 1}]")
    low = math.floor(index)
    high = min(low + 1, n - 1)
    frac = index - low
    blend = (1 - frac) * directions[low].double() + frac * directions[high].double()
    return torch.nn.functional.normalize(blend, dim=-1).float()


def layer_metrics(harmful_mean: torch.Tensor, harmless_mean: torch.Tensor) -> pd.DataFrame:
    """Per-layer quality of the refusal direction, from the two (n_layers, d) means.

    snr = ||r|| / max(||mu_harmful||, ||mu_harmless||), cosine = cos(mu_harmful, mu_harmless),
    quality = snr * (1 - cosine): high where the two prompt kinds are both far apart and pointing
    different ways. `next_cosine` is the cosine between this layer's direction and the next one's:
    a stable run of high values marks layers where one direction applies to its neighbours.
    """
    bad, good = harmful_mean.double(), harmless_mean.double()
    diff = bad - good
    snr = diff.norm(dim=-1) / torch.maximum(bad.norm(dim=-1), good.norm(dim=-1)).clamp_min(1e-12)
    cos = torch.nn.functional.cosine_similarity(bad, good, dim=-1)
    unit = torch.nn.functional.normalize(diff, dim=-1)
    nxt = torch.cat([(unit[:-1] * unit[1:]).sum(-1), torch.tensor([float("nan")], dtype=torch.float64)])
    return pd.DataFrame({
        "layer": range(bad.shape[0]), "harmful_norm": bad.norm(dim=-1).numpy(),
        "harmless_norm": good.norm(dim=-1).numpy(), "direction_norm": diff.norm(dim=-1).numpy(),
        "snr": snr.numpy(), "cosine": cos.numpy(), "quality": (snr * (1 - cos)).numpy(), "next_cosine": nxt.numpy(),
    })  # fmt: skip


def cross_layer_cosine(directions: torch.Tensor) -> torch.Tensor:
    """(n_layers, n_layers) cosines between every pair of layers' directions."""
    unit = torch.nn.functional.normalize(directions.double(), dim=-1)
    return unit @ unit.T


def fisher_ratio(harmful_proj: torch.Tensor, harmless_proj: torch.Tensor) -> torch.Tensor:
    """Separability of two sets of projections (last-but-one dim = prompts): (m1 - m2)^2 / (v1 + v2)."""
    gap = harmful_proj.mean(0) - harmless_proj.mean(0)
    spread = harmful_proj.var(0, unbiased=False) + harmless_proj.var(0, unbiased=False)
    return gap**2 / spread.clamp_min(1e-12)


def entanglement(capability: torch.Tensor, harmful_mean: torch.Tensor, harmless_mean: torch.Tensor,
                 basis: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """How much of a direction's traffic is ordinary capability work rather than refusal, in [0, 1].

    For one layer: `capability` (n, d) residuals of capability prompts, `basis` (k, d) unit
    directions. Per direction v: e = c / (c + g), with c the RMS of (x_cap - mu_harmless) . v and
    g = |(mu_harmful - mu_harmless) . v|. Near 0: capability prompts barely use v, removing it costs
    little; near 1: they vary along v as much as refusal does, so removing it fully would hurt.
    """
    basis = basis.double()
    spread = (((capability.double() - harmless_mean.double()) @ basis.T) ** 2).mean(0).sqrt()
    gap = ((harmful_mean.double() - harmless_mean.double()) @ basis.T).abs()
    return spread / (spread + gap).clamp_min(1e-12)


def orthonormalize(vectors: torch.Tensor, against: torch.Tensor | None = None, rtol: float = 0.0) -> torch.Tensor:
    """Gram-Schmidt in float64: rows of `vectors` made orthonormal (and orthogonal to the unit
    rows of `against`), keeping each row's sign and order; near-dependent rows become zero: what
    is left of a row is at most 1e-8, or at most `rtol` of the row's norm (float32 inputs that
    restate a basis row leave a rounding residue ~1e-8 of their norm, which `rtol` = 1e-4 drops
    instead of blowing it up into an arbitrary unit row)."""
    basis = [] if against is None else [a.double() for a in against]
    fixed = len(basis)
    for v in vectors.double():
        floor = max(1e-8, rtol * float(v.norm()))
        for b in basis:
            v = v - (v @ b) * b
        norm = v.norm()
        basis.append(v / norm if norm > floor else torch.zeros_like(v))
    return torch.stack(basis[fixed:]).to(vectors.dtype) if len(basis) > fixed else vectors[:0]


def extra_directions(harmful: torch.Tensor, harmless: torch.Tensor, main: torch.Tensor, count: int,
                     candidates: int, min_novelty: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """SABER-style extra refusal directions beyond the mean difference, for every layer.

    Per layer: the top `candidates` right singular vectors of the harmful residuals minus the
    harmless mean (sign: towards harmful), ranked by their Fisher ratio between harmful and
    harmless projections. In that order each is made orthogonal to the main direction and to the
    ones already kept, and kept if at least `min_novelty` of it remains (a candidate that mostly
    restates the mean difference adds nothing), until `count` are kept.
    Returns ((n_layers, count, d) orthonormal rows, orthogonal to `main`; zero rows where too
    few candidates qualified, (n_layers, count) the kept candidates' Fisher ratios).
    """
    n_layers, d = main.shape
    out = torch.zeros(n_layers, count, d)
    ratios = torch.zeros(n_layers, count)
    if count == 0:
        return out, ratios
    for layer in range(n_layers):
        bad, good = harmful[:, layer].double(), harmless[:, layer].double()
        good_mean = good.mean(0)
        _, _, vh = torch.linalg.svd(bad - good_mean, full_matrices=False)
        vh = vh[:candidates]
        vh = vh * torch.where(vh @ (bad.mean(0) - good_mean) < 0, -1.0, 1.0).to(vh)[:, None]
        fisher = fisher_ratio(bad @ vh.T, good @ vh.T)
        kept = [main[layer].double()]
        for j in fisher.argsort(descending=True).tolist():
            v = vh[j]
            for b in kept:
                v = v - (v @ b) * b
            if v.norm() < min_novelty:
                continue
            ratios[layer, len(kept) - 1] = float(fisher[j])
            kept.append(v / v.norm())
            if len(kept) > count:
                break
        if len(kept) > 1:
            out[layer, : len(kept) - 1] = torch.stack(kept[1:]).float()
    return out, ratios


@dataclass
class RefusalGeometry:
    """Everything measured from the residuals that edits and reports need (cached per study).

    directions: (L, d) unit refusal direction per layer (projected if so configured);
    extra: (L, k - 1, d) further directions orthogonal to it; fisher / entanglement: (L, k) per
    direction, main first (entanglement NaN without capability prompts); the two means (L, d).
    """

    harmful_mean: torch.Tensor
    harmless_mean: torch.Tensor
    directions: torch.Tensor
    extra: torch.Tensor
    fisher: torch.Tensor
    entanglement: torch.Tensor

    @property
    def num_layers(self) -> int:
        return self.directions.shape[0]

    @property
    def directions_per_layer(self) -> int:
        return 1 + self.extra.shape[1]

    def subspace(self, layer: int) -> torch.Tensor:
        """(k, d) orthonormal rows: the main direction of `layer`, then its extra directions."""
        return torch.cat([self.directions[layer : layer + 1], self.extra[layer]])

    def metrics(self) -> pd.DataFrame:
        table = layer_metrics(self.harmful_mean, self.harmless_mean)
        table["fisher"] = self.fisher[:, 0].double().numpy()
        if not torch.isnan(self.entanglement).all():
            table["entanglement"] = self.entanglement[:, 0].double().numpy()
        return table

    def candidate_layers(self, window: tuple[float, float] = (0.0, 1.0)) -> list[int]:
        """Layers whose position (a fraction of the last layer index) lies in `window`; the
        nearest layer to its middle when the window holds none."""
        last = max(self.num_layers - 1, 1)
        low, high = window
        inside = [i for i in range(self.num_layers) if low * last - 1e-9 <= i <= high * last + 1e-9]
        return inside or [min(round((low + high) / 2 * last), self.num_layers - 1)]

    def best_layer(self, window: tuple[float, float] = (0.0, 1.0)) -> int:
        """The layer in `window` whose direction scores highest on quality = snr * (1 - cosine).

        The study passes `search.direction_index` as the window: on real models quality tends to
        peak at the very last layer, whose mean difference mixes in next-token statistics and
        edits worse than a middle-to-late layer's (measured in docs/benchmarks.md).
        """
        return self.top_layers(1, window)[0]

    def top_layers(self, k: int, window: tuple[float, float] = (0.0, 1.0)) -> list[int]:
        quality = self.metrics()["quality"].iloc[self.candidate_layers(window)]
        return [int(i) for i in quality.nlargest(k).index]

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: dict[str, torch.Tensor]) -> RefusalGeometry:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


def measure(harmful: torch.Tensor, harmless: torch.Tensor, capability: torch.Tensor | None = None,
            orthogonalize: bool = False, directions_per_layer: int = 1,
            candidates: int = 8) -> RefusalGeometry:  # fmt: skip
    """Directions, extra directions and their scores from (n, L, d) residual sets."""
    main = refusal_directions(harmful, harmless, orthogonalize)
    extra, extra_fisher = extra_directions(harmful, harmless, main, directions_per_layer - 1,
                                           max(candidates, directions_per_layer - 1))  # fmt: skip
    main_fisher = fisher_ratio(torch.einsum("nld,ld->nl", harmful.double(), main.double()),
                               torch.einsum("nld,ld->nl", harmless.double(), main.double()))  # fmt: skip
    fisher = torch.cat([main_fisher.float()[:, None], extra_fisher], dim=1)
    bad_mean, good_mean = harmful.double().mean(0), harmless.double().mean(0)
    entangled = torch.full_like(fisher, float("nan"))
    if capability is not None:
        for layer in range(main.shape[0]):
            basis = torch.cat([main[layer : layer + 1], extra[layer]])
            entangled[layer] = entanglement(capability[:, layer], bad_mean[layer], good_mean[layer], basis).float()
    return RefusalGeometry(bad_mean.float(), good_mean.float(), main, extra, fisher, entangled)


def biproject(basis: torch.Tensor, harmless_mean: torch.Tensor) -> torch.Tensor:
    """Rows of `basis` with the component along a target layer's harmless mean removed, then
    re-orthonormalised: a direction measured at one layer, made harmless-neutral for another."""
    good = torch.nn.functional.normalize(harmless_mean.double(), dim=-1)
    return orthonormalize(basis.double(), against=good[None]).to(basis.dtype)
