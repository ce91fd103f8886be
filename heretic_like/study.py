"""The study run: prepare everything a trial needs (model, batch size, directions, evaluator,
the unedited model's counts), run the trials, and recount a chosen one with long responses.

Storage and stored values are `store`; what a trial samples and minimises is `search`; tables,
the front and the export choice are `results`; directions and layer metrics are `geometry`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
import torch
from tqdm.auto import tqdm

from .ablation import Abliterator, EditOptions
from .batching import candidate_sizes, choose_batch_size, model_timer
from .config import Settings
from .detectors import MarkerDetector, ModelJudge, agreement, build_detector, judge_warning
from .directions import RefusalGeometry
from .errors import HereticError
from .evaluation import Evaluator, FirstLook, detect_response_prefix
from .generation import generate
from .geometry import GeometryOptions, PromptFilter, cached_geometry, compute_geometry
from .interrupts import noting_interrupts, stop_if_interrupted
from .margin import refusal_margin, unedited_opening_rates
from .model import LoadedModel, chat_texts, load_model, matches_fingerprint, model_fingerprint
from .preservation import kept_inputs
from .prompts import PromptSets, load_all_prompts
from .records import FINISHED, StudyRecord, TrialRecord, response_prefix_of
from .report import plot_layer_metrics, write_residual_plot
from .results import ExportRule, pareto_front, print_front, recount_order, trials_table
from .screening import ScreeningOptions, calibrated_proxy, screen_reason
from .search import best_layer_seed, hardest_first, objectives, refusal_cap, sample_edit
from .store import (
    check_prompt_fingerprints,
    fail_own_running_trials,
    fail_stale_trials,
    is_shared_storage,
    open_study,
    study_file,
)


def resolve_response_prefix(settings: Settings, study: optuna.Study, loaded: LoadedModel | None = None,
                            prompts: PromptSets | None = None,
                            batch_size: int = 8) -> str:  # fmt: skip
    """The text put after the generation prompt. With "auto", detected once from the unedited
    model's openings (4 harmful + 4 harmless evaluation prompts) and kept in the study."""
    record = StudyRecord(study)
    if settings.response_prefix != "auto" or record.response_prefix is not None or loaded is None or prompts is None:
        return response_prefix_of(settings, study)
    prefix = sniff_response_prefix(settings, loaded, prompts, batch_size)
    record.response_prefix = prefix
    return prefix


def sniff_response_prefix(settings: Settings, loaded: LoadedModel, prompts: PromptSets,
                          batch_size: int = 8) -> str:  # fmt: skip
    """`response_prefix = "auto"`: the thinking block the unedited model opens its answers with
    (4 harmful + 4 harmless evaluation prompts, 16 tokens each), or ""."""
    texts = (chat_texts(loaded.tokenizer, prompts.harmful_eval[:4], prompts.system("harmful_eval"))
             + chat_texts(loaded.tokenizer, prompts.harmless_eval[:4], prompts.system("harmless_eval")))  # fmt: skip
    responses = generate(loaded, texts, 16, batch_size)
    prefix = detect_response_prefix(responses, settings.tags, texts[0])
    if prefix:
        print(f"The model opens its answers with a thinking block: measuring after {prefix!r}")
    elif os.path.commonprefix(responses).strip():
        print(f"Note: every sampled answer starts with {os.path.commonprefix(responses)!r}; "
              "set response_prefix to measure after it")  # fmt: skip
    return prefix


def choose_study_batch_size(settings: Settings, study: optuna.Study, loaded: LoadedModel, harmful: list[str],
                            timings: dict[str, float], system_prompt: str | None) -> int:  # fmt: skip
    """`batch_size`, or with 0 the size chosen by measurement when the study began (kept in the
    study with every size's timings, so a resume neither pays for the probe again nor lands on
    another size because the machine was busier this time)."""
    if settings.batch_size:
        return settings.batch_size
    record = StudyRecord(study)
    stored = record.batch_size_choice
    if stored is not None and stored["size"] <= settings.max_batch_size:
        print(f"Batch size: {stored['size']} (measured when the study began: {stored['reason']})")
        return int(stored["size"])
    started = time.perf_counter()
    texts = chat_texts(loaded.tokenizer, harmful, system_prompt)
    measure = model_timer(loaded, texts, settings.max_response_length)
    sizes = candidate_sizes(settings.max_batch_size)
    with tqdm(total=len(sizes), desc="timing batch sizes", unit="size", leave=False) as bar:  # ~1 min on a CPU

        def measured(size: int):
            bar.set_postfix_str(f"size {size}")
            timing = measure(size)
            bar.update(1)
            return timing

        choice = choose_batch_size(measured, sizes)
    timings["batch_size"] = time.perf_counter() - started
    record.batch_size_choice = choice.to_dict()
    costs = ", ".join(f"{t.size}: {t.seconds_per_response:.3f}" for t in choice.timings)
    print(f"Batch size: {choice.size} (measured in {timings['batch_size']:.0f} s; seconds per response {costs}; "
          f"{choice.reason})")  # fmt: skip
    return choice.size


