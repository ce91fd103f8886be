"""Capability evaluation: does the edited model still work? Base and edited, side by side.

Built-in offline checks, shipped in `heretic_like/data` and written for this project:
multiple-choice questions scored by log-likelihood (`capability_choice.jsonl`, 50), short
free-form tasks checked against accepted answers (`capability_tasks.jsonl`, 25), and
over-refusal on benign prompts with edgy wording (`builtin:edgy`, 40). Any
lm-evaluation-harness task runs too when `lm-eval` is installed and its data is reachable.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from .detectors import MarkerDetector, strip_thinking
from .errors import HereticError
from .evaluation import count_refusals
from .generation import generate, left_padded, positions
from .model import LoadedModel, chat_texts, peft_quietly


def _jsonl(name: str) -> list[dict]:
    import datasets

    datasets.disable_progress_bars()
    path = str(resources.files("heretic_like").joinpath("data", name))
    return list(datasets.load_dataset("json", data_files=path, split="train"))


def choice_questions() -> list[dict]:
    """{"question", "choices", "answer" (index)} rows of the built-in multiple-choice set."""
    return _jsonl("capability_choice.jsonl")


def free_form_tasks() -> list[dict]:
    """{"prompt", "answers" (accepted)} rows of the built-in free-form set."""
    return _jsonl("capability_tasks.jsonl")


@torch.inference_mode()
def continuation_logprobs(loaded: LoadedModel, contexts: list[str], continuations: list[str],
                          batch_size: int) -> list[tuple[float, int]]:  # fmt: skip
    """(sum of log-probabilities, token count) of each continuation after its context."""
    tokenizer = loaded.tokenizer
    rows = []
    for context, continuation in zip(contexts, continuations, strict=True):
        head = tokenizer(context, add_special_tokens=False)["input_ids"]
        tail = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        rows.append((head + tail, len(tail)))
    out: list[tuple[float, int]] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        ids, mask = left_padded([row for row, _ in batch], tokenizer.pad_token_id, loaded.device)
        # Only the positions that predict a continuation token get logits: a whole batch's
        # (rows x length x vocabulary) would be 3 GiB at 64 rows on a 150k vocabulary.
        keep = max(n for _, n in batch) + 1
        logits = loaded.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                              logits_to_keep=keep).logits  # fmt: skip
        logprobs = F.log_softmax(logits.float(), dim=-1).cpu()
        for i, (row, n) in enumerate(batch):
            targets = torch.tensor(row[len(row) - n :])
            predicted = logprobs[i, keep - n - 1 : keep - 1]  # position t predicts token t + 1
            out.append((float(predicted.gather(1, targets[:, None]).sum()), n))
    return out


def choice_scores(loaded: LoadedModel, questions: list[dict], system_prompt: str | None, batch_size: int,
                  response_prefix: str = "") -> dict[str, float]:  # fmt: skip
    """Accuracy (choice with the highest log-likelihood per character, as lm-eval's acc_norm) and
    the mean log-likelihood per token of the right choice: the finer sign of damage."""
    contexts = chat_texts(loaded.tokenizer, [q["question"] for q in questions], system_prompt, response_prefix)
    pairs = [(context, choice) for context, q in zip(contexts, questions, strict=True) for choice in q["choices"]]
    scores = iter(continuation_logprobs(loaded, [c for c, _ in pairs], [c for _, c in pairs], batch_size))
    correct, likelihood = 0, 0.0
    for q in questions:
        per_choice = [next(scores) for _ in q["choices"]]
        lengths = [max(len(choice), 1) for choice in q["choices"]]
        normalised = [logprob / n for (logprob, _), n in zip(per_choice, lengths, strict=True)]
        correct += max(range(len(normalised)), key=normalised.__getitem__) == q["answer"]
        logprob, tokens = per_choice[q["answer"]]
        likelihood += logprob / max(tokens, 1)
    return {"choice_accuracy": correct / len(questions), "choice_loglik": likelihood / len(questions)}


def answer_matches(response: str, answers: list[str], tags=()) -> bool:
    """The first line of the answer (thinking removed, quotes and trailing punctuation stripped)
    is, or begins with as a whole word, one of the accepted answers; case-insensitive."""
    text = strip_thinking(response, tags).strip()
    line = text.splitlines()[0] if text else ""
    line = line.strip().strip("`\"'*").rstrip(".!").strip().lower()
    for answer in answers:
        answer = answer.lower()
        if line == answer or re.match(rf"{re.escape(answer)}(?!\w)", line):
            return True
    return False


def task_scores(loaded: LoadedModel, tasks: list[dict], system_prompt: str | None, batch_size: int,
                response_prefix: str = "", tags=(), max_new_tokens: int = 24) -> dict[str, float]:  # fmt: skip
    texts = chat_texts(loaded.tokenizer, [t["prompt"] for t in tasks], system_prompt, response_prefix)
    responses = generate(loaded, texts, max_new_tokens, batch_size)
    solved = sum(answer_matches(r, t["answers"], tags) for r, t in zip(responses, tasks, strict=True))
    return {"tasks_solved": solved / len(tasks)}


def require_lm_eval(settings) -> None:
    """Fail before any slow work when lm_eval_tasks are asked for but lm-eval is missing."""
    import importlib.util

    if settings.lm_eval_tasks and importlib.util.find_spec("lm_eval") is None:
        raise HereticError("lm_eval_tasks need the lm-eval package: pip install lm-eval")


def lm_eval_scores(loaded: LoadedModel, tasks: list[str], limit: int | None, batch_size: int) -> dict[str, float]:
    """Scores of lm-evaluation-harness tasks (each metric, no stderr), run on the loaded model."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise HereticError("lm_eval_tasks need the lm-eval package: pip install lm-eval") from None
    try:
        model = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
        results = lm_eval.simple_evaluate(model=model, tasks=list(tasks), limit=limit)
    except Exception as exc:  # unknown task, unreachable dataset, ...: one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HereticError(f"lm-eval could not run {', '.join(tasks)}: {first}") from None
    out = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            name, _, _ = key.partition(",")
            if isinstance(value, (int, float)) and "stderr" not in name and name != "alias":
                out[f"lm-eval {task} {name}"] = float(value)
    return out


LABELS = {
    "choice_accuracy": "multiple choice accuracy",
    "choice_loglik": "log-likelihood of the right choice (nats/token)",
    "tasks_solved": "free-form tasks solved",
    "overrefusal": "over-refusal (benign, edgy wording)",
}


def evaluate_capabilities(loaded: LoadedModel, settings, batch_size: int, response_prefix: str = "",
                          edgy: list[str] | None = None) -> dict[str, float]:  # fmt: skip
    """Every capability metric for whatever edit is currently applied to `loaded`."""
    tags = settings.tags
    metrics = choice_scores(loaded, choice_questions(), settings.system_prompt, batch_size, response_prefix)
    metrics |= task_scores(loaded, free_form_tasks(), settings.system_prompt, batch_size, response_prefix, tags)
    if edgy:
        detector = MarkerDetector.from_settings(settings, response_prefix)
        own = settings.overrefusal_prompts.system_prompt if settings.overrefusal_prompts else None
        texts = chat_texts(loaded.tokenizer, edgy, settings.system_prompt if own is None else own, response_prefix)
        refused, _, _ = count_refusals(loaded, texts, settings.max_response_length, batch_size, detector, prompts=edgy)
        metrics["overrefusal"] = refused / len(edgy)
    if settings.lm_eval_tasks:
        metrics |= lm_eval_scores(loaded, settings.lm_eval_tasks, settings.lm_eval_limit, batch_size)
    return metrics


def comparison(base: dict[str, float], edited: dict[str, float]) -> pd.DataFrame:
    rows = [{"metric": LABELS.get(k, k), "base": base[k], "edited": edited.get(k, float("nan")),
             "delta": edited.get(k, float("nan")) - base[k]} for k in base]  # fmt: skip
    return pd.DataFrame(rows)


def markdown_table(table: pd.DataFrame) -> str:
    lines = ["| metric | base | edited | delta |", "|---|---|---|---|"]
    for row in table.itertuples(index=False):
        lines.append(f"| {row.metric} | {row.base:.3f} | {row.edited:.3f} | {row.delta:+.3f} |")
    return "\n".join(lines) + "\n"


def save_comparison(table: pd.DataFrame, folder: str | Path, stem: str = "capability") -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}.csv", folder / f"{stem}.md"]
    table.to_csv(paths[0], index=False)
    paths[1].write_text(markdown_table(table))
    return paths


