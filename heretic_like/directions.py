"""Refusal directions from residual activations (pure tensor maths plus one collection pass).

Layer i's direction is measured at the output of decoder layer i (hidden_states[i + 1]), at the
last prompt token: that is the stream the edits of layer i's o_proj and down_proj write into.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .model import LoadedModel, chat_texts, encode


@torch.inference_mode()
def collect_residuals(
    loaded: LoadedModel, prompts: list[str], system_prompt: str | None, batch_size: int, desc: str = "residuals"
) -> torch.Tensor:
    """(n_prompts, n_layers, d_model) fp32 residuals at the last prompt token, on the CPU."""
    texts = chat_texts(loaded.tokenizer, prompts, system_prompt)
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", leave=False):
        batch = encode(loaded.tokenizer, texts[start : start + batch_size], loaded.device)
        hidden = loaded.model(**batch, output_hidden_states=True, use_cache=False, logits_to_keep=1).hidden_states
        out.append(torch.stack([h[:, -1, :].float().cpu() for h in hidden[1:]], dim=1))
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


def layer_geometry(harmful: torch.Tensor, harmless: torch.Tensor) -> list[dict[str, float]]:
    """Per layer: norms of the means, their cosine, and the refusal direction's norm."""
    bad, good = harmful.double().mean(0), harmless.double().mean(0)
    cos = torch.nn.functional.cosine_similarity(bad, good, dim=-1)
    diff = (bad - good).norm(dim=-1)
    return [
        {"layer": i, "harmful_norm": float(bad[i].norm()), "harmless_norm": float(good[i].norm()),
         "cosine": float(cos[i]), "direction_norm": float(diff[i])}
        for i in range(bad.shape[0])
    ]  # fmt: skip
