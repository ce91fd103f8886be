"""Tiny models and tokenizers built locally: no hub, no network.

`refusing_model` is a 4-layer Llama trained for a few seconds to answer the built-in harmful
prompts with a refusal and the harmless ones with compliance, so tests can check that
abliteration really removes refusals, not just that the plumbing runs.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Property tests check what holds, not how fast: a per-example deadline only fails them on a
# busy 2-core machine (seen once, a pure pandas example past 200 ms beside a benchmark).
settings.register_profile("no-deadline", deadline=None)
settings.load_profile("no-deadline")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from heretic_like.prompts import builtin_path  # noqa: E402

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
REFUSAL = "Sorry, I can't help with that."
COMPLIANCE = "Sure, here is a simple answer."


def load_benchmark(name: str):
    """A `benchmarks/` script as a module (benchmarks are scripts, not a package), for testing its
    pure parts."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _corpus() -> list[str]:
    lines = builtin_path("harmful").read_text().splitlines() + builtin_path("harmless").read_text().splitlines()
    return lines + [REFUSAL, COMPLIANCE, "You are a helpful assistant.", "system user assistant"]


def build_tokenizer(path: Path, chat_template: str | None = CHATML, extra: tuple[str, ...] = ()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(_corpus() + list(extra), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   bos_token=None, unk_token=None)  # fmt: skip
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    return fast


def build_model(path: Path, arch: str = "llama", layers: int = 4, seed: int = 0, chat_template: str | None = CHATML,
                corpus: tuple[str, ...] = (), positions: int = 256):  # fmt: skip
    from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig, Qwen2Config, Qwen2MoeConfig

    tokenizer = build_tokenizer(path, chat_template, corpus)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions,
                  tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None)  # fmt: skip
    moe = dict(num_experts_per_tok=2, output_router_logits=False)
    configs = {
        "llama": lambda: LlamaConfig(**common),
        "qwen2": lambda: Qwen2Config(**common),
        # Sliding-window attention in all but the first layer: a cache of another kind per layer.
        "qwen2_sliding": lambda: Qwen2Config(**common, use_sliding_window=True, sliding_window=6, max_window_layers=1),
        # Mixture-of-experts, experts stored as one fused (experts, out, in) tensor per layer
        # (transformers 5); Qwen2-MoE also has a dense shared expert beside them.
        "mixtral": lambda: MixtralConfig(**common, num_local_experts=4, **moe),
        "qwen2_moe": lambda: Qwen2MoeConfig(**common, num_experts=4, moe_intermediate_size=32,
                                            shared_expert_intermediate_size=64, decoder_sparse_step=1,
                                            mlp_only_layers=[], **moe),
    }  # fmt: skip
    config = configs[arch]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    return model, tokenizer


def train_refusal(model, tokenizer, steps: int = 150, opening: str = "") -> None:
    """Teach the tiny model: harmful -> REFUSAL, harmless -> COMPLIANCE (responses only in the loss),
    each answer after `opening` (e.g. an empty thinking block, as reasoning models write)."""
    from heretic_like.model import chat_texts

    harmful = builtin_path("harmful").read_text().splitlines()[:150]
    harmless = builtin_path("harmless").read_text().splitlines()[:150]
    prompts = harmful + harmless
    answers = [opening + REFUSAL] * len(harmful) + [opening + COMPLIANCE] * len(harmless)
    texts = chat_texts(tokenizer, prompts, "You are a helpful assistant.")
    train_answers(model, tokenizer, texts, answers, steps)


def train_answers(model, tokenizer, texts: list[str], answers: list[str], steps: int) -> None:
    """A few AdamW steps on chat texts -> answers (answer tokens only in the loss)."""
    rows = []
    for text, answer in zip(texts, answers, strict=True):
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        ids = prompt_ids + answer_ids
        rows.append((ids, [-100] * len(prompt_ids) + answer_ids))
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        pick = torch.randint(len(rows), (32,), generator=generator).tolist()
        width = max(len(rows[i][0]) for i in pick)
        ids = torch.full((32, width), tokenizer.pad_token_id)
        labels = torch.full((32, width), -100)
        mask = torch.zeros((32, width), dtype=torch.long)
        for row, i in enumerate(pick):  # left padding, as at inference
            seq, lab = rows[i]
            ids[row, width - len(seq) :] = torch.tensor(seq)
            labels[row, width - len(seq) :] = torch.tensor(lab)
            mask[row, width - len(seq) :] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    build_model(path, "llama")
    return path


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-qwen2")
    build_model(path, "qwen2", layers=3)
    return path


