"""Loading the model and tokenizer, finding the modules we edit, and turning prompts into inputs.

GGUF files are dequantised by transformers (slow: ~40 s for 0.5B on 2 cores), so the first load
writes a plain safetensors copy into `cache_dir` and later loads read that (~0.1 s).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import COMPONENTS, Settings
from .errors import HereticError

# Where each component lives inside one decoder layer, per architecture family.
COMPONENT_PATHS = {"attn.o_proj": "self_attn.o_proj", "mlp.down_proj": "mlp.down_proj"}
CONVERSION_VERSION = 2  # 2: lm_head re-tied to the embeddings when identical
SUPPORTED = "llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3, phi3, olmo2, granite"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    layers_path: str  # dotted path of the decoder-layer ModuleList
    num_layers: int
    source: str  # what was actually loaded (a dir or hub id)

    def target_modules(self, components: list[str] | tuple[str, ...] = COMPONENTS) -> dict[str, list[nn.Linear]]:
        """component -> one Linear per layer."""
        layers = self.model.get_submodule(self.layers_path)
        return {c: [layer.get_submodule(COMPONENT_PATHS[c]) for layer in layers] for c in components}

    def target_names(self, components: list[str] | tuple[str, ...] = COMPONENTS) -> list[str]:
        return [f"{self.layers_path}.{i}.{COMPONENT_PATHS[c]}" for c in components for i in range(self.num_layers)]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _has_components(layer: nn.Module) -> bool:
    for path in COMPONENT_PATHS.values():
        try:
            if not isinstance(layer.get_submodule(path), nn.Linear):
                return False
        except AttributeError:
            return False
    return True


def find_decoder_layers(model: nn.Module) -> str:
    """Dotted path of the first ModuleList whose every element has o_proj and down_proj."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(_has_components(m) for m in module):
            return name
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise HereticError(
        f"model type '{model_type}' has no recognisable decoder layers (each needs self_attn.o_proj and "
        f"mlp.down_proj Linear modules); supported families: {SUPPORTED}"
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
    tmp = cache.with_name(cache.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "heretic_like_source.json").write_text(json.dumps({"gguf": str((directory / name).resolve())}))
    tmp.rename(cache)


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
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
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
    model = _load_with_dtypes(settings, source)
    layers_path = find_decoder_layers(model)
    num_layers = len(model.get_submodule(layers_path))
    return LoadedModel(model, tokenizer, layers_path, num_layers, source)


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


def model_fingerprint(model: nn.Module) -> str:
    """Cheap identity of the weights: config plus checksums of the first and last parameters."""
    params = list(model.parameters())
    sums = [float(p.detach().double().sum()) for p in (params[0], params[-1])]
    config = model.config.to_dict() if hasattr(model, "config") else {}
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "quantization_config"):
        config.pop(key, None)
    blob = json.dumps({"config": config, "sums": [f"{s:.6e}" for s in sums],
                       "n": sum(p.numel() for p in params)}, sort_keys=True, default=str)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