def prepare(settings: Settings, study: optuna.Study, prompts: PromptSets, timings: dict[str, float]):
    """Model, batch size, directions and evaluator: everything a trial needs (phases timed)."""
    started = time.perf_counter()
    loaded = load_model(settings)
    timings["load"] = time.perf_counter() - started
    record = StudyRecord(study)
    stored = record.model_fingerprint
    if stored is not None and not matches_fingerprint(loaded.model, stored):
        raise HereticError(
            f"study '{study.study_name}' was run on a model with different weights or config than "
            f"'{settings.model}' (fingerprint {stored}); use another study_name"
        )
    if stored is None:
        record.record_model(model_fingerprint(loaded.model), loaded.num_layers)
    batch_size = choose_study_batch_size(settings, study, loaded, prompts.harmful_eval, timings,
                                         prompts.system("harmful_eval"))  # fmt: skip
    if record.batch_size is None:  # directions depend (in the last bits) on the batching
        record.record_batches(batch_size, settings.directions_batch_size or batch_size)
    prefix = resolve_response_prefix(settings, study, loaded, prompts, batch_size)
    started = time.perf_counter()
    detector = build_detector(settings, loaded, batch_size, prefix)
    timings["base_logprobs"] = time.perf_counter() - started
    started = time.perf_counter()
    options = GeometryOptions.from_settings(settings)
    prompt_filter = PromptFilter.of(settings, lambda: detector, batch_size)
    geometry = compute_geometry(options, loaded, prompts, record.directions_batch(), prefix, prompt_filter)
    describe_geometry(settings, geometry)
    timings["directions"] = time.perf_counter() - started
    plot = Path(settings.residual_plot_path) / f"{study.study_name}.residuals.png"
    if settings.plot_residuals and not plot.is_file():  # once per study: it collects the residuals again
        started = time.perf_counter()
        written = write_residual_plot(settings, loaded, prompts, prefix, record.directions_batch(), plot)
        print(f"Residual plot: {written}")
        timings["residual_plot"] = time.perf_counter() - started
    started = time.perf_counter()
    evaluator = Evaluator.of_study(loaded, prompts, detector, settings.max_response_length, batch_size,
                                  settings.stop_at_marker, prefix)  # fmt: skip
    timings["base_logprobs"] += time.perf_counter() - started
    return loaded, geometry, evaluator


def describe_geometry(settings: Settings, geometry: RefusalGeometry) -> None:
    """The per-layer metrics as `<study>.layers.csv` and a plot `<study>.layers.png`, and the best
    layer printed."""
    table = geometry.metrics()
    table.to_csv(study_file(settings, ".layers.csv"), index=False)
    plot_layer_metrics(geometry, study_file(settings, ".layers.png"), settings.model, settings.search.layer_window)
    if settings.print_residual_geometry:
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"Best layer by quality (snr x (1 - cos)) within search.direction_index: "
          f"{geometry.best_layer(settings.search.layer_window)} (all layers: {geometry.best_layer()}); "
          f"metrics in {study_file(settings, '.layers.csv')}")  # fmt: skip


@dataclass
class StudyRun:
    """What a finished run hands on: to export, to report, to benchmark."""

    study: optuna.Study
    abliterator: Abliterator
    geometry: RefusalGeometry
    evaluator: Evaluator
    table: pd.DataFrame
    timings: dict[str, float]


