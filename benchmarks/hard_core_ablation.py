"""Can any direction edit remove the hard core? Ablations on top of a chosen edit, KL for each.

Every lever of issue 16 left the same few held-out prompts refused (the slur notes above all),
and `refusal_strength.py` found they lie off the refusal direction. This asks the next question
directly, on an exported edit: read new refusal directions *in the edited model* (last prompt
token, against the built-in harmless prompts), remove them on top of the edit, and report the
first-token KL from the unedited model (the study's 51 harmless evaluation prompts) and which
hard-core prompts still refuse at 128 tokens (markers). Directions come from

- `hate`: the 36 StrongREJECT "Hate, harassment and discrimination" prompts the study does not
  score on (a usable edit: no held-out prompt is read), or
- `builtin`: the built-in 150 harmful direction prompts (unfiltered), for comparison, or
- `refused`: the hard-core prompts the edited model itself still refuses (a diagnostic, not an
  edit anyone could ship: it reads held-out prompts; it bounds what a direction edit can do).

Edits (`--edits`, JSON, each on top of the chosen edit, weights W <- W - w V^T V W):
  ["own", w, first, last]    each layer first..last: its own direction, from o_proj and down_proj
  ["one", layer, w]          that layer's direction from every layer's writes and the embeddings
                             (at w = 1, directional ablation: the residual keeps no component
                             along it); w is optional, 1 by default
  ["span", [l1, l2, ...], w] the directions of those layers, orthonormalised, as "one"
  ["writes", layer, w]       as "one", the embeddings left as they are
  ["add", layer, a]          not a weight edit: activation addition. Subtract a times that layer's
                             mean difference (harmful - harmless, unnormalised) from what the
                             layer outputs at every position (a forward hook): it moves every
                             prompt by the same amount, so it also reaches prompts that lie off
                             the direction, which ablation (removing only a prompt's own
                             component) cannot

With `--preserve K`, each weight edit above is confined to inputs the harmless prompts do not
use (a null-space edit, as AlphaEdit confines knowledge edits): a module's delta becomes
delta (I - U U^T), U the top-K principal directions (uncentred) of that module's inputs over every
token of the built-in 150 harmless prompts, read in the model of --read-in. A harmless prompt's
tokens then pass (nearly) unchanged, a harmful one's lose the direction where they differ; the
embeddings are edited as without it.

    python benchmarks/hard_core_ablation.py --edited EXPORTED_FOLDER \
        --results benchmarks/results-quality/seed-0 ... --out benchmarks/results-quality/levers/hard-core-ablation
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from qwen_benchmark import DATA, fetch_member, harmbench_prompts, overrefusal_prompts  # noqa: E402
from refusal_strength import refused_by  # noqa: E402

from heretic_like.config import load_settings  # noqa: E402
from heretic_like.detectors import MarkerDetector  # noqa: E402
from heretic_like.directions import collect_residuals, orthonormalize, refusal_directions  # noqa: E402
from heretic_like.evaluation import kl_divergence  # noqa: E402
from heretic_like.generation import first_token_logprobs, generate  # noqa: E402
from heretic_like.model import chat_texts, load_model  # noqa: E402
from heretic_like.projection import edited_weight  # noqa: E402
from heretic_like.prompts import load_all_prompts  # noqa: E402
from heretic_like.testbed import fetch_qwen  # noqa: E402

COMPONENTS = ("self_attn.o_proj", "mlp.down_proj")
DEFAULT_EDITS = '[["own", 0.5, 9, 13], ["own", 1.0, 4, 23], ["one", 8], ["one", 12], ["one", 20], ' \
                '["span", [4, 8, 12, 16, 20, 23]], ["span", [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 23]]]'


def hate_prompts(cache: Path, study: list[str]) -> list[str]:
    """StrongREJECT's hate category less the prompts the study scores on."""
    rows = csv.DictReader(io.StringIO(fetch_member(*DATA["strongreject"], cache).decode()))
    seen = set(study)
    return [r["forbidden_prompt"] for r in rows
            if r["category"].startswith("Hate") and r["forbidden_prompt"] not in seen]  # fmt: skip


def fixed_source(source: str, cache: Path, sets) -> list[str] | None:
    """The direction prompts of `--source` hate or builtin (the built-in 150 harmful, unfiltered);
    None for refused (known only after the edit's answers)."""
    if source == "refused":
        return None
    return hate_prompts(cache, sets.harmful_eval) if source == "hate" else sets.harmful


def saved_weights(loaded) -> dict[tuple[int, str], torch.Tensor]:
    """Copies of the weights `apply` rewrites: every layer's components, and the embeddings (-1)."""
    layers = loaded.model.get_submodule(loaded.layers_path)
    out = {(i, name): layer.get_submodule(name).weight.detach().clone()
           for i, layer in enumerate(layers) for name in COMPONENTS}  # fmt: skip
    out[(-1, "embed")] = loaded.model.get_input_embeddings().weight.detach().clone()
    return out


