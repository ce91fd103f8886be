"""Generation as a trial runs it: the prompts' shared prefix computed once, batches prefilled
packed (no padding positions computed), greedy decoding with streaming early stops, and the
first-token log-probabilities the KL divergence is measured on."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import DynamicLayer

from .kv_cache import output_cache, with_cache
from .model import LoadedModel


def shared_prefix_length(rows: list[list[int]]) -> int:
    """Tokens every row starts with (chat template + system prompt), leaving each row >= 1 of its own."""
    if len(rows) < 2:
        return 0
    limit = min(len(r) for r in rows) - 1
    length = 0
    while length < limit and all(r[length] == rows[0][length] for r in rows):
        length += 1
    return length


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows, from their attention mask: each row counts from 0 at its
    first real token, as if it were unpadded."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def left_padded(rows: list[list[int]], pad_token_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token rows, padded on the left to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def _plain_layers(cache) -> bool:
    """Whether a cache is one plain key/value tensor pair per layer, the only kind
    `SharedPrefix.prefill` assembles (not sliding-window or linear-attention layers)."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _plain_cache(config) -> bool:
    """Whether the cache the model builds for itself (from its config) has plain layers."""
    try:
        return _plain_layers(DynamicCache(config=config))
    except (TypeError, ValueError, AttributeError, KeyError):
        return False


PREFILL_ROWS = 8  # rows per length-sorted prefill chunk: little padding, still large matmuls

# Prompts' KV caches already computed under the current edit (by the first look), by token row:
# per layer, the (heads, len(row) - 1, head_dim) keys and values of every position but the last,
# which is what a generation batch's prefill computes. Valid for one edit only.
Prefilled = dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]]


