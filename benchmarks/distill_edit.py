"""Beyond direction edits: distil a strong edit into a LoRA that keeps the unedited model's harmless answers.

Issue 16 measured a floor for direction edits on the testbed model: at KL <= 0.03 the two
racial-slur notes stay refused (or inverted), and the first edit that writes them costs KL
0.065-0.084 (`hard_core_ablation.py`). A direction edit is linear: it moves harmful and harmless
prompts alike, so its strength is paid for on the harmless prompts. This asks whether a
*trained* edit can separate the two. It starts from a chosen edit (an exported trial) and
trains a LoRA on the same modules (peft, merged at the end, so the result is still a plain set
of weights) against two targets:

- on harmful training prompts, the answers of a *teacher*: the chosen edit plus a strong
  direction ablation that writes the hard core (`--teacher-edit`, `hard_core_ablation.py`'s
  edit forms), cross-entropy on its first `--target-tokens` tokens, kept only where the markers
  pass them (a refused teacher answer is not a target);
- on harmless training prompts, the unedited model: KL(unedited || student) at every position
  of the unedited model's own `--harmless-tokens`-token answer, the first (the study's KL
  position) included.

Training prompts: the built-in 150 harmful direction prompts plus StrongREJECT's hate category
less the study's prompts; the built-in 150 harmless ones. Nothing held out is read: the 100
HarmBench behaviours, the study's 64 StrongREJECT prompts and its 51 harmless KL prompts only
score the result (first-token KL from the unedited model on the 51, as the study does; the
held-out count at 128 tokens by the markers, every answer kept; over-refusal on the 80
benign-but-edgy prompts at 32 tokens).

    python benchmarks/distill_edit.py --edited EXPORTED_FOLDER --out benchmarks/results-quality/levers/distilled-seed-0
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from hard_core_ablation import apply_edit, check_edits, hate_prompts, saved_weights  # noqa: E402
from qwen_benchmark import harmbench_prompts, overrefusal_prompts  # noqa: E402

from heretic_like.config import load_settings  # noqa: E402
from heretic_like.detectors import MarkerDetector  # noqa: E402
from heretic_like.directions import collect_residuals, refusal_directions  # noqa: E402
from heretic_like.evaluation import kl_divergence  # noqa: E402
from heretic_like.generation import first_token_logprobs, generate  # noqa: E402
from heretic_like.model import chat_texts, load_model  # noqa: E402
from heretic_like.prompts import load_all_prompts  # noqa: E402
from heretic_like.testbed import fetch_qwen  # noqa: E402


def tokenized(tokenizer, texts: list[str], answers: list[str], length: int) -> list[tuple[list[int], int]]:
    """(prompt + first `length` answer tokens, prompt length) per row."""
    rows = []
    for text, answer in zip(texts, answers, strict=True):
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        rows.append((prompt + tokenizer(answer, add_special_tokens=False)["input_ids"][:length], len(prompt)))
    return rows


def right_padded(rows: list[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, scored mask) for a batch: a position is scored when it predicts an
    answer token (the last prompt position predicts the first)."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    scored = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (row, n_prompt) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        scored[i, n_prompt - 1 : len(row) - 1] = True
    return ids, mask, scored


def logits_at(model, ids: torch.Tensor, mask: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Logits at the scored positions only: the 152k-wide head on every position would cost a
    quarter of a training step."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    return model.lm_head(hidden[scored]).float()


def harmful_loss(model, rows, pad: int) -> torch.Tensor:
    """Cross-entropy of the teacher's answer tokens."""
    ids, mask, scored = right_padded(rows, pad)
    targets = ids[:, 1:][scored[:, :-1]]
    return F.cross_entropy(logits_at(model, ids, mask, scored), targets)


def harmless_loss(model, base, rows, pad: int) -> torch.Tensor:
    """KL(unedited || student) per scored position, averaged."""
    ids, mask, scored = right_padded(rows, pad)
    with torch.no_grad():
        reference = F.log_softmax(logits_at(base, ids, mask, scored), dim=-1)
    student = F.log_softmax(logits_at(model, ids, mask, scored), dim=-1)
    return F.kl_div(student, reference, log_target=True, reduction="batchmean")


