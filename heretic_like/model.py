"""Loading the model and tokenizer, finding the modules we edit, and turning prompts into inputs.

GGUF files are dequantised by transformers (slow: ~40 s for 0.5B on 2 cores), so the first load
writes a plain safetensors copy into `cache_dir` and later loads read that (~0.1 s).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import COMPONENTS, Settings
from .errors import HereticError
from .files import fill_directory_once

SUPPORTED = "llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3, phi3, olmo2, granite, mixtral, qwen2_moe, qwen3_moe"
CONVERSION_VERSION = 2  # 2: lm_head re-tied to the embeddings when identical
MLP_NAMES = ("mlp", "block_sparse_moe", "feed_forward")  # where a layer keeps its MLP or MoE block
DOWN_NAMES = ("down_proj", "w2")  # an MLP's (or expert's) write into the residual stream
SHARED_NAMES = ("shared_expert", "shared_experts")


@dataclass(frozen=True)
class Target:
    """One weight that an edit of `component` at `layer` changes: a Linear's (out, in) weight, or
    an MoE experts module's fused 3-D weight `param`, (experts, out, in), or (experts, in, out)
    when `transposed` (used as x @ W[e])."""

    component: str
    layer: int
    name: str  # dotted path of the module
    module: nn.Module
    param: str | None = None
    transposed: bool = False

    @property
    def fused(self) -> bool:
        return self.param is not None

    @property
    def weight(self) -> torch.Tensor:
        if self.param is not None:
            return getattr(self.module, self.param)
        return getattr(self.module, "base_layer", self.module).weight  # under a peft LoRA: the base

    @property
    def count(self) -> int:
        """Weight matrices edited: one, or one per expert."""
        return self.weight.shape[0] if self.fused else 1


def _is_linear(module: nn.Module | None) -> bool:
    return isinstance(module, nn.Linear) or isinstance(getattr(module, "base_layer", None), nn.Linear)


def _child(module: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return name, child
    return None


def _mlp_targets(layer: nn.Module, index: int, prefix: str, hidden: int | None,
                 warnings: list[str] | None = None) -> list[Target]:  # fmt: skip
    """Every weight through which a layer's MLP writes into the residual stream: a dense down
    projection; each expert's (a ModuleList of experts, or one fused 3-D tensor); shared experts.
    Experts whose storage is not recognised are reported in `warnings`, never skipped silently."""
    found = _child(layer, MLP_NAMES)
    if found is None:
        return []
    mlp_name, mlp = found
    base = f"{prefix}.{mlp_name}"
    targets = []
    down = _child(mlp, DOWN_NAMES)
    if down is not None and _is_linear(down[1]):
        targets.append(Target("mlp.down_proj", index, f"{base}.{down[0]}", down[1]))
    experts = getattr(mlp, "experts", None)
    if isinstance(experts, nn.ModuleList):
        for j, expert in enumerate(experts):
            down = _child(expert, DOWN_NAMES)
            if down is not None and _is_linear(down[1]):
                targets.append(Target("mlp.down_proj", index, f"{base}.experts.{j}.{down[0]}", down[1]))
    elif isinstance(experts, nn.Module):
        for name in DOWN_NAMES:
            weight = getattr(experts, name, None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 3:
                transposed = hidden is not None and weight.shape[2] == hidden and weight.shape[1] != hidden
                targets.append(Target("mlp.down_proj", index, f"{base}.experts", experts, name, transposed))
                break
    if isinstance(experts, nn.Module) and not any(".experts" in t.name for t in targets) and warnings is not None:
        warnings.append(f"layer {index}: experts {type(experts).__name__} at {base}.experts store no down_proj/w2 "
                        "we recognise: NOT edited")  # fmt: skip
    shared = _child(mlp, SHARED_NAMES)
    if shared is not None:
        down = _child(shared[1], DOWN_NAMES)
        if down is not None and _is_linear(down[1]):
            targets.append(Target("mlp.down_proj", index, f"{base}.{shared[0]}.{down[0]}", down[1]))
    return targets


def layer_targets(layer: nn.Module, index: int, prefix: str, hidden: int | None = None,
                  warnings: list[str] | None = None) -> list[Target]:  # fmt: skip
    targets = []
    attn = getattr(layer, "self_attn", None)
    if attn is not None and _is_linear(getattr(attn, "o_proj", None)):
        targets.append(Target("attn.o_proj", index, f"{prefix}.self_attn.o_proj", attn.o_proj))
    return targets + _mlp_targets(layer, index, prefix, hidden, warnings)


def find_targets(model: nn.Module, layers_path: str, components=COMPONENTS) -> tuple[list[Target], list[str]]:
    """(targets of the given components, warnings naming every layer where one has none)."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    targets, warnings = [], []
    for i, layer in enumerate(model.get_submodule(layers_path)):
        found = [t for t in layer_targets(layer, i, f"{layers_path}.{i}", hidden, warnings)
                 if t.component in components]  # fmt: skip
        for component in components:
            if not any(t.component == component for t in found):
                warnings.append(f"layer {i}: no {component} weight found in {type(layer).__name__}: NOT edited")
        targets += found
    return targets, warnings


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    layers_path: str  # dotted path of the decoder-layer ModuleList
    num_layers: int
    source: str  # what was actually loaded (a dir or hub id)

    def targets(self, components: list[str] | tuple[str, ...] = COMPONENTS) -> list[Target]:
        """Every weight the components' edits write, found afresh (so LoRA wrapping is seen)."""
        return find_targets(self.model, self.layers_path, tuple(components))[0]

    def target_warnings(self, components: list[str] | tuple[str, ...] = COMPONENTS) -> list[str]:
        return find_targets(self.model, self.layers_path, tuple(components))[1]

    def target_names(self, components: list[str] | tuple[str, ...] = COMPONENTS) -> list[str]:
        """Module names of the Linear targets (what a peft LoRA wraps; fused experts are not)."""
        return [t.name for t in self.targets(components) if not t.fused]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def find_decoder_layers(model: nn.Module) -> str:
    """Dotted path of the first ModuleList whose every element writes through o_proj and holds an
    MLP block (dense or mixture-of-experts; a layer whose MLP we cannot edit is warned about)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = [{t.component for t in layer_targets(m, 0, "")} for m in module]
            if all("attn.o_proj" in k and _child(m, MLP_NAMES) for k, m in zip(kinds, module, strict=True)) and any(
                    "mlp.down_proj" in k for k in kinds):  # fmt: skip
                return name
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise HereticError(
        f"model type '{model_type}' has no recognisable decoder layers (each needs self_attn.o_proj and "
        f"an MLP down projection, dense or per expert); supported families: {SUPPORTED}"
    )


def _gguf_cache_dir(settings: Settings, gguf: Path) -> Path:
    stat = gguf.stat()
    # CONVERSION_VERSION: bump when the conversion changes, so stale copies are not reused.
    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{CONVERSION_VERSION}"
    key = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(settings.cache_dir).expanduser() / "converted" / f"{gguf.stem}-{key}"


def _gguf_location(settings: Settings) -> tuple[Path, str] | None:
    """(directory, file name) when the config points at a GGUF file, else None."""
    if settings.gguf_file:
        return Path(settings.model).expanduser(), settings.gguf_file
    if settings.model.lower().endswith(".gguf"):
        path = Path(settings.model).expanduser()
        return path.parent, path.name
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _resolve_dtype(name: str) -> torch.dtype | str:
    return "auto" if name == "auto" else getattr(torch, name)


def _load_with_dtypes(settings: Settings, source: str, **kwargs) -> nn.Module:
    from transformers import AutoModelForCausalLM

    extra: dict = {}
    if settings.quantization == "bnb_4bit":
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise HereticError("quantization = 'bnb_4bit' needs the bitsandbytes package") from None
        extra["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True)
    if settings.device_map != "cpu" and torch.cuda.is_available():
        extra["device_map"] = settings.device_map
        if settings.max_memory:
            extra["max_memory"] = settings.max_memory
    last_error: BaseException | None = None
    for dtype in settings.dtypes:
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=_resolve_dtype(dtype), **kwargs, **extra)
            model.eval()
            return model
        except (OSError, ValueError) as exc:  # missing files, unknown architecture: no dtype will help
            raise HereticError(f"cannot load model '{settings.model}': {_first_line(exc)}") from None
        except Exception as exc:  # dtype-specific failures (unsupported on device, OOM): try the next
            last_error = exc
    raise HereticError(f"cannot load model '{settings.model}' with any of dtypes {settings.dtypes}: "
                       f"{_first_line(last_error)}")  # fmt: skip


def retie_embeddings(model: nn.Module) -> bool:
    """Tie lm_head back to the input embeddings when they hold identical values.

    GGUF loading unties them, so a model whose file stores one matrix would keep two copies
    (545 MB in fp32 for Qwen2.5-0.5B). Neither is edited by abliteration, so tying is exact.
    """
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed is None or head is None or embed.weight is head.weight:
        return False
    if embed.weight.shape != head.weight.shape or not torch.equal(embed.weight, head.weight):
        return False
    model.config.tie_word_embeddings = True
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = True
    model.tie_weights()
    return head.weight is embed.weight


def _convert_gguf(settings: Settings, directory: Path, name: str, cache: Path) -> None:
    """Dequantise a GGUF once and keep a safetensors copy (plus tokenizer) in `cache`."""
    from transformers import AutoTokenizer

    if not (directory / name).is_file():
        raise HereticError(f"GGUF file not found: {directory / name}")
    print(f"Converting {directory / name} to safetensors (once; cached in {cache}) ...", flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=name)
    except Exception as exc:
        raise HereticError(f"cannot read tokenizer from GGUF {directory / name}: {_first_line(exc)}") from None
    fp32 = settings.model_copy(update={"dtypes": ["float32"], "quantization": "none", "device_map": "cpu"})
    model = _load_with_dtypes(fp32, str(directory), gguf_file=name)
    # A GGUF-loaded model refuses save_pretrained unless the quantizer is detached first.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    retie_embeddings(model)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "heretic_like_source.json").write_text(json.dumps({"gguf": str((directory / name).resolve())}))

    fill_directory_once(cache, fill)


def load_model(settings: Settings) -> LoadedModel:
    from transformers import AutoTokenizer

    source = settings.model
    gguf = _gguf_location(settings)
    if gguf is not None:
        cache = _gguf_cache_dir(settings, gguf[0] / gguf[1]) if (gguf[0] / gguf[1]).is_file() else None
        if cache is None:
            raise HereticError(f"GGUF file not found: {gguf[0] / gguf[1]}")
        if not (cache / "config.json").is_file():
            _convert_gguf(settings, gguf[0], gguf[1], cache)
        source = str(cache)
    elif Path(source).expanduser().exists():
        source = str(Path(source).expanduser())
        if not (Path(source) / "config.json").is_file():
            raise HereticError(f"model directory '{settings.model}' has no config.json")
    # a hub id is read at `model_commit` when given (Heretic's key); local files have no revisions
    hub = {"revision": settings.model_commit} if settings.model_commit and source == settings.model else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **hub)
    except Exception as exc:
        raise HereticError(f"cannot load tokenizer for '{settings.model}': {_first_line(exc)}") from None
    if settings.chat_template:
        tokenizer.chat_template = settings.chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise HereticError(
            f"tokenizer of '{settings.model}' has no chat template: set `chat_template` in the config "
            "to a Jinja template (instruction-tuned models ship one; base models are not refusal subjects)"
        )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = _load_with_dtypes(settings, source, **hub)
    layers_path = find_decoder_layers(model)
    num_layers = len(model.get_submodule(layers_path))
    return LoadedModel(model, tokenizer, layers_path, num_layers, source)


@contextlib.contextmanager
def peft_quietly() -> Iterator[None]:
    """Wrapping a model with peft asks transformers for `is_gradient_checkpointing`, which
    transformers 5 deprecates with a FutureWarning on every run. The call is peft's, not ours:
    silence exactly that warning, only around peft's wrapping."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def chat_texts(tokenizer, prompts: list[str], system_prompt: str | None, response_prefix: str = "") -> list[str]:
    """Render prompts with the chat template, ready for the assistant's first token (after
    `response_prefix`, e.g. an empty thinking block, when the model opens every answer with it).

    Templates that reject a system role (e.g. Gemma 2) get the system prompt prepended to the
    user message instead.
    """
    out = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:
            if not system_prompt:
                raise
            merged = [{"role": "user", "content": f"{system_prompt}\n\n{prompt}"}]
            text = tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
        out.append(text + response_prefix)
    return out