CARD_HEADING = "## Capability evaluation"


def card_section(table: pd.DataFrame) -> str:
    return (f"{CARD_HEADING}\n\nBuilt-in offline checks of heretic_like (`python -m heretic_like evaluate`), "
            f"unedited vs this model:\n\n{markdown_table(table)}")  # fmt: skip


def add_to_card(readme: Path, table: pd.DataFrame) -> None:
    """Put (or replace) the capability section in a model card."""
    text = readme.read_text() if readme.is_file() else ""
    if CARD_HEADING in text:
        head, _, rest = text.partition(CARD_HEADING)
        following = rest.find("\n## ")
        text = head + (rest[following + 1 :] if following >= 0 else "")
    readme.write_text(text.rstrip("\n") + "\n\n" + card_section(table))


# ----------------------------------------------------------------------------- orchestration


def evaluate_trial(run, settings, number: int) -> pd.DataFrame:
    """Unedited vs trial `number` in a finished study run (the model is already loaded): the
    table is printed, saved beside the study and kept in it for the model card."""
    from .records import StudyRecord, response_prefix_of, trial_edit
    from .store import study_file

    study = run.study
    batch = run.evaluator.batch_size
    prefix = response_prefix_of(settings, study)
    edgy = _edgy(settings)
    record = StudyRecord(study)
    stored = record.capability
    if "base" not in stored:
        run.abliterator.reset()
        stored["base"] = evaluate_capabilities(run.abliterator.loaded, settings, batch, prefix, edgy)
    if str(number) not in stored:
        edit, _ = trial_edit(study, number)
        run.abliterator.apply(edit)
        stored[str(number)] = evaluate_capabilities(run.abliterator.loaded, settings, batch, prefix, edgy)
        record.capability = stored
    table = comparison(stored["base"], stored[str(number)])
    folder = study_file(settings, "").parent
    save_comparison(table, folder, f"{settings.resolved_study_name()}.capability-trial{number}")
    print(f"Capabilities, unedited vs trial {number}:\n{table.to_string(index=False, float_format='{:.3f}'.format)}")
    return table


