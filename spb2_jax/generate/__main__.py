"""Generate text from a checkpoint: ``python -m spb2_jax.generate --checkpoint DIR --prompt "..." [--chat]``.

A SpB2.0-VL checkpoint (``model_type == "spb2_vl"``) takes ``--image PATH`` (repeatable): the images are resized by
the Qwen-VL rule, put before the prompt text as the official example does, prefilled once, and the answer is
decoded over the caches (``spb2_jax.generate.vl``).

Loads ``config.json`` + safetensors + ``tokenizer.json`` from DIR (default: the tiny demo model shipped with the
package), compiles prefill and one decode step ahead of time, then prefills the prompt and decodes token by token,
printing the text as it is produced. Ends with the compile time and the prefill and decode throughput (stderr).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spb2_jax.checkpoint import load_hf
from spb2_jax.generate.decode import check_token_ids, extend
from spb2_jax.generate.sampling import sample_token
from spb2_jax.generate.tokenizer import TextStream, encode_prompt, load_tokenizer, stop_token_ids
from spb2_jax.layers.cache import init_cache
from spb2_jax.options import DEFAULT_IMPL, IMPLS, MOBA_DECODE, resolve_options

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "tiny")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@functools.partial(jax.jit, static_argnames=("config", "fresh", "decoding", "top_k", "options"),
                   donate_argnames=("cache",))
def _extend_and_sample(params, ids, cache, rng, temperature, top_p, *, config, fresh, decoding, top_k, options):
    """Add ``ids [1, T]`` to the cache (in place) and sample the next token (same key chain as ``generate``)."""
    logits, cache = extend(params, ids, jnp.ones(ids.shape, bool), cache, config=config, fresh=fresh,
                           all_logits=False, decoding=decoding, options=options)
    rng, key = jax.random.split(rng)
    token = sample_token(logits[:, 0], key, temperature=temperature, top_k=top_k, top_p=top_p)
    return token[:, None], cache, rng


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spb2_jax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help="HF checkpoint directory with config.json, safetensors and tokenizer.json "
                        "(default: the embedded tiny model)")
    p.add_argument("--prompt", default="Once upon a time", help="prompt text (default: %(default)r)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the Qwen ChatML template and stop at "
                                                       "<|im_end|>")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="params and compute dtype")
    p.add_argument("--impl", choices=IMPLS, default=DEFAULT_IMPL, help="token-mixer path")
    p.add_argument("--moba-decode", choices=MOBA_DECODE, default="exact",
                   help="'dense' reproduces the official cached decode (MoBA layers attend to every cached token)")
    p.add_argument("--official-rope-offset", action="store_true",
                   help="reproduce the official cache's RoPE quirk in decode steps (layers >= 1 rotate the new token "
                        "at position + 1); with --moba-decode dense: the official cached decode")
    p.add_argument("--image", action="append", default=[], help="an image file (VL checkpoints; repeatable)")
    p.add_argument("--max-pixels", type=int, default=16 * 16 * 4 * 1280,
                   help="VL: resize images above this many pixels (Qwen-VL rule; default %(default)s)")
    p.add_argument("--float32-qk", action="store_true",
                   help="VL: skip the official bf16 rounding of q / k (the pure-float32 model)")
    return p


def _main_vl(args, out) -> dict[str, Any]:
    """The VL path of ``main``: images + prompt -> prefill -> cached decode."""
    from spb2_jax.checkpoint.vl import load_vl
    from spb2_jax.generate.vl import generate_vl
    from spb2_jax.vision.preprocess import patchify_images
    from spb2_jax.vision.prompt import encode_vl_prompt

    dtype = DTYPES[args.dtype]
    tokenizer = load_tokenizer(args.checkpoint)
    config, params = load_vl(args.checkpoint, dtype=dtype)
    options = resolve_options(config.text, dtype=dtype, impl=args.impl, official_qk_bf16=not args.float32_qk)
    pixels, grids = None, np.zeros((0, 3), np.int64)
    if args.image:
        v = config.vision
        pixels, grids = patchify_images(args.image, v, resize=True, max_pixels=args.max_pixels,
                                        min_pixels=(v.patch_size * v.spatial_merge_size) ** 2)
    prompt = encode_vl_prompt(tokenizer, args.prompt, grids, config, chat=args.chat, system=args.system)
    check_token_ids(prompt, config.text.vocab_size, "the tokenized prompt (tokenizer.json vs config.json)")
    stops = stop_token_ids(tokenizer, config.text, chat=args.chat)
    print(f"[{len(prompt)} prompt tokens, {len(args.image)} images {grids.tolist()}, backend "
          f"{jax.default_backend()}, {args.dtype}]", file=sys.stderr)
    t0 = time.perf_counter()
    tokens = generate_vl(params, config, np.asarray([prompt]), pixel_values=pixels,
                         image_grid_thw=grids if args.image else None, options=options,
                         max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, stop_tokens=stops)[0]
    seconds = time.perf_counter() - t0
    out.write(tokenizer.decode(tokens, skip_special_tokens=True) + "\n")
    print(f"generated {len(tokens)} tokens in {seconds:.2f} s (compilation included)", file=sys.stderr)
    return dict(tokens=tokens, prompt_tokens=len(prompt), seconds=seconds)


def main(argv: list[str] | None = None, out=None) -> dict[str, Any]:
    """Run the CLI; returns the generated ids and the timings (also printed)."""
    parser = _parser()
    args = parser.parse_args(argv)
    out = out or sys.stdout
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not 0.0 < args.top_p <= 1.0:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    if args.system is not None and not args.chat:
        parser.error("--system needs --chat")
    from spb2_jax.checkpoint.qwen3 import checkpoint_model_type
    from spb2_jax.checkpoint.vl import VL_MODEL_TYPE

    if checkpoint_model_type(args.checkpoint) == VL_MODEL_TYPE:
        return _main_vl(args, out)
    if args.image:
        parser.error(f"--image needs a VL checkpoint ({args.checkpoint} is a text model)")
    dtype = DTYPES[args.dtype]
    tokenizer = load_tokenizer(args.checkpoint)
    config, params = load_hf(args.checkpoint, dtype=dtype)
    options = resolve_options(config, dtype=dtype, impl=args.impl, moba_decode=args.moba_decode,
                              official_rope_offset=args.official_rope_offset)
    prompt = encode_prompt(tokenizer, args.prompt, chat=args.chat, system=args.system)
    check_token_ids(prompt, config.vocab_size, "the tokenized prompt (tokenizer.json vs config.json)")
    stops = set(stop_token_ids(tokenizer, config, chat=args.chat))
    print(f"[{len(prompt)} prompt tokens, backend {jax.default_backend()}, {args.dtype}]", file=sys.stderr)

    cache = init_cache(config, 1, len(prompt) + args.max_new_tokens, dtype)
    ids = jnp.asarray([prompt], jnp.int32)
    rng = jax.random.key(args.seed)
    floats = (jnp.float32(args.temperature), jnp.float32(args.top_p))
    static = dict(config=config, top_k=args.top_k, options=options)
    t0 = time.perf_counter()  # ahead-of-time compilation, so that the timings below are pure run time
    prefill_fn = _extend_and_sample.lower(params, ids, cache, rng, *floats, fresh=True, decoding=False,
                                          **static).compile()
    step_fn = _extend_and_sample.lower(params, ids[:, :1], cache, rng, *floats, fresh=False, decoding=True,
                                       **static).compile()
    compile_s = time.perf_counter() - t0

    stream = TextStream(tokenizer)
    t0 = time.perf_counter()
    token, cache, rng = prefill_fn(params, ids, cache, rng, *floats)
    generated = [int(token[0, 0])]  # the host read waits for the prefill
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    while True:
        out.write(stream.step(generated[-1]))
        out.flush()
        if generated[-1] in stops or len(generated) == args.max_new_tokens:
            break
        token, cache, rng = step_fn(params, token, cache, rng, *floats)
        generated.append(int(token[0, 0]))
    decode_s = time.perf_counter() - t0
    out.write("\n")
    steps = len(generated) - 1
    stats = dict(tokens=generated, prompt_tokens=len(prompt), compile_s=compile_s, prefill_s=prefill_s,
                 prefill_tok_s=len(prompt) / prefill_s, decode_steps=steps, decode_s=decode_s,
                 decode_tok_s=steps / decode_s if steps else float("nan"))
    print(f"compile {compile_s:.2f} s | prefill {len(prompt)} tokens in {prefill_s * 1e3:.1f} ms = "
          f"{stats['prefill_tok_s']:.1f} tokens/s | decode {steps} tokens in {decode_s * 1e3:.1f} ms = "
          f"{stats['decode_tok_s']:.1f} tokens/s", file=sys.stderr)
    return stats


if __name__ == "__main__":
    main()
