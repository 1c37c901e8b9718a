"""Tokenizer (tokenizer.json, ChatML, streaming detokenisation) and the ``python -m spb2_jax.generate`` CLI."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

from spb2_jax.checkpoint import load_hf
from spb2_jax.generate import generate
from spb2_jax.generate.__main__ import DEFAULT_CHECKPOINT, main
from spb2_jax.generate.tokenizer import (TextStream, chat_prompt, encode_prompt, load_tokenizer, stop_token_ids)
from tools import make_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEFAULT_CHECKPOINT)


def test_tiny_tokenizer_is_reproducible_and_fits_the_model(tokenizer):
    with open(os.path.join(DEFAULT_CHECKPOINT, "tokenizer.json")) as f:
        assert make_tiny_tokenizer.build().to_str(pretty=True) == f.read()
    config, _ = load_hf(DEFAULT_CHECKPOINT, progress=False)
    assert tokenizer.get_vocab_size() == config.vocab_size
    assert tokenizer.token_to_id("<|im_end|>") == config.eos_token_id


def test_chat_template_and_stop_tokens(tokenizer):
    assert chat_prompt("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert chat_prompt("hi", "be brief") == ("<|im_start|>system\nbe brief<|im_end|>\n"
                                             "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    ids = encode_prompt(tokenizer, "hi", chat=True)
    assert ids[0] == tokenizer.token_to_id("<|im_start|>") and ids.count(tokenizer.token_to_id("<|im_end|>")) == 1
    assert tokenizer.decode(ids, skip_special_tokens=False) == chat_prompt("hi")
    config, _ = load_hf(DEFAULT_CHECKPOINT, progress=False)
    assert stop_token_ids(tokenizer, config, chat=True) == (2,)  # eos == <|im_end|> in the tiny vocabulary
    with pytest.raises(ValueError, match="system is only used with chat"):
        encode_prompt(tokenizer, "hi", system="x")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(os.path.dirname(DEFAULT_CHECKPOINT))


def test_text_stream_waits_for_complete_characters(tokenizer):
    text = "héllo 世界 🙂 cat"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    stream = TextStream(tokenizer)
    pieces = [stream.step(i) for i in ids]
    assert "".join(pieces) == text == tokenizer.decode(ids)
    assert "" in pieces  # a multi-byte character spans several byte-level tokens: nothing until it is complete
    assert "\ufffd" not in "".join(pieces)


def test_cli_streams_the_tokens_generate_gives(tokenizer, capsys):
    buf = io.StringIO()
    stats = main(["--prompt", "Once upon a time", "--max-new-tokens", "6"], out=buf)
    config, params = load_hf(DEFAULT_CHECKPOINT, progress=False)
    prompt = encode_prompt(tokenizer, "Once upon a time")
    ref = generate(params, config, [prompt], max_new_tokens=6).sequences()[0]
    assert stats["tokens"] == ref
    assert buf.getvalue() == TextStream(tokenizer).feed(ref) + "\n"
    assert stats["prompt_tokens"] == len(prompt) and stats["decode_steps"] == len(ref) - 1
    err = capsys.readouterr().err
    assert "prefill" in err and "tokens/s" in err
    with pytest.raises(SystemExit):
        main(["--system", "x"])


def test_cli_official_decode_flags_match_generate(tokenizer):
    """``--moba-decode dense --official-rope-offset`` gives ``generate``'s tokens with the same options (and the
    official path differs from the exact one here, so the flags do reach the decode step)."""
    text = "The quick brown fox jumps over the lazy dog."  # 30 tokens: the two decodes part after 2 new tokens
    argv = ["--prompt", text, "--max-new-tokens", "16", "--moba-decode", "dense", "--official-rope-offset"]
    stats = main(argv, out=io.StringIO())
    config, params = load_hf(DEFAULT_CHECKPOINT, progress=False)
    prompt = encode_prompt(tokenizer, text)
    official = generate(params, config, [prompt], max_new_tokens=16, moba_decode="dense",
                        official_rope_offset=True).sequences()[0]
    exact = generate(params, config, [prompt], max_new_tokens=16).sequences()[0]
    assert stats["tokens"] == official
    assert official != exact
