"""The edit maths: remove refusal directions from what a module writes, W <- W - w v v^T W.

A handful of pure functions on one weight matrix and a (k, d_out) orthonormal basis of
directions with per-direction strengths:

- `row_normalization = "none"`: the classic projection, exactly a rank-k LoRA (A = V W,
  B = -V^T diag(w)).
- `"pre"`: the same projection applied to the row-normalised weight, then scaled back by each
  row's norm; still an exact rank-k LoRA.
- `"full"`: norm-preserving: the projected row directions are renormalised and recombined with
  the original row norms, so every row keeps its norm exactly. That is no longer low-rank: trials
  use the best rank-`full_normalization_lora_rank` approximation (reporting its error), export
  writes the exact weights.

Any of them may be *confined* (`kept`, a (K, d_in) orthonormal basis of inputs to leave alone,
`preserved_input_rank`): the delta becomes delta (I - U^T U), so an input inside the span of U is
written exactly as before and only what lies outside it loses the directions; a LoRA's A is
confined the same way (rank unchanged).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# One projection of a module's weight: ((k, d_out) basis, (k,) strengths, row normalisation,
# (K, d_in) inputs to leave alone or None). A module's edit is a sequence of them, in order.
Step = tuple[torch.Tensor, torch.Tensor, str, torch.Tensor | None]


def confined(delta: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """`delta` (or a LoRA's A) with no action on the rows of `kept` ((K, in), orthonormal):
    delta (I - kept^T kept); unchanged when `kept` is None."""
    if kept is None:
        return delta
    u = kept.to(delta.device, delta.dtype)
    return delta - (delta @ u.T) @ u


def subspace_factors(weight: torch.Tensor, basis: torch.Tensor, strengths: torch.Tensor,
                     row_normalization: str = "none",
                     kept: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """LoRA factors (A: k x in, B: out x k), fp32, with B @ A the "none" or "pre" edit's delta
    (confined to inputs off `kept` when given)."""
    w = weight.float()
    v = basis.float().to(w.device)
    s = strengths.float().to(w.device)
    if row_normalization == "pre":
        norms = w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return confined(v @ (w / norms), kept), -(norms * v.T * s)
    if row_normalization != "none":
        raise ValueError(f"no exact low-rank factors for row_normalization={row_normalization!r}")
    return confined(v @ w, kept), -(v.T * s)


def edited_weight(weight: torch.Tensor, basis: torch.Tensor, strengths: torch.Tensor,
                  row_normalization: str = "none", kept: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The exact edited weight (fp32) for any row normalisation, confined to inputs off `kept`
    when given.

    "full" follows the norm-preserving recipe: split W into row norms and unit row directions,
    project the directions, renormalise them, and recombine with the original norms (confined,
    the rows keep their norms only on the inputs `kept` spans, where nothing changes).
    """
    if row_normalization != "full":
        a, b = subspace_factors(weight, basis, strengths, row_normalization, kept)
        return weight.float() + b @ a
    w = weight.float()
    v = basis.float().to(w.device)
    norms = w.norm(dim=1, keepdim=True)
    unit = w / norms.clamp_min(1e-12)
    projected = unit - (v.T * strengths.float().to(w.device)) @ (v @ unit)
    exact = norms * torch.nn.functional.normalize(projected, dim=1)
    return exact if kept is None else w + confined(exact - w, kept)


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


def composed_weight(weight: torch.Tensor, steps: Sequence[Step]) -> torch.Tensor:
    """The exact weight (fp32) after each step's edit in turn, each acting on what the steps before
    it left (one step: `edited_weight`)."""
    w = weight.float()
    for basis, strengths, row_normalization, kept in steps:
        w = edited_weight(w, basis, strengths, row_normalization, kept)
    return w


def composed_factors(weight: torch.Tensor, steps: Sequence[Step]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact LoRA factors of steps that are all low-rank ("none" or "pre"): each step's factors
    from the weight the steps before it left, stacked, so B @ A = composed_weight - W."""
    w, factors_a, factors_b = weight.float(), [], []
    for basis, strengths, row_normalization, kept in steps:
        a, b = subspace_factors(w, basis, strengths, row_normalization, kept)
        w = w + b @ a
        factors_a.append(a)
        factors_b.append(b)
    return torch.cat(factors_a), torch.cat(factors_b, dim=1)
