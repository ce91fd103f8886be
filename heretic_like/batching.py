"""Choosing the batch size by measurement.

A trial's cost is dominated by generating responses: each batch prefills its prompts, then runs
one decode step per token for all its rows at once. Bigger batches make each decode step cheaper
per row until the device is saturated; past that point they only cost memory and pruning
granularity (a dominated trial stops at the end of a batch). So each candidate size is timed the
way a trial runs it (packed prefill at the harmful prompts' real lengths, then decode steps),
after a warm-up, the median of several repetitions, and the cheapest size per response wins;
among sizes within `tolerance` of it the largest is taken.

`choose_batch_size` is the pure choice over any `measure(size)` function (tested on injected
timings); `model_timer` measures a loaded model.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .generation import PREFILL_ROWS, SharedPrefix
from .kv_cache import with_cache
from .model import LoadedModel

GPU_MEMORY_SHARE = 0.85  # a size whose probe peaks above this share of device memory is not taken


@dataclass(frozen=True)
class BatchTiming:
    """One candidate size: median seconds to prefill its rows and of one decode step, and what
    one response of `tokens` tokens costs at that size."""

    size: int
    prefill_s: float
    step_s: float
    tokens: int

    @property
    def seconds_per_response(self) -> float:
        return (self.prefill_s + self.tokens * self.step_s) / self.size


@dataclass(frozen=True)
class BatchChoice:
    size: int
    reason: str
    timings: tuple[BatchTiming, ...]

    def to_dict(self) -> dict:
        """JSON-ready, for the study: the choice, why, and every size's measured costs."""
        rows = [{**asdict(t), "seconds_per_response": round(t.seconds_per_response, 5)} for t in self.timings]
        return {"size": self.size, "reason": self.reason, "timings": rows}


class TooLarge(Exception):
    """A size that does not fit: out of memory, or above the memory share kept free."""


def candidate_sizes(max_batch_size: int) -> list[int]:
    """Powers of two up to the limit, and the limit itself."""
    sizes = [2**i for i in range(int(math.log2(max_batch_size)) + 1)]
    return sizes if sizes[-1] == max_batch_size else sizes + [max_batch_size]


def choose_batch_size(measure: Callable[[int], BatchTiming], sizes: list[int], tolerance: float = 0.05) -> BatchChoice:
    """Measure every size (ascending) until one does not fit; take the largest size whose cost
    per response is within `tolerance` of the cheapest.

    Every size is measured rather than stopping at the first that is not much better: timings
    are noisy and not monotone (a size can be slower than the next by chance or by kernel choice),
    and on a saturated CPU costs are flat, where "first not 10 % better" stops anywhere. Sizes
    within `tolerance` are equally cheap as far as the probe can tell, and which of them comes out
    cheapest is run-to-run drift; the largest of them is taken, which makes the choice stable
    (testbed, 2-core CPU: 32 and 64 within 2 % of each other, whole trials 8 % faster at 64;
    docs/benchmarks.md "Batch size")."""
    timings: list[BatchTiming] = []
    stopped = ""
    for size in sorted(sizes):
        try:
            timings.append(measure(size))
        except TooLarge as exc:
            stopped = f"; {size} does not fit ({exc})"
            break
    if not timings:
        return BatchChoice(1, f"no size fits{stopped}: 1", ())
    cheapest = min(timings, key=lambda t: t.seconds_per_response)
    best = cheapest.seconds_per_response
    chosen = [t for t in timings if t.seconds_per_response <= best * (1 + tolerance)][-1]
    reason = f"{chosen.seconds_per_response:.3f} s per response"
    if cheapest.size != chosen.size:
        reason += f", the largest size within {tolerance:.0%} of the cheapest ({cheapest.size}: {best:.3f} s)"
    else:
        reason += ", the cheapest"
    return BatchChoice(chosen.size, reason + stopped, tuple(timings))


def settled(samples: list[float]) -> float:
    """The median of repeated timings after the first (the warm-up: allocations, kernel choice):
    one slow run, from a busy neighbour or a page fault, does not move it."""
    return statistics.median(samples[1:] if len(samples) > 1 else samples)


class Clock(StoppingCriteria):
    """Records when each generated token is ready; never stops generation."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def model_timer(loaded: LoadedModel, texts: list[str], tokens: int, steps: int = 5,
                reps: int = 3) -> Callable[[int], BatchTiming]:  # fmt: skip
    """`measure(size)` for a loaded model, on `texts` (chat-formatted prompts of the lengths a trial
    meets). Up to PREFILL_ROWS rows the packed prefill is timed as it runs; above, generation
    prefills in chunks of PREFILL_ROWS rows, so its cost per row is the same as at PREFILL_ROWS
    and the decode steps run on that cache tiled to the size. One warm-up, then the median of
    `reps` runs of `steps` decode steps each."""
    tokenizer = loaded.tokenizer
    rows = tokenizer(texts[:PREFILL_ROWS], add_special_tokens=False)["input_ids"]
    rows = (rows * PREFILL_ROWS)[:PREFILL_ROWS]
    prefix = SharedPrefix(loaded, rows)
    base: dict[str, object] = {}
    cuda = loaded.device.type == "cuda"

    def timed_prefill(chunk: list[list[int]]):
        started = time.perf_counter()
        cache = prefix.generation_cache(chunk)
        _sync(cuda)
        return cache, time.perf_counter() - started

    def run(chunk: list[list[int]], cache, repeat: int) -> list[float]:
        ids, mask = prefix.batch(chunk)
        if repeat > 1:
            ids, mask = ids.repeat_interleave(repeat, 0), mask.repeat_interleave(repeat, 0)
        batch = {"input_ids": ids, "attention_mask": mask}
        if cache is not None:
            cache = copy.deepcopy(cache)
            if repeat > 1:
                cache.batch_repeat_interleave(repeat)
            with_cache(loaded.model, batch, cache)
        clock = Clock()
        started = time.perf_counter()
        loaded.model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                              temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id,
                              stopping_criteria=StoppingCriteriaList([clock]))  # fmt: skip
        _sync(cuda)
        stamps = [started] + clock.stamps
        return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]

    @torch.inference_mode()
    def measure(size: int) -> BatchTiming:
        if cuda:
            torch.cuda.reset_peak_memory_stats(loaded.device)
        chunk = rows[: min(size, PREFILL_ROWS)]
        repeat = max(size // len(chunk), 1)
        try:
            if size <= PREFILL_ROWS or "cache" not in base:
                timed = [timed_prefill(chunk) for _ in range(reps + 1)]
                cache, prefill = timed[-1][0], settled([seconds for _, seconds in timed])
                if len(chunk) == PREFILL_ROWS:
                    base.update(cache=cache, prefill=prefill)
            else:
                cache, prefill = base["cache"], base["prefill"]
            steps = [statistics.median(run(chunk, cache, repeat)) for _ in range(reps + 1)]
        except torch.OutOfMemoryError as exc:
            if cuda:
                torch.cuda.empty_cache()
            raise TooLarge("out of memory") from exc
        if cuda:
            share = torch.cuda.max_memory_allocated(loaded.device) / torch.cuda.get_device_properties(
                loaded.device).total_memory  # fmt: skip
            if share > GPU_MEMORY_SHARE:
                raise TooLarge(f"peak {share:.0%} of device memory")
        return BatchTiming(size, prefill * size / len(chunk), settled(steps), tokens)

    return measure


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()