# Each edit's form, as --edits takes it (w optional in one, span, writes).
EDIT_FORMS = {"own": '["own", w, first, last]', "one": '["one", layer, w]', "span": '["span", [l1, l2, ...], w]',
              "writes": '["writes", layer, w]', "add": '["add", layer, a]'}  # fmt: skip
EDIT_LENGTHS = {"own": (4,), "one": (2, 3), "span": (2, 3), "writes": (2, 3), "add": (3,)}


def unknown_edit(kind) -> SystemExit:
    return SystemExit(f"--edits: unknown edit {kind!r} ({', '.join(EDIT_FORMS)})")


def check_edits(edits, n_layers: int) -> None:
    """Every --edits entry well formed, its layers inside the model: checked before minutes of
    loading and generating, where a typo would otherwise surface as a traceback."""
    if not isinstance(edits, list):
        raise SystemExit("--edits: a JSON list of edits, e.g. '[[\"one\", 4, 0.5]]'")
    for edit in edits:
        if not isinstance(edit, list) or not edit:
            raise SystemExit(f"--edits: {json.dumps(edit)} is not an edit (a list such as {EDIT_FORMS['one']})")
        if edit[0] not in EDIT_FORMS:
            raise unknown_edit(edit[0])
        if len(edit) not in EDIT_LENGTHS[edit[0]]:
            raise SystemExit(f"--edits: {json.dumps(edit)}: expected {EDIT_FORMS[edit[0]]}")
        layers = edit[2:4] if edit[0] == "own" else edit[1] if edit[0] == "span" else [edit[1]]
        if not isinstance(layers, list) or not all(isinstance(i, int) and 0 <= i < n_layers for i in layers):
            raise SystemExit(f"--edits: {json.dumps(edit)}: layers are whole numbers from 0 to {n_layers - 1}")


def ablation_plan(edit: list, directions: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor | None, float]:
    """(layer -> (k, d) orthonormal basis, embedding basis or None, strength) for one `--edits` entry."""
    kind = edit[0]
    if kind == "own":
        _, weight, first, last = edit
        return {i: directions[i][None] for i in range(first, last + 1)}, None, float(weight)
    if kind in ("one", "writes"):
        basis = directions[edit[1]][None]
    elif kind == "span":
        basis = orthonormalize(directions[list(edit[1])])
    else:
        raise unknown_edit(kind)
    weight = float(edit[2]) if len(edit) > 2 else 1.0
    return {i: basis for i in range(len(directions))}, None if kind == "writes" else basis, weight


@torch.inference_mode()
def harmless_input_bases(loaded, prompts: list[str], system: str | None, rank: int) -> tuple[dict, dict]:
    """Per (layer, component): the (rank, d_in) top principal directions (uncentred) of the module's
    inputs over every token of `prompts`, and the share of those inputs' energy they hold."""
    layers = loaded.model.get_submodule(loaded.layers_path)
    seen: dict[tuple[int, str], list[torch.Tensor]] = {(i, n): [] for i in range(len(layers)) for n in COMPONENTS}

    def keeper(key):
        def hook(module, args):
            seen[key].append(args[0].reshape(-1, args[0].shape[-1]).float().cpu())

        return hook

    handles = [layers[i].get_submodule(n).register_forward_pre_hook(keeper((i, n))) for i, n in seen]
    try:  # one prompt a pass: no padding to leave out
        for text in tqdm(chat_texts(loaded.tokenizer, prompts, system), desc="harmless inputs", leave=False):
            ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            loaded.model(input_ids=ids.to(loaded.device), use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    bases, shares = {}, {}
    torch.manual_seed(0)  # svd_lowrank draws its sketch from the global generator: the same bases every run
    for key, rows in tqdm(seen.items(), desc="principal directions", leave=False):
        x = torch.cat(rows)
        _, s, v = torch.svd_lowrank(x, q=min(rank + 16, min(x.shape)), niter=4, M=None)
        bases[key] = v[:, :rank].T.contiguous()
        shares[key] = float((s[:rank] ** 2).sum() / (x**2).sum())
        rows.clear()
    return bases, shares


def addition_hook(loaded, layer: int, shift: torch.Tensor):
    """Add `shift` to what decoder layer `layer` writes into the residual stream, at every position
    (activation addition); returns the handle that removes it."""

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + shift.to(output[0].dtype), *output[1:])
        return output + shift.to(output.dtype)

    return loaded.model.get_submodule(loaded.layers_path)[layer].register_forward_hook(hook)


