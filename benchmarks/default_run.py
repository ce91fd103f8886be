"""The README's first command, measured: `python -m heretic_like` with nothing overridden, on the
testbed model, from a fresh cache (the GGUF conversion included) to the export written; then the
exported model and the unedited one scored on 100 held-out HarmBench behaviours (never seen by
the study) and 80 benign-but-edgy prompts; the 128-token held-out responses (generated whole,
not stopped at the first marker) are judged again by
a judge detector (the 1.5B testbed model, or `--judge-model`) and the disagreements listed
(`--judge-only` does just that for a finished `--out`).

A run stopped part-way (Ctrl-C, `kill` (SIGTERM) on this script or the command, or a session
that ends before a 1.5B study does) keeps its study
in `--out`; `--resume-from OUT` with the same arguments continues it, and the summary adds the
parts' times. `--base-from OUT` reuses the unedited model's held-out scores from an earlier run
of the same model (checked against the command's settings before the study starts, and again at
the end), which saves the half of the scoring that does not depend on the study.

    python benchmarks/default_run.py [--out benchmarks/results-default] [-- --n-trials 12 ...]

Arguments after `--` go to the command (the quick variant); the summary records them. The run
happens in `benchmarks/.cache/default-run/` with HOME pointing inside it, so nothing cached from
earlier runs is reused. Writes `summary.json`, `summary.md`, `run.log`, `heldout_responses.json` and the
finished study (`checkpoints/`: its journal and directions, for reading any trial's parameters) to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from qwen_benchmark import front_long_counts, harmbench_prompts, overrefusal_prompts  # noqa: E402

from heretic_like.config import load_settings  # noqa: E402
from heretic_like.detectors import MarkerDetector, ModelJudge, agreement  # noqa: E402
from heretic_like.evaluation import refusal_count  # noqa: E402
from heretic_like.model import chat_texts, load_model  # noqa: E402
from heretic_like.records import StudyRecord  # noqa: E402
from heretic_like.screening import rank_correlation  # noqa: E402
from heretic_like.store import fail_stale_trials, load_existing_study, settings_of  # noqa: E402
from heretic_like.testbed import fetch_qwen  # noqa: E402


def score(settings, loaded, prompts: list[str], length: int, batch_size: int,
          whole: bool = False) -> tuple[int, list[dict], float, list]:  # fmt: skip
    """(refusals, refused prompts with their responses, seconds, every response with its verdict).
    `whole`: refused rows run to `length` too (same verdicts; slower), so a judge reads whole
    answers rather than the text up to the first marker."""
    texts = chat_texts(loaded.tokenizer, prompts, settings.system_prompt)
    started = time.perf_counter()
    counted = refusal_count(loaded, texts, prompts, MarkerDetector.from_settings(settings), length, batch_size,
                            stop_rows=not whole)  # fmt: skip
    every = [{"prompt": p, "response": r, "markers": bool(v)}
             for p, r, v in zip(prompts, counted.responses, counted.refused, strict=True)]  # fmt: skip
    refused = [{"prompt": e["prompt"], "response": e["response"]} for e in every if e["markers"]]
    return counted.refusals, refused, time.perf_counter() - started, every


def keep_study(work: Path, out: Path) -> None:
    """Keep the study (journal, directions, layer metrics) beside its scores: a stopped part's, for
    `--resume-from`, or a finished one's, so any trial's parameters can be read later; an earlier
    part's copy is stale and goes.
    Files only: the exported model (GBs) is a folder in the same place."""
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    (out / "checkpoints").mkdir()
    for path in (work / "checkpoints").iterdir():
        if path.is_file():
            shutil.copy2(path, out / "checkpoints")


def save_part(work: Path, out: Path, measured: dict, parts: list[dict]) -> None:
    """The command stopped (Ctrl-C, SIGTERM, a session's end) with a study on disk: keep its checkpoints
    (journal, directions) and this part's cost in `out`, so a later `--resume-from out` continues
    the same study instead of starting again; the parts' times and peaks add up in the summary."""
    (journal,) = (work / "checkpoints").glob("*.journal")
    study = load_existing_study(str(journal), None)
    fail_stale_trials(study)  # the trial the stop cut short, marked here: on another host it could not be
    keep_study(work, out)
    done = len(StudyRecord(study).trials())  # complete or pruned: what a resume counts as done
    part = {**measured, "finished_trials": done, "ended": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    log = out / f"run-part-{len(parts) + 1}.log"
    (out / "run.log").rename(log)
    (out / "parts.json").write_text(json.dumps([*parts, part], indent=1) + "\n")
    sys.exit(f"the command stopped ({measured['returncode']}) after {done} finished trials; its study is kept "
             f"in {out / 'checkpoints'} and its log in {log}: run again with --resume-from {out}")


def resume_parts(folder: Path, work: Path) -> list[dict]:
    """Put a stopped run's checkpoints into the fresh work folder (the command resumes that study)
    and return its earlier parts' costs."""
    if not (folder / "parts.json").is_file() or not list((folder / "checkpoints").glob("*.journal")):
        sys.exit(f"--resume-from {folder}: no stopped study there (parts.json and checkpoints/*.journal)")
    shutil.copytree(folder / "checkpoints", work / "checkpoints")
    return json.loads((folder / "parts.json").read_text())


def check_base(folder: Path, settings, heldout: list[str], long: int, batch_size: int | None,
               study_name: str | None) -> tuple[dict, list[dict]]:  # fmt: skip
    """Exit unless `folder`'s unedited scores are this run's: they depend on the model, prompts,
    lengths, batch size and markers, not on the study, so each is checked and the stored long
    answers are recounted with today's markers. Runs before the study with what the command's
    settings fix (None: not known yet), then at the end with all of it. Returns its summary and
    stored unedited answers."""
    summary = json.loads((folder / "summary.json").read_text())
    wanted = {"max_response_length": settings.max_response_length, "long_response_length": long,
              "study": study_name, "batch_size": batch_size}  # fmt: skip
    for key, value in wanted.items():
        if value is not None and summary.get(key) != value:
            sys.exit(f"--base-from {folder}: its {key} is {summary.get(key)!r}, this run's is {value!r}")
    every = json.loads((folder / "heldout_responses.json").read_text())["base"]
    if [e["prompt"] for e in every] != heldout:
        sys.exit(f"--base-from {folder}: its held-out prompts are not this run's")
    verdicts = MarkerDetector.from_settings(settings).classify(heldout, [e["response"] for e in every])
    long_count = int(summary["base_refusals_heldout_long"].split("/")[0])
    if verdicts != [e["markers"] for e in every] or sum(verdicts) != long_count:
        sys.exit(f"--base-from {folder}: today's markers count its stored answers differently")
    return summary, every


def planned_settings(command: list[str]):
    """The settings the command will run with, read by its own `config` subcommand in an empty
    folder (the command runs in one, without a config.toml), so that a mismatch is an error before
    an hour of trials rather than after."""
    with tempfile.TemporaryDirectory() as empty:
        env = {**os.environ, "HOME": empty, "PYTHONPATH": str(ROOT)}
        shown = subprocess.run([sys.executable, "-m", "heretic_like", "config", *command], cwd=empty, env=env,
                               capture_output=True, text=True, stdin=subprocess.DEVNULL)  # fmt: skip
        if shown.returncode != 0:
            sys.exit(f"the command's settings: {(shown.stderr.strip().splitlines() or ['no output'])[-1]}")
        (Path(empty) / "planned.toml").write_text(shown.stdout)
        return load_settings(str(Path(empty) / "planned.toml"))


def reused_base(folder: Path, study_name: str, settings, heldout: list[str], long: int,
                batch_size: int) -> tuple[dict, list[dict]]:  # fmt: skip
    """The unedited model's held-out and over-refusal scores from an earlier run's `--out`, instead of
    generating them again (12+ min on the 1.5B), once `check_base` has found them this run's."""
    summary, every = check_base(folder, settings, heldout, long, batch_size, study_name)
    seconds = summary["timings_s"]["heldout_scoring"]["base"]
    row = {"heldout_refusals": int(summary["base_refusals_heldout"].split("/")[0]),
           "heldout_refusals_long": int(summary["base_refusals_heldout_long"].split("/")[0]),
           "overrefusal": summary["overrefusal"]["base"], "still_refused": None, "still_refused_long": None,
           "seconds": {k: f"reused from {folder.name} ({v} s)" for k, v in seconds.items()}}  # fmt: skip
    return row, every


def judge_check(judge, answered: dict[str, list[dict]]) -> dict:
    """The markers' held-out verdicts checked by the judge detector: per model the two counts,
    agreement and Cohen's kappa, and every disagreement with its text (the judge can be wrong
    too: the list is there to be read)."""
    out: dict = {"disagreements": []}
    for name, every in answered.items():
        markers = [e["markers"] for e in every]
        verdicts = judge.classify([e["prompt"] for e in every], [e["response"] for e in every])
        out[name] = {"markers": sum(markers), "judge": sum(verdicts), **agreement(markers, verdicts)}
        out["disagreements"] += [{"model": name, **e, "judge": v}
                                 for e, v in zip(every, verdicts, strict=True) if v != e["markers"]]  # fmt: skip
    return out


def judge_path(choice: str | None) -> str:
    """The judge model: the one asked for, else the 1.5B testbed model (fetched if missing)."""
    return choice or str(fetch_qwen(ROOT / "models", "1.5b"))


def add_judge_check(out: Path, judge_path: str) -> None:
    """Judge `out`'s stored held-out responses and write the check into its summary (json, md)."""
    summary = json.loads((out / "summary.json").read_text())
    answered = json.loads((out / "heldout_responses.json").read_text())
    started = time.perf_counter()
    judge = load_model(load_settings(None, {"model": judge_path}))
    summary["judge_check"] = {"judge": Path(judge_path).name, "length": summary["long_response_length"],
                              **judge_check(ModelJudge(judge, summary["batch_size"]), answered)}  # fmt: skip
    summary["timings_s"]["judge_check"] = round(time.perf_counter() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary))


def summary_markdown(summary: dict) -> str:
    """The summary's headline table, from the summary alone."""
    best, over, judged = summary["best_trial"], summary["overrefusal"], summary.get("judge_check")
    short, long = summary["max_response_length"], summary["long_response_length"]
    lines = [f"# Default run: `{summary['command']}`", "", f"Machine: {summary['machine']}", "",
             "| | unedited | chosen trial |", "|---|---|---|",
             f"| refusals, {summary['study_eval']['harmful']} study prompts | {summary['base_refusals_study_eval']} | "
             f"{best['study_refusals']} ({best['study_refusals_verify']} at {summary['verify_response_length']} "
             "tokens) |",
             f"| refusals, 100 held-out HarmBench, {short} tokens | {summary['base_refusals_heldout']} | "
             f"{best['heldout_refusals']} |",
             f"| refusals, 100 held-out HarmBench, {long} tokens | {summary['base_refusals_heldout_long']} | "
             f"{best['heldout_refusals_long']} |"]  # fmt: skip
    if judged:
        lines += [f"| the same, judged by {judged['judge']} | {judged['base']['judge']} | "
                  f"{judged['best_trial']['judge']} |",
                  f"| judge vs markers: agreement, kappa | {judged['base']['agreement']}, {judged['base']['kappa']} | "
                  f"{judged['best_trial']['agreement']}, {judged['best_trial']['kappa']} |"]  # fmt: skip
    lines += [f"| over-refusal, {over['prompts']} benign-edgy | {over['base']} | {over['best_trial']} |",
              f"| KL divergence | 0 | {best['kl_divergence']:.4f} |"]
    if best.get("kl_divergence_exported") is not None:
        lines.append(f"| KL divergence, exported weights | 0 | {best['kl_divergence_exported']:.4f} |")
    lines += ["",
              f"Trial {best['trial']} of {summary['n_trials']} ({summary['n_pruned']} pruned, "
              f"{summary['n_screened']} screened), batch size {summary['batch_size']}; proxy rank correlation "
              f"{summary['proxy_rank_correlation']}.", "",
              "Time (s): " + ", ".join(f"{k} {v}" for k, v in summary["timings_s"].items() if not isinstance(v, dict)),
              ""]  # fmt: skip
    return "\n".join(lines)


def exported_folder(log: str) -> Path:
    """The export the summary block names (its `exported` row; the KL row above it says "with the
    exported weights", which an unanchored search took for the folder)."""
    return Path(re.search(r"^\s*exported\s+(\S+)", log, re.M).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results-default"))
    parser.add_argument("--long", type=int, default=128, help="held-out responses are also counted this long")
    parser.add_argument("--score-only", action="store_true",
                        help="do not run the command again: score the export of the last run in the work folder")
    parser.add_argument("--resume-from", default=None, type=Path,
                        help="continue the study of an earlier --out whose command was stopped (its checkpoints "
                             "and parts.json), with the same command arguments")
    parser.add_argument("--base-from", default=None, type=Path,
                        help="reuse the unedited model's scores from this earlier --out (same model, prompts, "
                             "lengths, batch size and markers: checked) instead of generating them again")
    parser.add_argument("--judge-model", default=None,
                        help="model that judges the long held-out responses (default: the 1.5B testbed model)")
    parser.add_argument("--no-judge", action="store_true", help="skip the judge cross-check")
    parser.add_argument("--judge-only", action="store_true",
                        help="only judge the held-out responses stored in --out and update its summary")
    parser.add_argument("command", nargs="*", help="extra arguments for the command, after --")
    args = parser.parse_args()
    out, cache = Path(args.out).resolve(), ROOT / "benchmarks" / ".cache"  # absolute: the scoring runs in `work`
    base_from = args.base_from.resolve() if args.base_from else None  # (resolved before the chdir to `work`)
    out.mkdir(parents=True, exist_ok=True)
    if args.judge_only:
        add_judge_check(out, judge_path(args.judge_model))
        print((out / "summary.md").read_text())
        return
    work = cache / "default-run"
    heldout, edgy = harmbench_prompts(cache, 100), overrefusal_prompts(cache)
    if base_from and not args.score_only:  # what the command's settings fix, checked before the study
        planned = planned_settings(args.command)
        check_base(base_from, planned, heldout, args.long, planned.batch_size or None, None)
    started = time.perf_counter()
    if not args.score_only:
        shutil.rmtree(work, ignore_errors=True)
        (work / "home").mkdir(parents=True)
        (work / "models").symlink_to(fetch_qwen(ROOT / "models").parent.resolve())
        env = {**os.environ, "HOME": str(work / "home"), "PYTHONPATH": str(ROOT), "CI": "1"}
        parts = resume_parts(args.resume_from.resolve(), work) if args.resume_from else []
        command = [sys.executable, "-m", "heretic_like", *args.command]
        with open(out / "run.log", "w") as log:
            child = subprocess.Popen(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)  # fmt: skip
            # `kill` (SIGTERM) on this script reaches the command as well: it stops at its next trial
            # boundary like a Ctrl-C, and this script keeps its study (a background run ignores Ctrl-C)
            previous = signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
            try:
                returncode = child.wait()
            except KeyboardInterrupt:  # the command got the Ctrl-C too and stops at its next trial boundary:
                returncode = child.wait()  # wait for it (subprocess.run would kill it), then keep its study
            finally:
                signal.signal(signal.SIGTERM, previous)
        measured = {"seconds": round(time.perf_counter() - started, 1), "returncode": returncode,
                    "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)}
        if returncode != 0 and list((work / "checkpoints").glob("*.journal")):
            save_part(work, out, measured, parts)  # exits: resume with --resume-from
        if returncode == 0:
            keep_study(work, out)
        if parts:  # the whole study's cost: every part's time, the highest peak
            measured = {**measured, "seconds": round(measured["seconds"] + sum(p["seconds"] for p in parts), 1),
                        "peak_rss_gib": max([measured["peak_rss_gib"], *(p["peak_rss_gib"] for p in parts)]),
                        "parts": [*parts, dict(measured)]}  # fmt: skip
        (out / "command.json").write_text(json.dumps(measured) + "\n")
    measured = json.loads((out / "command.json").read_text()) if (out / "command.json").is_file() else {}
    study_total, peak_rss = measured.get("seconds"), measured.get("peak_rss_gib")
    text = (out / "run.log").read_text()
    if measured.get("returncode", 0) != 0:
        sys.exit(f"the command failed ({measured['returncode']}); see {out / 'run.log'}")
    trial = int(re.search(r"Chosen trial (\d+)", text).group(1))
    exported = exported_folder(text)
    (journal,) = (work / "checkpoints").glob("*.journal")
    study = load_existing_study(str(journal), None)
    os.chdir(work)  # the study's paths are relative to where it ran
    os.environ["HOME"] = str(work / "home")
    settings = settings_of(study)
    record = StudyRecord(study)
    frozen = record.trial(trial)
    batch_size = int(record.batch_size)
    length = settings.max_response_length

    rows, answered = {}, {}
    if base_from:
        rows["base"], answered["base"] = reused_base(base_from, study.study_name, settings, heldout,
                                                     args.long, batch_size)  # fmt: skip
    for name, model in (("base", settings.model), ("best_trial", str(work / exported))):
        if name in rows:
            continue
        loaded = load_model(settings.model_copy(update={"model": model, "gguf_file": None}))
        held, still, held_s, _ = score(settings, loaded, heldout, length, batch_size)
        held_long, still_long, long_s, answered[name] = score(settings, loaded, heldout, args.long, batch_size,
                                                              whole=True)  # fmt: skip
        over, _, _, _ = score(settings, loaded, edgy, length, batch_size)
        del loaded
        rows[name] = {"heldout_refusals": held, "heldout_refusals_long": held_long, "overrefusal": over,
                      "still_refused": still, "still_refused_long": still_long,
                      "seconds": {"heldout": round(held_s, 1), "heldout_long": round(long_s, 1)}}  # fmt: skip
    (out / "heldout_responses.json").write_text(json.dumps(answered, indent=1) + "\n")
    timings = record.run_timings
    trials = record.trials()
    scored = [t for t in trials if t.predicted_refusals is not None and not t.screened and t.refusals is not None]
    seconds = {k: round(sum(t.attr(k) or 0.0 for t in trials), 1) for k in ("kl_seconds", "generation_seconds")}
    trials_wall = round(sum(t.trial.duration.total_seconds() for t in trials), 1)
    summary = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, python "
                   f"{platform.python_version()}, torch {torch.__version__}",
        "command": " ".join(["python -m heretic_like", *args.command]),
        "study": study.study_name,
        "n_trials": len(trials),
        "n_pruned": sum(t.state.name == "PRUNED" for t in trials),
        # multi-fidelity: trials decided without generating, how well the proxy ranks the generated
        # counts (Spearman, over generated trials), and the long recounts of trials entering the front
        "n_screened": sum(bool(t.screened) for t in trials),
        "proxy_rank_correlation": rank_correlation([t.predicted_refusals for t in scored],
                                                   [t.refusals for t in scored]),  # fmt: skip
        "front_long_counts": front_long_counts(study),
        "batch_size": batch_size,
        "batch_size_choice": record.batch_size_choice,
        "max_response_length": length,
        "long_response_length": args.long,
        "verify_response_length": settings.verify_response_length,
        "study_eval": {"harmful": int(record.n_harmful_eval)},
        "base_refusals_study_eval": record.base_refusals,
        "base_scores_from": str(args.base_from) if args.base_from else None,
        "base_refusals_heldout": f"{rows['base']['heldout_refusals']}/{len(heldout)}",
        "base_refusals_heldout_long": f"{rows['base']['heldout_refusals_long']}/{len(heldout)}",
        "best_trial": {
            "rule": f"{settings.export_rule}, KL <= {settings.export_kl_limit}, exchange {settings.export_kl_exchange}",
            "trial": trial,
            "study_refusals": frozen.refusals,
            "study_refusals_verify": record.long_refusals(trial, settings.verify_response_length),
            "heldout_refusals": rows["best_trial"]["heldout_refusals"],
            "heldout_refusals_long": rows["best_trial"]["heldout_refusals_long"],
            "kl_divergence": frozen.kl_divergence,
            # the exported weights' own KL where the trials scored an approximation (row_normalization "full")
            "kl_divergence_exported": record.exported_kl(trial),
        },
        "overrefusal": {"prompts": len(edgy), "base": rows["base"]["overrefusal"],
                        "best_trial": rows["best_trial"]["overrefusal"]},  # fmt: skip
        "capability": record.capability,
        "heldout_still_refused": rows["best_trial"]["still_refused"],
        "heldout_still_refused_long": rows["best_trial"]["still_refused_long"],
        "timings_s": {**timings, "study_total": study_total,
                      # from each trial's own start and end, so a study run in parts is timed whole
                      "trials_wall": trials_wall,
                      "per_trial_mean": round((trials_wall if measured.get("parts") else timings.get("trials", 0))
                                              / max(len(trials), 1), 1),
                      "trials_kl": seconds["kl_seconds"], "trials_generation": seconds["generation_seconds"],
                      "heldout_scoring": {k: v["seconds"] for k, v in rows.items()},
                      "benchmark_total": round(time.perf_counter() - started, 1)},  # fmt: skip
        "peak_rss_gib_command": peak_rss,
        "command_parts": measured.get("parts"),
        "trials": [{"trial": t.number, "state": t.state.name, "refusals": t.refusals,
                    "refusals_at_least": t.refusals_at_least, "kl_divergence": t.kl_divergence,
                    "kl_seconds": t.attr("kl_seconds"), "generation_seconds": t.attr("generation_seconds")}
                   for t in trials],  # fmt: skip
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary))
    if not args.no_judge:
        add_judge_check(out, judge_path(args.judge_model))
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