def run_study(settings: Settings) -> StudyRun:
    if settings.seed is not None:  # the sampler is seeded too (open_study): trials are deterministic
        torch.manual_seed(settings.seed)
    prompts = load_all_prompts(settings)  # bad prompt files fail before the slow model load
    study = open_study(settings)
    check_prompt_fingerprints(study, prompts)
    stale = fail_stale_trials(study, is_shared_storage(settings.resolved_storage()))
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    if done:
        print(f"Resuming study '{study.study_name}': {done}/{settings.n_trials} trials done"
              + (f", {stale} interrupted trial(s) discarded" if stale else ""))  # fmt: skip
    timings: dict[str, float] = {}
    loaded, geometry, evaluator = prepare(settings, study, prompts, timings)
    print(f"Model ready: {loaded.num_layers} layers (load {timings['load']:.1f} s, "
          f"directions {timings['directions']:.1f} s)")  # fmt: skip

    record = StudyRecord(study)
    markers = MarkerDetector.from_settings(settings, getattr(evaluator.detector, "prefix", ""))  # to compare a judge
    base_refusals = record.base_refusals
    if base_refusals is None:
        started = time.perf_counter()
        base = evaluator.score(desc="unedited model")
        timings["base_refusals"] = time.perf_counter() - started
        base_refusals = base.refusals
        if evaluator.detector.name != "markers":
            unedited_markers = markers.classify(evaluator.harmful_prompts, base.responses)
            agreed = agreement(base.refused, unedited_markers)
            record.detector_agreement_unedited = agreed
            print(f"Refusal detector '{evaluator.detector.name}' agrees with the markers on {agreed['agreement']:.0%} "
                  f"of the unedited model's responses (kappa {agreed['kappa']:.2f})")  # fmt: skip
            if warning := judge_warning(base.refusals, sum(unedited_markers), agreed["kappa"]):
                print(warning)
        record.record_base(base_refusals, evaluator.refused_positions(base), len(evaluator.harmful))
    screening = ScreeningOptions.from_settings(settings)
    # the proxy's probe: what the last layer leaves along the refusal direction where it is clearest
    probe = (loaded.num_layers - 1, geometry.directions[geometry.best_layer(settings.search.layer_window)])
    if (screening.enabled or settings.refusal_margin_weight) and record.base_first_look is None:  # unedited openings
        look = evaluator.first_look(probe)
        record.base_first_look = {"tokens": look.harmful_logprobs.argmax(-1).tolist(),
                                  "projections": look.projections.tolist()}  # fmt: skip
    print(f"Unedited model refuses {base_refusals}/{len(evaluator.harmful)} harmful evaluation prompts")
    weight = settings.refusal_margin_weight
    margin_rates = unedited_opening_rates(record) if weight else None

    kept = kept_inputs(settings.preserved_input_rank, loaded, prompts, settings.search.components,
                       resolve_response_prefix(settings, study), record.directions_batch())  # fmt: skip
    abliterator = Abliterator(loaded, settings.search.components, geometry, EditOptions.from_settings(settings), kept)
    if isinstance(evaluator.detector, ModelJudge) and evaluator.detector.loaded is loaded:
        evaluator.detector.unedited = abliterator.unedited  # the model judges with its original weights
    if settings.search.seed_best_layer and not study.trials:
        study.enqueue_trial(best_layer_seed(settings.search, geometry), skip_if_exists=True)

    def screen(trial: optuna.Trial, stored: TrialRecord, edit, approximation, look: FirstLook,
               opening_margin: float | None) -> None:  # fmt: skip
        """The proxy on the first look; a trial that cannot enter the front ends here (pruned,
        with the proxy's numbers and the reason stored)."""
        kl, seconds = look.kl_divergence, look.seconds
        tokens, projections = look.harmful_logprobs.argmax(-1).tolist(), look.projections.tolist()
        predicted, margin = calibrated_proxy(trial.study, tokens, projections)
        stored.record_first_look(tokens, projections, predicted)
        if not screening.audited(trial.number):
            reason = screen_reason(predicted, refusal_cap(trial.study, opening_margin, weight)(kl), margin)
            if reason is not None:
                stored.record_score(kl, seconds, 0.0, 0, [])
                stored.record_edit(edit, approximation)
                stored.record_screened(reason)
                tqdm.write(f"trial {trial.number}: KL {kl:.4f}, screened out without generating: {reason} "
                           f"({seconds:.1f} s)")  # fmt: skip
                raise optuna.TrialPruned()

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        stored = TrialRecord(trial)
        stored.record_worker()
        edit = sample_edit(trial, settings.search, geometry, settings.capability_prompts is not None)
        stats = abliterator.apply(edit)
        # how far the trial-time LoRA is from the exact edit: only "full" row normalisation approximates
        full = settings.row_normalization == "full"
        approximation = (stats.approximation_error, stats.row_norm_error) if full else None
        evaluator.prioritize(hardest_first(trial.study))
        look, opening_margin = None, None  # the first look (KL, first tokens: one forward); margin.py
        if screening.enabled or margin_rates is not None:
            look = evaluator.first_look(probe if screening.enabled else None)
        if margin_rates is not None:
            opening_margin = refusal_margin(look.harmful_logprobs, margin_rates)
            stored.record_margin(opening_margin)
        if screening.enabled:
            screen(trial, stored, edit, approximation, look, opening_margin)
        cap = refusal_cap(trial.study, opening_margin, weight) if settings.prune_dominated else None
        score = evaluator.score(f"trial {trial.number}", cap, look)
        stored.record_score(score.kl_divergence, score.kl_seconds, score.generation_seconds, score.tokens_generated,
                            evaluator.refused_positions(score))  # fmt: skip
        stored.record_edit(edit, approximation)
        stored.record_refusals(score.refusals, score.pruned)
        if score.pruned:
            with_margin = " (with the refusal margin: no better)" if opening_margin is not None else ""
            stored.record_pruned(f"dominated: {score.refusals} refusals, as many as a finished trial with no higher "
                                 f"KL has{with_margin}")  # fmt: skip
            seconds = score.kl_seconds + score.generation_seconds
            tqdm.write(f"trial {trial.number}: KL {score.kl_divergence:.4f}, pruned after {score.refusals} refusals "
                       f"(dominated by a finished trial; {seconds:.1f} s)")  # fmt: skip
            raise optuna.TrialPruned()
        if evaluator.detector.name != "markers":
            asked = evaluator.harmful_prompts[: len(score.responses)]
            marker_verdicts = markers.classify(asked, score.responses)
            stored.record_marker_agreement(sum(marker_verdicts), agreement(score.refused, marker_verdicts)["agreement"])
        if settings.print_responses:
            for prompt, response in zip(evaluator.harmful_prompts, score.responses, strict=True):
                tqdm.write(f"[{trial.number}] {prompt!r}\n    -> {response!r}")
        tqdm.write(f"trial {trial.number}: refusals {score.refusals}/{len(evaluator.harmful)}, "
                   f"KL {score.kl_divergence:.4f} ({score.kl_seconds:.1f} s KL, "
                   f"{score.generation_seconds:.1f} s generation)")  # fmt: skip
        return objectives(score.refusals, score.kl_divergence, base_refusals, settings.kl_divergence_scale,
                          settings.kl_divergence_target, weight * (opening_margin or 0.0))  # fmt: skip

    remaining = settings.n_trials - done
    if remaining > 0:
        bar = tqdm(total=settings.n_trials, initial=done, desc="trials", unit="trial")
        started = time.perf_counter()
        interrupts: list[int] = []
        try:
            with noting_interrupts() as interrupts:
                study.optimize(objective, n_trials=remaining, callbacks=[
                    optuna.study.MaxTrialsCallback(settings.n_trials, states=FINISHED),
                    lambda *_: bar.update(1),
                    stop_if_interrupted(interrupts),  # a Ctrl-C a finaliser swallowed (interrupts.py)
                ])  # fmt: skip
        except BaseException as exc:
            if not isinstance(exc, KeyboardInterrupt) and not interrupts:
                raise
            # A Ctrl-C outside the objective (while Optuna opens a new trial or closes one)
            # leaves that trial RUNNING; inside the close, Optuna 5.0 even turns it into an
            # UnboundLocalError. Either way: close the trial, and stop as an interrupt.
            fail_own_running_trials(study, is_shared_storage(settings.resolved_storage()))
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise KeyboardInterrupt from exc
        finally:
            bar.close()
            timings["trials"] = time.perf_counter() - started
    if settings.front_response_length > settings.max_response_length:
        started = time.perf_counter()
        if recount_front(study, abliterator, evaluator, settings.front_response_length, ExportRule.of(settings, study)):
            timings["front_recount"] = time.perf_counter() - started
    table = print_front(study)
    return StudyRun(study, abliterator, geometry, evaluator, table, timings)


