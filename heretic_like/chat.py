"""Interactive chat with an edited model, streamed token by token, to judge a trial by hand.

    python -m heretic_like chat --study checkpoints/NAME.journal --trial 17
    python -m heretic_like chat --model exports/my-model

The trial's edit is applied to the study's model exactly as in the study (no export needed).
`/reset` starts a new conversation, `/original` and `/edited` switch between the unedited and
the edited model (same conversation), `/exit` (or end of input) leaves.
"""

from __future__ import annotations

import sys
from typing import TextIO

import torch
from transformers import TextStreamer

from .model import LoadedModel

HELP = "Commands: /reset (new conversation), /original, /edited (switch model), /exit"


class _Streamer(TextStreamer):
    """Prints generated text as it arrives to `out` (not only stdout)."""

    def __init__(self, tokenizer, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


@torch.inference_mode()
def reply(loaded: LoadedModel, messages: list[dict], max_new_tokens: int, out: TextIO) -> str:
    """Greedy answer to the conversation so far, streamed to `out`; returns the text."""
    tokenizer = loaded.tokenizer
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = tokenizer([text], return_tensors="pt", add_special_tokens=False).to(loaded.device)
    output = loaded.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                   top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id,
                                   streamer=_Streamer(tokenizer, out))  # fmt: skip
    return tokenizer.decode(output[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def chat(loaded: LoadedModel, system_prompt: str | None, max_new_tokens: int = 512, switch=None,
         stdin: TextIO | None = None, out: TextIO | None = None) -> int:  # fmt: skip
    """The loop; returns the number of messages exchanged. `switch(edited: bool)` turns the edit
    on or off (None: no switching)."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    interactive = stdin.isatty()
    start = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages = list(start)
    out.write(f"{HELP}\n")
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return len(messages) - len(start)
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            messages = list(start)
            out.write("(new conversation)\n")
            continue
        if line in ("/original", "/edited"):
            if switch is None:
                out.write("(this model has no edit to switch)\n")
            else:
                switch(line == "/edited")
                out.write(f"({line[1:]} model)\n")
            continue
        messages.append({"role": "user", "content": line})
        out.write("model> ")
        messages.append({"role": "assistant", "content": reply(loaded, messages, max_new_tokens, out)})
