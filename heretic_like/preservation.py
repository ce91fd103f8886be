"""`preserved_input_rank`: the inputs an edit leaves alone (a null-space edit, the way AlphaEdit
confines a knowledge edit to keys it must not disturb).

For each edited module: the top-K principal directions (uncentred) of what the harmless direction
prompts feed it, over every prompt token, read in the unedited model. An edit confined off them
(`projection.confined`) writes those inputs exactly as before, so a harmless prompt, whose tokens
lie (almost) inside that span, barely moves, while a harmful prompt loses the refusal directions
through what its tokens do not share with the harmless ones. Measured by randomised subspace
iteration over a few forward passes (never a d_in x d_in matrix: 8,960 inputs on a 1.5B model's
down_proj), with a fixed seed, so a rebuild gets the same bases bit for bit.
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from .errors import HereticError
from .model import LoadedModel, Target, chat_texts, encode
from .prompts import PromptSets

Key = tuple[str, int]  # (component, layer): the same before and after a LoRA wraps the module

OVERSAMPLE = 32  # extra sketch columns: the top-K directions come out accurate, not just spanned
POWER_PASSES = 1  # passes of subspace iteration after the first (each a forward over the prompts)


@torch.no_grad()
def _gram_products(loaded: LoadedModel, targets: list[Target], texts: list[str], batch_size: int,
                   sketches: dict[Key, torch.Tensor], desc: str) -> dict[Key, torch.Tensor]:  # fmt: skip
    """Per module: X^T X S for its sketch S (d_in x q), X every non-padding prompt token's input."""
    out = {key: torch.zeros_like(sketch) for key, sketch in sketches.items()}
    mask: list[torch.Tensor] = []

    def keeper(key: Key):
        def hook(module, args):
            rows = args[0][mask[0]].float().cpu()  # (tokens, d_in), padding left out
            out[key] += rows.T @ (rows @ sketches[key])

        return hook

    handles = [t.module.register_forward_pre_hook(keeper((t.component, t.layer))) for t in targets]
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", leave=False):
            batch = encode(loaded.tokenizer, texts[start : start + batch_size], loaded.device)
            mask[:] = [batch["attention_mask"].bool()]
            loaded.model(**batch, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return out


def preserved_inputs(loaded: LoadedModel, components: list[str], texts: list[str], rank: int,
                     batch_size: int) -> dict[Key, torch.Tensor]:  # fmt: skip
    """(component, layer) -> (rank, d_in) orthonormal top principal directions of the module's
    inputs over `texts` (formatted prompts), read in the model as it is (unedited)."""
    targets = loaded.targets(components)
    if any(t.fused for t in targets):
        raise HereticError("preserved_input_rank: not for fused MoE expert weights (each expert reads other "
                           "inputs); set preserved_input_rank = 0")  # fmt: skip
    sizes = {(t.component, t.layer): t.weight.shape[1] for t in targets}
    if rank >= min(sizes.values()):
        raise HereticError(f"preserved_input_rank = {rank}: must be below the smallest edited module's input size "
                           f"({min(sizes.values())}), or no input is left to edit")  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    sketches = {key: torch.linalg.qr(torch.randn(d, min(rank + OVERSAMPLE, d), generator=generator)).Q
                for key, d in sizes.items()}  # fmt: skip
    passes = POWER_PASSES + 2
    for step in range(passes - 1):
        products = _gram_products(loaded, targets, texts, batch_size, sketches,
                                  f"harmless inputs, pass {step + 1}/{passes}")  # fmt: skip
        sketches = {key: torch.linalg.qr(product).Q for key, product in products.items()}
    products = _gram_products(loaded, targets, texts, batch_size, sketches, f"harmless inputs, pass {passes}/{passes}")
    bases = {}
    for key, q in sketches.items():
        small = q.T @ products[key]  # Rayleigh-Ritz: Q^T (X^T X) Q, symmetric
        values, vectors = torch.linalg.eigh((small + small.T) / 2)
        top = vectors[:, values.argsort(descending=True)[:rank]]
        bases[key] = torch.linalg.qr(q @ top).Q.T.contiguous()  # (rank, d_in), orthonormal rows
    return bases


def kept_inputs(rank: int, loaded: LoadedModel, prompts: PromptSets, components: list[str], response_prefix: str,
                batch_size: int) -> dict[Key, torch.Tensor] | None:  # fmt: skip
    """The bases `preserved_input_rank` asks for (None at 0), from the harmless direction prompts
    formatted as the directions read them; measured with the directions' batch, as the run, export
    and rebuild all do, so their bits agree."""
    if not rank:
        return None
    texts = chat_texts(loaded.tokenizer, prompts.harmless, prompts.system("harmless"), response_prefix)
    started = time.perf_counter()
    bases = preserved_inputs(loaded, components, texts, rank, batch_size)
    print(f"Edits leave alone the top {rank} directions of each module's inputs on {len(texts)} harmless prompts "
          f"({time.perf_counter() - started:.0f} s)")  # fmt: skip
    return bases