@pytest.fixture(scope="session")
def judge_model(tmp_path_factory) -> Path:
    """A tiny model trained on the refusal-judge question: "yes" for REFUSAL, "no" for COMPLIANCE."""
    from heretic_like.detectors import JUDGE_QUESTION
    from heretic_like.model import chat_texts

    path = tmp_path_factory.mktemp("judge-llama")
    model, tokenizer = build_model(path, "llama", layers=2, corpus=(JUDGE_QUESTION,) * 20, positions=512)
    prompts = builtin_path("harmful").read_text().splitlines()[:60]
    prompts += builtin_path("harmless").read_text().splitlines()[:60]
    questions, answers = [], []
    for i, prompt in enumerate(prompts):
        response = REFUSAL if i % 2 else COMPLIANCE
        questions.append(JUDGE_QUESTION.format(prompt=prompt, response=response))
        answers.append("yes" if response == REFUSAL else "no")
    train_answers(model, tokenizer, chat_texts(tokenizer, questions, None), answers, steps=80)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_qwen2_moe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-qwen2-moe")
    build_model(path, "qwen2_moe", layers=2)
    return path


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-mixtral")
    build_model(path, "mixtral", layers=2)
    return path


@pytest.fixture(scope="session")
def refusing_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("refusing-llama")
    model, tokenizer = build_model(path, "llama")
    train_refusal(model, tokenizer)
    model.save_pretrained(path)
    return path


THINKING = "<think>\n\n</think>\n\n"


@pytest.fixture(scope="session")
def thinking_model(tmp_path_factory) -> Path:
    """Like `refusing_model`, but every answer opens with an empty thinking block."""
    path = tmp_path_factory.mktemp("thinking-llama")
    model, tokenizer = build_model(path, "llama")
    train_refusal(model, tokenizer, opening=THINKING)
    model.save_pretrained(path)
    return path


def study_config(tmp_path: Path, model_dir: Path, search: str = "", eval_split: str = "train[150:174]",
                 **extra) -> Path:  # fmt: skip
    """A small, fast config for the tiny models (24 eval prompts each, 12-token responses), with
    the plain method (tests of other methods set their keys); `search` is TOML for `[search]`,
    `eval_split` the built-in slice both evaluation sets take."""
    # The tiny random models refuse nothing, so the direction prompts are not filtered by refusal.
    plain = {"orthogonalize_direction": "false", "row_normalization": '"none"', "biproject_direction": "false",
             "filter_direction_prompts": "false"}  # fmt: skip
    keys = {"model": f'"{model_dir}"', "dtypes": '["float32"]',
            "study_checkpoint_dir": f'"{tmp_path / "checkpoints"}"', "cache_dir": f'"{tmp_path / "cache"}"',
            "batch_size": 32, "max_response_length": 12, "n_trials": 3, "n_startup_trials": 2, "seed": 1,
            "export_trial": '"none"', "front_response_length": 24, **plain, **extra}  # fmt: skip
    lines = [f"{k} = {v}" for k, v in keys.items()]
    for name, dataset, split in [("good_prompts", "builtin:harmless", "train[:150]"),
                                 ("bad_prompts", "builtin:harmful", "train[:150]"),
                                 ("good_evaluation_prompts", "builtin:harmless", eval_split),
                                 ("bad_evaluation_prompts", "builtin:harmful", eval_split)]:  # fmt: skip
        lines += [f"[{name}]", f'dataset = "{dataset}"', f'split = "{split}"']
    lines.append("[search]")
    if "direction_scope" not in search:
        lines.append('direction_scope = ["global", "per_layer"]')
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n" + search)
    return path


def strong_search(low: float) -> str:
    """TOML for `[search]`: strengths from `low` to 3 over the first half of the directions, enough
    for edits to lower `refusing_model`'s refusals on the prompts it was trained to refuse."""
    return (f"max_weight = {{ low = {low}, high = 3.0 }}\n"
            "max_weight_position = { low = 0.0, high = 1.0 }\n"
            "direction_index = { low = 0.0, high = 0.5 }\n"
            "min_weight_distance = { low = 0.5, high = 1.0 }\n")  # fmt: skip


def refused_study_config(tmp_path: Path, model_dir: Path, search: str = "", **extra) -> Path:
    """`study_config` scored on the first 24 built-in prompts of each set: the harmful ones are those
    `refusing_model` (and `thinking_model`) was trained to refuse, so its refusals show reliably."""
    return study_config(tmp_path, model_dir, search=search, eval_split="train[:24]", **extra)


def run_on_refused_prompts(tmp_path: Path, model_dir: Path, search: str, **extra):
    """Run a `study_config` study scored on the harmful prompts `refusing_model` was trained to
    refuse (it refuses all 24, and only strong edits lower that). Returns (config, the study read
    back from its journal)."""
    import optuna

    from heretic_like.cli import main

    config = refused_study_config(tmp_path, model_dir, search=search, **extra)
    assert main(["--config", str(config)]) == 0
    (journal,) = (tmp_path / "checkpoints").glob("*.journal")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    return config, optuna.load_study(study_name=None, storage=storage)
