"""Demo: ``python -m spb2_jax`` loads the tiny official-format checkpoint shipped with the package, runs its
prompt through the Flax model on CPU and compares the logits with the official PyTorch model's."""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from spb2_jax.checkpoint import load_hf
from spb2_jax.model import SpB2ForCausalLM

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(__file__), "assets", "tiny")


def main(argv: list[str] | None = None) -> float:
    """Run the demo; returns the max |logits - official logits|."""
    parser = argparse.ArgumentParser(prog="python -m spb2_jax", description=__doc__)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                        help="HF checkpoint directory with a reference.npz (default: the embedded tiny model)")
    args = parser.parse_args(argv)

    config, params = load_hf(args.checkpoint, progress=False)
    ref_path = os.path.join(args.checkpoint, "reference.npz")
    if not os.path.isfile(ref_path):
        parser.error(f"{args.checkpoint} has no reference.npz (input_ids and official logits) to compare with")
    ref = np.load(ref_path)
    input_ids = jnp.asarray(ref["input_ids"], jnp.int32)
    kinds = ", ".join(f"{i}:{k}" for i, k in enumerate(config.layer_kinds))
    print(f"model: {config.num_hidden_layers} layers ({kinds}), hidden {config.hidden_size}, "
          f"vocab {config.vocab_size}, backend {jax.default_backend()}")
    print(f"prompt: {input_ids.shape[1]} tokens: {np.asarray(input_ids[0, :12]).tolist()} ...")

    model = SpB2ForCausalLM(config)
    forward = jax.jit(lambda p, ids: model.apply({"params": p}, ids).logits)
    t0 = time.perf_counter()
    logits = forward(params, input_ids).block_until_ready()
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits = forward(params, input_ids).block_until_ready()
    t_run = time.perf_counter() - t0

    max_diff = float(np.abs(np.asarray(logits) - ref["logits"]).max())
    next_ids = np.asarray(jnp.argmax(logits[0, -1]))
    print(f"next token (greedy): {int(next_ids)}; official: {int(ref['logits'][0, -1].argmax())}")
    print(f"max |logits - official logits| = {max_diff:.3e}")
    print(f"forward time: {t_run * 1e3:.1f} ms (first call incl. compilation: {t_compile:.2f} s)")
    return max_diff


if __name__ == "__main__":
    main()