def _edgy(settings) -> list[str] | None:
    from .prompts import load_prompts

    spec = settings.overrefusal_prompts
    return load_prompts(spec, "overrefusal_prompts") if spec is not None else None


def chosen_benchmarks(settings, asked: list[str]) -> list[str]:
    """The lm-eval tasks of `settings.benchmarks` asked for by task or name (`all`: every one);
    an unknown one is an error that lists what is offered."""
    offered = {key.lower(): b.task for b in settings.benchmarks for key in (b.task, b.name)}
    if any(a.lower() == "all" for a in asked):
        return [b.task for b in settings.benchmarks]
    unknown = [a for a in asked if a.lower() not in offered]
    if unknown:
        names = ", ".join(b.task for b in settings.benchmarks) or "none: the config's `benchmarks` is empty"
        raise HereticError(f"--benchmark {unknown[0]}: not among the config's benchmarks ({names})")
    return list(dict.fromkeys(offered[a.lower()] for a in asked))


def evaluate_models(settings, compare: str, out_dir: str | Path | None = None,
                    benchmarks: list[str] = ()) -> pd.DataFrame:  # fmt: skip
    """`settings.model` (base) vs `compare` (a model folder or hub id, or a peft adapter folder
    for the base), evaluated one after the other; the table is printed and saved to `out_dir`
    (default: the compared folder), and put into its model card when it has one. `benchmarks`
    picks lm-eval tasks from the config's `benchmarks` to run besides `lm_eval_tasks`."""
    import gc

    from .model import load_model

    chosen = chosen_benchmarks(settings, list(benchmarks))
    if chosen:
        settings = settings.model_copy(update={"lm_eval_tasks": list(dict.fromkeys(settings.lm_eval_tasks + chosen))})
    elif settings.benchmarks:
        print(f"Benchmarks offered (evaluate --benchmark TASK, or all): "
              f"{', '.join(b.task for b in settings.benchmarks)}")  # fmt: skip
    require_lm_eval(settings)
    edgy = _edgy(settings)
    batch = settings.batch_size or 8
    prefix = None if settings.response_prefix == "auto" else settings.response_prefix
    results = []
    for which in ("base", "edited"):
        if which == "edited" and (Path(compare) / "adapter_config.json").is_file():
            from peft import PeftModel

            loaded = load_model(settings)
            with peft_quietly():
                loaded.model = PeftModel.from_pretrained(loaded.model, compare).eval()
        else:
            loaded = load_model(settings if which == "base" else settings.model_copy(update={"model": compare,
                                                                                            "gguf_file": None}))
        if prefix is None:  # "auto": detected once, on the base model, and used for both
            from .prompts import load_all_prompts
            from .study import sniff_response_prefix

            prefix = sniff_response_prefix(settings, loaded, load_all_prompts(settings), batch)
        print(f"Evaluating {which} model ({settings.model if which == 'base' else compare}) ...", flush=True)
        results.append(evaluate_capabilities(loaded, settings, batch, prefix, edgy))
        del loaded
        gc.collect()
    table = comparison(*results)
    print(table.to_string(index=False, float_format="{:.3f}".format))
    folder = Path(out_dir) if out_dir else (Path(compare) if Path(compare).is_dir() else Path("evaluation"))
    for path in save_comparison(table, folder):
        print(path)
    if (Path(compare) / "README.md").is_file() and "heretic_like" in (Path(compare) / "README.md").read_text():
        add_to_card(Path(compare) / "README.md", table)
    return table