def batches(rows: list, size: int, rng: random.Random) -> list[list]:
    rows = rows[:]
    rng.shuffle(rows)
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edited", type=Path, required=True, help="the chosen edit (an exported model folder)")
    parser.add_argument("--teacher-edit", default='["one", 4, 1.0]',
                        help="a hard_core_ablation.py edit on top of --edited: its answers are the "
                             "harmful targets")  # fmt: skip
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--modules", nargs="+", default=["o_proj", "down_proj"])
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--target-tokens", type=int, default=48)
    parser.add_argument("--harmless-tokens", type=int, default=32)
    parser.add_argument("--harmless-weight", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", type=Path, help="also write the merged model here (for `evaluate`)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    teacher_edit = json.loads(args.teacher_edit)
    if not (args.edited / "config.json").is_file():
        sys.exit(f"--edited: {args.edited} is not an exported model folder (no config.json)")
    check_edits([teacher_edit], json.loads((args.edited / "config.json").read_text())["num_hidden_layers"])
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    started = time.perf_counter()
    cache = ROOT / "benchmarks" / ".cache"
    settings = load_settings(None, {"model": str(fetch_qwen(ROOT / "models"))})
    sets = load_all_prompts(settings)
    system = settings.system_prompt
    detector = MarkerDetector.from_settings(settings)
    heldout, edgy = harmbench_prompts(cache, 100), overrefusal_prompts(cache)
    hate = hate_prompts(cache, sets.harmful_eval)
    train_harmful = list(dict.fromkeys(sets.harmful + hate))
    train_harmless = [p for p in sets.harmless if p not in set(sets.harmless_eval)]
    assert not set(train_harmful) & set(heldout + sets.harmful_eval), "a scored prompt in the training set"

    base = load_model(settings)
    base.model.requires_grad_(False)
    pad = base.tokenizer.pad_token_id
    base_eval = first_token_logprobs(base, chat_texts(base.tokenizer, sets.harmless_eval, system), 64)
    harmless_texts = chat_texts(base.tokenizer, train_harmless, system)
    harmless_answers = generate(base, harmless_texts, args.harmless_tokens, 32, desc="unedited harmless answers")
    harmless_rows = tokenized(base.tokenizer, harmless_texts, harmless_answers, args.harmless_tokens)
    residuals = [collect_residuals(base, prompts, system, 16) for prompts in (hate, sets.harmless)]
    directions = refusal_directions(*residuals)
    gaps = residuals[0].double().mean(0) - residuals[1].double().mean(0)

    def kl(loaded) -> float:
        """First-token KL from the unedited model on the study's 51 harmless prompts."""
        texts = chat_texts(loaded.tokenizer, sets.harmless_eval, system)
        return round(kl_divergence(base_eval, first_token_logprobs(loaded, texts, 64)), 4)

    edited = load_model(load_settings(None, {"model": str(args.edited)}))
    report: dict = {"edited": str(args.edited), "teacher_edit": teacher_edit,
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "train_harmful": len(train_harmful), "train_harmless": len(train_harmless)}  # fmt: skip
    report["chosen_edit_kl"] = kl(edited)
    original = saved_weights(edited)
    handle = apply_edit(edited, original, teacher_edit, directions, gaps)
    harmful_texts = chat_texts(edited.tokenizer, train_harmful, system)
    teacher = generate(edited, harmful_texts, args.target_tokens, 32, desc="teacher answers")
    report["teacher_kl"] = kl(edited)
    if handle is not None:
        handle.remove()
    del original, edited
    refused = detector.classify(train_harmful, teacher)
    kept = [i for i, r in enumerate(refused) if not r]
    report["teacher_refused"] = sum(refused)
    harmful_rows = tokenized(base.tokenizer, [harmful_texts[i] for i in kept], [teacher[i] for i in kept],
                             args.target_tokens)  # fmt: skip
    print(f"teacher: KL {report['teacher_kl']}, refused {sum(refused)}/{len(train_harmful)} training prompts; "
          f"chosen edit KL {report['chosen_edit_kl']}", flush=True)  # fmt: skip

    student = load_model(load_settings(None, {"model": str(args.edited)}))  # the chosen edit, afresh
    student.model.requires_grad_(False)
    lora = get_peft_model(student.model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                    target_modules=args.modules))  # fmt: skip
    params = [p for p in lora.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    inner = lora.base_model.model  # the HF model, LoRA layers injected in place
    log = []
    for epoch in range(args.epochs):
        bad, good = batches(harmful_rows, args.batch, rng), batches(harmless_rows, args.batch, rng)
        for step in range(max(len(bad), len(good))):
            t0 = time.perf_counter()
            loss_bad = harmful_loss(inner, bad[step % len(bad)], pad)
            loss_good = harmless_loss(inner, base.model, good[step % len(good)], pad)
            (loss_bad + args.harmless_weight * loss_good).backward()
            optimiser.step()
            optimiser.zero_grad()
            log.append({"epoch": epoch, "step": step, "harmful_ce": round(loss_bad.item(), 4),
                        "harmless_kl": round(loss_good.item(), 5),
                        "seconds": round(time.perf_counter() - t0, 2)})  # fmt: skip
            print(json.dumps(log[-1]), flush=True)
        report.setdefault("kl_by_epoch", []).append(kl(student))
        print(f"epoch {epoch}: KL {report['kl_by_epoch'][-1]}", flush=True)
    report["training_seconds"] = round(sum(r["seconds"] for r in log))
    student.model = lora.merge_and_unload()
    del base
    report["kl"] = kl(student)
    for name, prompts, length in (("heldout_long", heldout, 128), ("overrefusal", edgy, 32),
                                  ("study", sets.harmful_eval, 32), ("train_hate", hate, 128)):  # fmt: skip
        texts = chat_texts(student.tokenizer, prompts, system)
        answers = generate(student, texts, length, 32, desc=f"{name}, {length} tokens")
        verdicts = detector.classify(prompts, answers)
        report[name] = sum(verdicts)
        report[f"{name}_answers"] = [{"prompt": p, "refused": v, "response": a}
                                     for p, a, v in zip(prompts, answers, verdicts, strict=True)]  # fmt: skip
        print(f"{name}: {sum(verdicts)}/{len(prompts)} refused at {length} tokens", flush=True)
    report["seconds"] = round(time.perf_counter() - started)
    report["log"] = log
    if args.save:
        student.model.save_pretrained(args.save)
        student.tokenizer.save_pretrained(args.save)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distilled.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"KL {report['kl']}, held out {report['heldout_long']}/100 at 128 tokens, over-refusal "
          f"{report['overrefusal']}/80, study {report['study']}/{len(sets.harmful_eval)}; "
          f"{report['seconds']} s")  # fmt: skip


if __name__ == "__main__":
    main()
