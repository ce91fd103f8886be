"""The default command, in order: run (or resume) the study, choose a trial, recount it with long
responses, check its capabilities, export it, and print one summary block."""

from __future__ import annotations

import time

from .config import Settings
from .dashboard import attach_plots
from .export import KLReference, export_trial
from .provenance import build_record, write_record
from .records import StudyRecord
from .results import ExportRule, choose_best, pick_trial
from .store import study_file
from .study import run_study, verify_long_responses
from .summary import RunSummary, summary_block


def run_and_export(settings: Settings, interactive: bool) -> None:
    """The whole default command. Each phase's wall time goes into the summary block and into the
    study (`run_timings`, the last run's), where benchmarks read it."""
    if settings.evaluate_capabilities:
        from .capability import require_lm_eval

        require_lm_eval(settings)  # a missing lm-eval fails before hours of trials, not after
    if settings.plot_residuals:
        from .report import ResidualPlotStyle

        ResidualPlotStyle.from_settings(settings).check()  # a bad colour fails now, not after the directions
    run = run_study(settings)
    choice = pick_trial(settings, run.study, run.table, interactive)
    if choice is None:
        if not run.table.empty:  # nothing exported: still record how to rebuild the best trial
            best = choose_best(run.table, ExportRule.of(settings, run.study))
            path = write_record(build_record(run.study, settings, best), study_file(settings, ".reproduce.json"))
            print(f"Best trial {best} recorded in {path}")
        return
    number, timings = choice.trial, run.timings
    long = verify_long_responses(run, settings, number)  # times itself ("verify_long") when it runs
    capability = None
    if settings.evaluate_capabilities:
        from .capability import evaluate_trial

        started = time.perf_counter()
        capability = evaluate_trial(run, settings, number)
        timings["capability"] = time.perf_counter() - started
    started = time.perf_counter()
    reference = KLReference(run.evaluator.harmless, run.evaluator.base_logprobs, run.evaluator.batch_size)
    out = export_trial(run.study, settings, number, None, run.abliterator, reference)
    timings["export"] = time.perf_counter() - started
    # the chosen trial's plots, where `python -m heretic_like dashboard` shows them
    attach_plots(run.study, settings.resolved_storage(), settings.study_checkpoint_dir, number)
    record = StudyRecord(run.study)
    record.run_timings = {k: round(v, 1) for k, v in timings.items()}
    trial = record.trial(number)
    print(summary_block(RunSummary(
        trial=number, reason=choice.reason, refusals=int(trial.refusals),
        harmful=len(run.evaluator.harmful), base_refusals=int(record.base_refusals),
        kl_divergence=float(trial.kl_divergence), exported_kl=record.exported_kl(number), long=long,
        capability=capability,
        export_dir=out, study_path=settings.resolved_storage(), timings=timings,
    )))  # fmt: skip