def apply_edit(loaded, original: dict, edit: list, directions: torch.Tensor, gaps: torch.Tensor,
               preserve: dict | None = None):  # fmt: skip
    """Put one --edits entry on top of the chosen edit; returns the hook handle of an "add" (None
    for the weight edits), which the caller removes after measuring."""
    if edit[0] != "add":
        apply(loaded, original, *ablation_plan(edit, directions), preserve)
        return None
    apply(loaded, original, {}, None, 1.0)  # the chosen edit's own weights
    return addition_hook(loaded, edit[1], (-float(edit[2]) * gaps[edit[1]]).float())


@torch.inference_mode()
def apply(loaded, original: dict, plan: dict[int, torch.Tensor], embedding: torch.Tensor | None, weight: float,
          preserve: dict | None = None) -> None:  # fmt: skip
    """Set every target weight to the chosen edit's plus this ablation (from the saved originals);
    with `preserve` ((layer, component) -> (K, d_in) basis), each module's added delta loses its
    action on that basis."""
    layers = loaded.model.get_submodule(loaded.layers_path)
    for (index, name), w0 in original.items():
        module = loaded.model.get_input_embeddings() if name == "embed" else layers[index].get_submodule(name)
        target = module.weight
        basis = embedding if name == "embed" else plan.get(index)
        if basis is None:
            target.copy_(w0)
            continue
        strengths = torch.full((len(basis),), weight)
        # The embedding matrix holds residual vectors as rows, a module's weight as columns.
        new = edited_weight(w0.T, basis, strengths).T if name == "embed" else edited_weight(w0, basis, strengths)
        if preserve is not None and name != "embed":
            kept = preserve[(index, name)].to(new.device)
            delta = new - w0.float()
            new = w0.float() + delta - (delta @ kept.T) @ kept
        target.copy_(new.to(w0.dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edited", type=Path, required=True, help="an exported edit (model folder)")
    parser.add_argument("--results", type=Path, nargs="+", required=True,
                        help="default_run.py folders: the hard core is what their chosen edits refuse "
                             "at 128 tokens")  # fmt: skip
    parser.add_argument("--source", choices=["hate", "builtin", "refused"], default="hate")
    parser.add_argument("--edits", default=DEFAULT_EDITS, help="JSON list of edits (see the docstring)")
    parser.add_argument("--read-in", choices=["edited", "unedited"], default="edited",
                        help="the model whose residuals give the new directions")  # fmt: skip
    parser.add_argument("--heldout", action="store_true",
                        help="also count all 100 held-out prompts at 128 tokens and the 80 benign-edgy ones at 32, "
                             "for the chosen edit and each edit")  # fmt: skip
    parser.add_argument("--preserve", type=int, default=0,
                        help="confine each edit to inputs outside the top-K principal directions of the harmless "
                             "prompts' inputs to each module (0: off)")  # fmt: skip
    parser.add_argument("--save", type=Path, help="write the last edit's model here (for `evaluate --compare`)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    try:
        edits = json.loads(args.edits)
    except json.JSONDecodeError as error:
        sys.exit(f"--edits: not JSON ({error})")
    if args.read_in == "unedited" and args.source == "refused":
        sys.exit("--read-in unedited: not with --source refused (the refused prompts are known after the edit)")
    if not (args.edited / "config.json").is_file():
        sys.exit(f"--edited: {args.edited} is not an exported model folder (no config.json)")
    check_edits(edits, json.loads((args.edited / "config.json").read_text())["num_hidden_layers"])
    cache = ROOT / "benchmarks" / ".cache"
    settings = load_settings(None, {"model": str(fetch_qwen(ROOT / "models"))})
    sets = load_all_prompts(settings)
    detector = MarkerDetector.from_settings(settings)
    heldout, edgy = harmbench_prompts(cache, 100), overrefusal_prompts(cache)
    refused = [refused_by(folder, "best_trial", detector) for folder in args.results]
    hard = [p for p in heldout if any(r[p] for r in refused)]
    system = settings.system_prompt
    source = fixed_source(args.source, cache, sets)
    started = time.perf_counter()
    base = load_model(settings)
    base_logprobs = first_token_logprobs(base, chat_texts(base.tokenizer, sets.harmless_eval, system), 64)
    # A second harmless distribution for the KL: the 80 benign-but-edgy prompts (a null-space edit
    # is fitted to the built-in harmless prompts' style, which the study's KL prompts share).
    edgy_logprobs = first_token_logprobs(base, chat_texts(base.tokenizer, edgy, system), 64)
    residuals = None  # (direction prompts, harmless), read in the unedited model now or the edited one below
    preserve = shares = None
    if args.read_in == "unedited":
        residuals = [collect_residuals(base, prompts, system, 16) for prompts in (source, sets.harmless)]
        if args.preserve:
            preserve, shares = harmless_input_bases(base, sets.harmless, system, args.preserve)
    del base
    edited = load_model(load_settings(None, {"model": str(args.edited)}))

    def measure() -> dict:
        logprobs = first_token_logprobs(edited, chat_texts(edited.tokenizer, sets.harmless_eval, system), 64)
        answers = generate(edited, chat_texts(edited.tokenizer, hard, system), 128, 16, desc="hard core, 128 tokens")
        verdicts = detector.classify(hard, answers)
        kept = [{"prompt": p, "refused": v, "response": a} for p, a, v in zip(hard, answers, verdicts, strict=True)]
        edgy_texts = chat_texts(edited.tokenizer, edgy, system)
        edgy_kl = kl_divergence(edgy_logprobs, first_token_logprobs(edited, edgy_texts, 64))
        row = {"kl": round(kl_divergence(base_logprobs, logprobs), 4), "kl_edgy": round(edgy_kl, 4),
               "refused": sum(verdicts), "answers": kept}  # fmt: skip
        if args.heldout:
            for name, prompts, length in (("heldout_refusals_long", heldout, 128), ("overrefusal", edgy, 32)):
                answers = generate(edited, chat_texts(edited.tokenizer, prompts, system), length, 32,
                                   desc=f"{name}, {length} tokens")  # fmt: skip
                verdicts = detector.classify(prompts, answers)
                row[name] = sum(verdicts)
                row[f"{name}_prompts"] = [p for p, v in zip(prompts, verdicts, strict=True) if v]
        return row

    rows = [{"edit": "the chosen edit alone", **measure()}]
    if source is None:
        source = [a["prompt"] for a in rows[0]["answers"] if a["refused"]]
        if not source:
            sys.exit("--source refused: the edited model refuses none of the hard core")
    if residuals is None:
        residuals = [collect_residuals(edited, prompts, system, 16) for prompts in (source, sets.harmless)]
    if args.preserve and preserve is None:
        preserve, shares = harmless_input_bases(edited, sets.harmless, system, args.preserve)
    if shares:
        print(f"--preserve {args.preserve}: the kept directions hold {min(shares.values()):.3f}-"
              f"{max(shares.values()):.3f} of each module's harmless input energy", flush=True)  # fmt: skip
    directions = refusal_directions(*residuals)  # (layers, d)
    gaps = residuals[0].double().mean(0) - residuals[1].double().mean(0)  # (layers, d), for "add"
    original = saved_weights(edited)
    for edit in edits:
        handle = apply_edit(edited, original, edit, directions, gaps, preserve)
        try:
            rows.append({"edit": edit, **measure()})
        finally:
            if handle is not None:
                handle.remove()
        print(f"{json.dumps(edit)}: KL {rows[-1]['kl']}, hard core refused {rows[-1]['refused']}/{len(hard)}",
              flush=True)  # fmt: skip
    if args.save and edits:
        if edits[-1][0] == "add":
            sys.exit("--save: the last edit is an activation addition (a hook, not weights)")
        apply_edit(edited, original, edits[-1], directions, gaps, preserve)
        edited.model.save_pretrained(args.save)
        edited.tokenizer.save_pretrained(args.save)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"edited": str(args.edited), "results": [str(r) for r in args.results], "source": args.source,
              "read_in": args.read_in, "preserve": args.preserve,
              "preserved_energy": None if not shares else {f"{i}.{n}": round(v, 4) for (i, n), v in shares.items()},
              "source_prompts": len(source), "hard_core": hard, "seconds": round(time.perf_counter() - started),
              "rows": rows}  # fmt: skip
    name = (args.source + ("-unedited" if args.read_in == "unedited" else "") + ("-heldout" if args.heldout else "")
            + (f"-preserve-{args.preserve}" if args.preserve else ""))
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.source} ({len(source)} prompts), hard core {len(hard)}; the chosen edit alone: KL {rows[0]['kl']}, "
          f"refused {rows[0]['refused']}")  # fmt: skip
    for row in rows:
        refusing = [a["prompt"][:38] for a in row["answers"] if a["refused"]]
        print(f"  {json.dumps(row['edit'])[:60]:60s} KL {row['kl']:<7} (benign-edgy {row['kl_edgy']:<7}) "
              f"refused {row['refused']}: {refusing}")  # fmt: skip
        if args.heldout:
            print(f"    held out {row['heldout_refusals_long']}/100 at 128 tokens, "
                  f"over-refusal {row['overrefusal']}/80: "
                  f"{[p[:38] for p in row['heldout_refusals_long_prompts']]}")  # fmt: skip


if __name__ == "__main__":
    main()
