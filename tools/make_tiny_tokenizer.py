"""Build the tiny byte-level BPE ``tokenizer.json`` shipped with the demo checkpoint (``spb2_jax/assets/tiny``).

The tiny model's vocabulary has 384 ids: 3 special tokens (Qwen's names: ``<|endoftext|>`` = 0, ``<|im_start|>`` = 1,
``<|im_end|>`` = 2, matching the tiny config's bos 1 / eos 2), the 256 byte-level symbols, and 125 merges learned
from the small English text below. Deterministic: re-running writes the same file (a test checks this).

    python tools/make_tiny_tokenizer.py [--out spb2_jax/assets/tiny/tokenizer.json]
"""

from __future__ import annotations

import argparse
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 384
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = """\
SpikingBrain is a brain-inspired hybrid language model. Its layers mix block-sparse softmax attention, sliding
window attention and linear attention with a sparse state expansion. The linear layers keep a fixed-size state
for every head, so the cost of each new token does not grow with the length of the context. The attention layers
select the most relevant blocks of the past for every token and attend to them only.
The model reads a prompt, writes the state of every layer into a cache, and then generates one token at a time.
What is the capital of France? The capital of France is Paris. Tell me a short story about a cat and a dog.
Once upon a time there was a little cat who lived in a house with a friendly dog. They played in the garden
every day and the sun was warm and the grass was green.
"""


def build() -> Tokenizer:
    """Train the tiny tokenizer on ``CORPUS``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1)
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"trained vocabulary has {tok.get_vocab_size()} ids, expected {VOCAB_SIZE}")
    return tok


def main(argv: list[str] | None = None) -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(here, "..", "spb2_jax", "assets", "tiny", "tokenizer.json"))
    args = parser.parse_args(argv)
    build().save(args.out, pretty=True)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
