"""Text in and out: the checkpoint's ``tokenizer.json`` (Hugging Face ``tokenizers``), the Qwen ChatML chat
template, and incremental detokenisation for streaming."""

from __future__ import annotations

import os
from typing import Iterable

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from spb2_jax.config import SpB2Config

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def load_tokenizer(checkpoint_dir: str | os.PathLike) -> Tokenizer:
    """The ``tokenizer.json`` of an HF checkpoint directory (or the path of the file itself)."""
    path = os.fspath(checkpoint_dir)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer.json at {path}: the checkpoint directory needs the Hugging Face "
                                "tokenizer file (the official checkpoints ship it)")
    return Tokenizer.from_file(path)


def chat_prompt(user: str, system: str | None = None) -> str:
    """Qwen ChatML for one user turn, ending where the assistant's answer starts::

        <|im_start|>system\\n{system}<|im_end|>\\n      (only when ``system`` is given)
        <|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n
    """
    turns = [] if system is None else [f"{IM_START}system\n{system}{IM_END}\n"]
    turns.append(f"{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n")
    return "".join(turns)


def encode_prompt(tokenizer: Tokenizer, text: str, *, chat: bool = False, system: str | None = None) -> list[int]:
    """Token ids of ``text`` (wrapped in the chat template when ``chat``); special tokens in the text are parsed."""
    if chat:
        text = chat_prompt(text, system)
    elif system is not None:
        raise ValueError("system is only used with chat=True")
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    return ids


def stop_token_ids(tokenizer: Tokenizer, config: SpB2Config, *, chat: bool = False) -> tuple[int, ...]:
    """Generation stops at the config's ``eos_token_id`` and, in chat mode, at ``<|im_end|>`` (the end of the
    assistant's turn)."""
    stops = [] if config.eos_token_id is None else [int(config.eos_token_id)]
    if chat:
        im_end = tokenizer.token_to_id(IM_END)
        if im_end is None:
            raise ValueError(f"chat=True but the tokenizer has no {IM_END} token")
        stops.append(im_end)
    return tuple(dict.fromkeys(stops))


class TextStream:
    """Turns generated ids into text pieces as they arrive; multi-byte characters split over several byte-level
    tokens come out once complete. Special tokens are skipped unless ``skip_special_tokens=False``."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        """The new text that ``token_id`` completes ("" while a character is incomplete)."""
        return self._stream.step(self._tokenizer, int(token_id)) or ""

    def feed(self, token_ids: Iterable[int]) -> str:
        return "".join(self.step(t) for t in token_ids)