def recount_front(study: optuna.Study, abliterator: Abliterator, evaluator: Evaluator, length: int,
                  rule: ExportRule) -> int:  # fmt: skip
    """Count the Pareto front's trials again with `length`-token responses, before the front is
    shown or a trial chosen from it; returns how many were counted now.

    Short responses miss refusals that follow a compliant opening. Only the final front matters
    (a trial that left the front is never shown there, and the sampler reads the short counts),
    and of it only the trials the export rule could pick: they are counted best bound first
    (`results.recount_order`) until no other can beat the best long count. Trials counted
    before (a resumed study, an earlier front) are not counted again."""
    record = StudyRecord(study)
    front = pareto_front(trials_table(study))
    if front.empty:
        return 0
    counted, best = 0, float("inf")
    for number, bound in recount_order(front, rule):
        if bound > best:  # even its short count cannot beat a long count already measured
            break
        trial = record.trial(number)
        count = trial.refusals_long if trial.refusals_long is not None else record.front_recount(number, length)
        if count is None:
            abliterator.apply(trial.edit)
            count, _ = evaluator.count_refusals(length, f"front trial {number}, {length}-token responses")
            record.set_front_recount(number, length, count)
            counted += 1
            tqdm.write(f"trial {number} (on the Pareto front): {count}/{len(evaluator.harmful)} refusals with "
                       f"{length}-token responses")  # fmt: skip
        best = min(best, float(rule.score(count, trial.kl_divergence)))
    return counted