class SharedPrefix:
    """The tokens every prompt starts with (chat template, system prompt), run through the model
    once; each batch then starts from a copy of its KV cache and computes only its own tokens.

    Rows are laid out as prefix | padding | own tokens, with the padding masked out, so positions
    (taken from the attention mask) are those of the unpadded prompt."""

    @torch.no_grad()
    def __init__(self, loaded: LoadedModel, rows: list[list[int]], prefilled: Prefilled | None = None):
        self.loaded = loaded
        self.prefilled = prefilled or {}
        self.length = shared_prefix_length(rows)
        self.ids = rows[0][: self.length] if self.length else []
        self.cache = None
        self.packable = _plain_cache(loaded.model.config)
        if self.length:
            self.cache = output_cache(loaded.model(torch.tensor([self.ids], device=loaded.device), use_cache=True,
                                                   logits_to_keep=1))  # fmt: skip

    def batch_cache(self, rows: int):
        """A fresh copy of the prefix's KV cache for a batch of `rows` (generation appends to it)."""
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(rows)
        return cache

    def generation_cache(self, rows: list[list[int]]):
        """The cache a generation batch starts from: packed prefill, or where the model's cache
        cannot be packed, the prefix's alone (None without a shared prefix)."""
        cache = self.prefill(rows)
        if cache is None and self.length:
            cache = self.batch_cache(len(rows))
        return cache

    def forward(self, rows: list[list[int]], **kwargs):
        """The model's output for whole prompts (each starting with the prefix), run on their own
        tokens only, left-padded, from a copy of the prefix's cache."""
        ids, mask = self.batch(rows)
        if self.length:
            with_cache(self.loaded.model, kwargs, self.batch_cache(len(rows)))
            kwargs["position_ids"] = positions(mask)[:, self.length :]
            ids = ids[:, self.length :]
        return self.loaded.model(input_ids=ids, attention_mask=mask, **kwargs)

    @torch.no_grad()
    def prefill(self, rows: list[list[int]], chunk_rows: int = PREFILL_ROWS):
        """The KV cache of a generation batch's prompts up to (not including) each one's last token,
        laid out like `batch(rows)`, so `generate` only has to run the last column.

        A left-padded batch computes every padding position too: on the subject's StrongREJECT
        prompts 6,368 positions for 3,660 real ones, half of a trial's generation time on CPU.
        Here each row's own tokens run in length-sorted chunks of `chunk_rows` from the prefix's
        cache, and their keys and values are copied into place (keys carry their rotary position
        already, and positions do not depend on the padding). Returns None where the model's cache
        is not a plain per-layer key/value cache (sliding-window, linear-attention layers):
        `generate` then prefills the padded batch itself from the prefix's cache.

        Rows in `prefilled` (the first look ran them under the same edit) are copied, not run."""
        if not self.packable:
            return None
        n, length = len(rows), self.length
        own = [len(r) - 1 - length for r in rows]  # tokens of its own before its last one
        width = max(own)
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []

        def place(i: int, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
            """Row i's own keys and values (the last own[i] positions of `layers`) into the batch."""
            if not keys:  # allocate, and put the prefix (the same for every row) in place once
                for (key, value), prefix in zip(layers, self._prefix_layers(len(layers)), strict=True):
                    for store, states, head in ((keys, key, prefix[0]), (values, value, prefix[1])):
                        store.append(states.new_zeros((n, states.shape[-3], length + width, states.shape[-1])))
                        if length:
                            store[-1][:, :, :length] = head[0]
            for (key, value), k, v in zip(layers, keys, values, strict=True):
                k[i, :, length + width - own[i] :] = key[..., -own[i] :, :]
                v[i, :, length + width - own[i] :] = value[..., -own[i] :, :]

        known = {i for i in range(n) if own[i] and tuple(rows[i]) in self.prefilled}
        for i in sorted(known):
            place(i, self.prefilled[tuple(rows[i])])
        order = sorted((i for i in range(n) if own[i] and i not in known), key=lambda i: own[i])
        for start in range(0, len(order), chunk_rows):
            index = order[start : start + chunk_rows]
            cache = output_cache(self.forward([rows[i][:-1] for i in index], use_cache=True, logits_to_keep=1))
            if not _plain_layers(cache):
                self.packable = False
                return None
            for j, i in enumerate(index):
                place(i, [(layer.keys[j], layer.values[j]) for layer in cache.layers])
        if not keys:  # no row has tokens of its own before its last one
            return self.batch_cache(n) if length else None
        return DynamicCache(ddp_cache_data=list(zip(keys, values, strict=True)))

    def _prefix_layers(self, count: int) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Per layer, the prefix's (1, heads, length, head_dim) keys and values (None without one)."""
        if not self.length:
            return [(None, None)] * count
        return [(layer.keys, layer.values) for layer in self.cache.layers]

    def batch(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of whole prompts, the prefix first and then each row's own
        tokens left-padded: what `generate` needs beside `batch_cache`."""
        device = self.loaded.device
        ids, mask = left_padded([r[self.length :] for r in rows], self.loaded.tokenizer.pad_token_id, device)
        if not self.length:
            return ids, mask
        head = torch.tensor([self.ids], dtype=torch.long, device=device).expand(len(rows), -1)
        return torch.cat([head, ids], dim=1), torch.cat([torch.ones_like(head), mask], dim=1)


@torch.inference_mode()
def first_token_look(loaded: LoadedModel, texts: list[str], batch_size: int, layer: int | None = None,
                     keep: range | None = None) -> tuple[torch.Tensor, torch.Tensor | None, Prefilled]:  # fmt: skip
    """(n, vocab) fp32 log-probabilities of the first response token; with `layer` the (n, d_model)
    residual that layer writes at the last prompt position (None without); and for the texts in
    `keep`, their KV caches (`Prefilled`), so generating from them under the same edit skips
    their prefill.

    The prefix all prompts share is run once and its KV cache reused for every batch; each
    batch then holds only the prompts' own tokens, in length-sorted chunks of at most
    PREFILL_ROWS rows, so next to no padding positions are computed.
    """
    rows = loaded.tokenizer(texts, add_special_tokens=False)["input_ids"]
    prefix = SharedPrefix(loaded, rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out, residuals, seen, prefilled = torch.empty(len(rows), 0), None, [], {}
    keep = keep if keep is not None and prefix.packable else range(0)
    handle = None
    if layer is not None:
        def hold(module, args, output):
            seen.append((output[0] if isinstance(output, tuple) else output)[:, -1, :].float().cpu())

        handle = loaded.model.get_submodule(loaded.layers_path)[layer].register_forward_hook(hold)
    chunk = max(1, min(batch_size, PREFILL_ROWS))
    try:
        for start in range(0, len(order), chunk):
            index = order[start : start + chunk]
            wanted = any(i in keep for i in index)
            output = prefix.forward([rows[i] for i in index], use_cache=bool(prefix.length) or wanted,
                                    logits_to_keep=1)  # fmt: skip
            logprobs = F.log_softmax(output.logits[:, -1, :].float(), dim=-1).cpu()
            if out.shape[1] == 0:
                out = torch.empty(len(rows), logprobs.shape[1])
            out[index] = logprobs
            if handle is not None:
                if residuals is None:
                    residuals = torch.empty(len(rows), seen[-1].shape[1])
                residuals[index] = seen.pop()
            cache = output_cache(output)
            if wanted and _plain_layers(cache):
                prefilled.update(_row_caches(cache, [rows[i] for i in index], prefix.length,
                                             [i in keep for i in index]))  # fmt: skip
    finally:
        if handle is not None:
            handle.remove()
    return out, residuals, prefilled


def _row_caches(cache, rows: list[list[int]], length: int, wanted: list[bool]) -> Prefilled:
    """Each wanted row's keys and values at every position but its last, out of a batch laid out
    as prefix | padding | own tokens (`SharedPrefix.forward`)."""
    width = cache.layers[0].keys.shape[2]
    caches: Prefilled = {}
    for j, row in enumerate(rows):
        if not wanted[j]:
            continue
        own = len(row) - length  # its own tokens, the last included
        caches[tuple(row)] = [
            tuple(torch.cat([states[j, :, :length], states[j, :, width - own : width - 1]], dim=1)
                  for states in (layer.keys, layer.values))
            for layer in cache.layers
        ]  # fmt: skip
    return caches


def first_token_logprobs(loaded: LoadedModel, texts: list[str], batch_size: int) -> torch.Tensor:
    """(n, vocab) fp32 log-probabilities of the first response token (`first_token_look`)."""
    return first_token_look(loaded, texts, batch_size)[0]


class StopAtMarker(StoppingCriteria):
    """Watches every row for a refusal marker while generating.

    With `stop_rows`, a row stops at its first marker: its verdict cannot change after that.
    With `budget`, the whole batch stops once that many of its rows have refused: the trial is
    then dominated, and the rest of its text would not change anything.
    """

    def __init__(self, tokenizer, prompt_length: int, detector: Callable[[str, str], bool], stop_rows: bool,
                 budget: int | None,
                 prompts: list[str] | None = None):  # fmt: skip
        self.tokenizer, self.prompt_length, self.detector = tokenizer, prompt_length, detector
        self.stop_rows, self.budget = stop_rows, budget
        self.prompts = prompts

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        prompts = self.prompts or [""] * len(texts)
        refused = torch.tensor([self.detector(t, p) for t, p in zip(texts, prompts, strict=True)],
                               device=input_ids.device)  # fmt: skip
        if self.budget is not None and int(refused.sum()) >= self.budget:
            return torch.ones_like(refused)
        return refused if self.stop_rows else torch.zeros_like(refused)


@torch.inference_mode()
def batch_sizes(n: int, batch_size: int, first_batch: int | None = None) -> list[int]:
    """Sizes of the batches `n` texts are generated in: `first_batch` rows first (when given and
    smaller than `batch_size`), then `batch_size` at a time."""
    first = min(first_batch, batch_size) if first_batch else batch_size
    sizes = [min(first, n)] if n else []
    while sum(sizes) < n:
        sizes.append(min(batch_size, n - sum(sizes)))
    return sizes


def leading_rows(cap: int | None, batch_size: int) -> int | None:
    """The first batch of a trial that may turn out dominated: twice the refusals it would take to
    reach its cap, at least 8 (None without a cap: one size for all batches).

    The prompts are scored hardest first, so a dominated trial meets the refusals that stop it in
    this small batch and stops there, having paid for a few rows' prefill and decode steps instead
    of a full batch's; a trial that is not dominated pays one extra batch's per-step overhead."""
    if cap is None or cap <= 0:
        return None
    return min(batch_size, max(8, 2 * cap))


def generate_batches(
    loaded: LoadedModel, texts: list[str], max_new_tokens: int, batch_size: int, desc: str | None = None,
    detector=None, stop_rows: bool = False, budget: Callable[[], int | None] | None = None,
    prompts: list[str] | None = None, prefilled: Prefilled | None = None, first_batch: int | None = None,
) -> Iterator[tuple[list[str], int]]:  # fmt: skip
    """Greedy responses (special tokens stripped) and the number of tokens generated, one batch at
    a time so callers can stop early. With a streaming `detector` (markers), rows may stop at their
    first marker (`stop_rows`) and a batch stops once `budget()` of its rows have refused; `prompts`
    (the plain requests behind `texts`) let it ignore markers echoed from the request;
    `prefilled`: KV caches the first look computed under the current edit (`first_token_look`);
    `first_batch`: the first batch's size, when it differs from the others (`leading_rows`).

    The prompts' shared prefix is computed once per call (`SharedPrefix`), not once per batch."""
    tokenizer = loaded.tokenizer
    rows = tokenizer(texts, add_special_tokens=False)["input_ids"]
    prefix = SharedPrefix(loaded, rows, prefilled)
    sizes = batch_sizes(len(texts), batch_size, first_batch)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    for start, size in tqdm(zip(starts, sizes, strict=True), total=len(sizes), desc=desc, unit="batch",
                            leave=False, disable=desc is None):  # fmt: skip
        chunk = rows[start : start + size]
        ids, mask = prefix.batch(chunk)
        batch = {"input_ids": ids, "attention_mask": mask}
        cache = prefix.generation_cache(chunk)
        if cache is not None:
            with_cache(loaded.model, batch, cache)
        prompt_length = ids.shape[1]
        limit = budget() if budget else None
        watch = detector is not None and getattr(detector, "streaming", False) and (stop_rows or limit is not None)
        stopping = StoppingCriteriaList(
            [StopAtMarker(tokenizer, prompt_length, detector, stop_rows, limit,
                          prompts[start : start + size] if prompts else None)] if watch else []
        )
        output = loaded.model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
            top_k=None, pad_token_id=tokenizer.pad_token_id, stopping_criteria=stopping,
        )  # fmt: skip
        new_tokens = output[:, prompt_length:]
        yield (
            tokenizer.batch_decode(new_tokens, skip_special_tokens=True),
            int((new_tokens != tokenizer.pad_token_id).sum()),
        )


def generate(loaded: LoadedModel, texts: list[str], max_new_tokens: int, batch_size: int,
             desc: str | None = None) -> list[str]:  # fmt: skip
    """Greedy full-length responses for chat-formatted texts."""
    return [r for batch, _ in generate_batches(loaded, texts, max_new_tokens, batch_size, desc) for r in batch]