def encode(tokenizer, texts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Left-padded batch: the last position of every row is its last prompt token."""
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}


# Kinds of fingerprint, by prefix. "" (the first): summed the first parameter (the embedding) and
# the last; "w2-": the first parameter outside an input embedding and the last; "w3-": every
# parameter outside an input embedding, sampled. Stored fingerprints of every kind still match.
FINGERPRINT_VERSION = "w3-"
FINGERPRINT_SAMPLE = 1 << 16  # elements summed per parameter (evenly strided)


def _checksums(param: torch.Tensor, sample: bool) -> list[float]:
    """float64 sum (and, sampled, the sum of squares) of a parameter, a slice at a time: no
    float64 copy of a whole matrix."""
    flat = param.detach().reshape(-1)
    if not sample:
        return [sum(float(part.double().sum()) for part in flat.split(1 << 22))]
    picked = flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLE)].double()
    return [float(picked.sum()), float((picked * picked).sum())]


def model_fingerprint(model: nn.Module, kind: str = FINGERPRINT_VERSION) -> str:
    """Cheap identity of the weights: config, parameter count and float64 checksums.

    Every parameter an edit can touch is checksummed (a strided sample of each, sum and sum of
    squares), so an abliterated copy put where the original was is not taken for it: the
    earlier kinds summed only two parameters, which a rank-1 edit of a middle layer leaves as
    they were. Input embeddings are skipped: reading all of one pages it in from the mapped
    weights file, while a run only touches the rows of the tokens it sees (0.5 GiB of resident
    memory on the 0.5B subject); no edit touches them. `kind` "" or "w2-" gives an older kind,
    to check studies that stored one."""
    params = list(model.parameters())
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    if kind == FINGERPRINT_VERSION:
        sums = [s for p in params if id(p) not in embeddings for s in _checksums(p, sample=True)]
    else:
        first = params[0] if kind == "" else next((p for p in params if id(p) not in embeddings), params[0])
        sums = [s for p in (first, params[-1]) for s in _checksums(p, sample=False)]
    config = model.config.to_dict() if hasattr(model, "config") else {}
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "quantization_config"):
        config.pop(key, None)
    blob = json.dumps({"config": config, "sums": [f"{s:.6e}" for s in sums],
                       "n": sum(p.numel() for p in params)}, sort_keys=True, default=str)  # fmt: skip
    return kind + hashlib.sha256(blob.encode()).hexdigest()[:16]


def matches_fingerprint(model: nn.Module, stored: str) -> bool:
    """Is `model` the one a stored fingerprint (of any kind) was taken of?"""
    kind = next((k for k in (FINGERPRINT_VERSION, "w2-") if stored.startswith(k)), "")
    return model_fingerprint(model, kind) == stored