def verify_long_responses(run: StudyRun, settings: Settings, number: int) -> dict[str, int] | None:
    """Re-count the chosen trial's refusals with `verify_response_length`-token responses.

    Short responses undercount: a model may open compliantly and refuse a sentence later. Both
    counts are printed and kept in the study (finished trials are read-only in Optuna, so in the
    study's `long_refusals` attr), and the model card shows them.
    """
    length = settings.verify_response_length
    if length <= settings.max_response_length:
        return None
    record = StudyRecord(run.study)
    trial = record.trial(number)
    count = record.long_refusals(number, length)
    if count is None:
        run.abliterator.apply(trial.edit)
        started = time.perf_counter()
        count, _ = run.evaluator.count_refusals(length, f"trial {number}, {length}-token responses")
        run.timings["verify_long"] = time.perf_counter() - started
        record.set_long_refusals(number, length, count)
    total = len(run.evaluator.harmful)
    print(f"Trial {number}: {trial.refusals}/{total} refusals with {settings.max_response_length}-token "
          f"responses, {count}/{total} with {length}-token responses")  # fmt: skip
    return {"refusals": trial.refusals, "refusals_long": count, "length": length}


def study_abliterator(study: optuna.Study, settings: Settings, components: list[str]) -> Abliterator:
    """The study's model, checked against its fingerprint, ready to take the study's edits (for
    export and chat after the run): directions from the cache, or measured as the run did."""
    loaded = load_model(settings)
    record = StudyRecord(study)
    stored = record.model_fingerprint
    if stored is not None and not matches_fingerprint(loaded.model, stored):
        raise HereticError(f"'{settings.model}' is not the model study '{study.study_name}' was run on")
    options = GeometryOptions.from_settings(settings)
    prefix = resolve_response_prefix(settings, study)
    batch = record.directions_batch(settings.directions_batch_size or settings.batch_size or 8)
    geometry = cached_geometry(options, loaded.num_layers)
    prompts = load_all_prompts(settings) if geometry is None or settings.preserved_input_rank else None  # to measure
    if geometry is None:
        scoring = record.batch_size or batch  # filtered as the run did, or an export writes another edit
        prompt_filter = PromptFilter.of(settings, lambda: build_detector(settings, loaded, scoring, prefix), scoring)
        geometry = compute_geometry(options, loaded, prompts, batch, prefix, prompt_filter)
    kept = None if prompts is None else kept_inputs(settings.preserved_input_rank, loaded, prompts, components,
                                                    prefix, batch)  # fmt: skip
    return Abliterator(loaded, components, geometry, EditOptions.from_settings(settings), kept)
