"""``python -m spb2_jax.eval SUBCOMMAND``: long-context evaluation, written to ``--out DIR`` (``results.json`` and
PNGs).

  ppl       perplexity of a long document, one forward per --context window (sequence-sharded with --mesh),
            and the loss vs position curve
  passkey   passkey retrieval over context lengths x needle depths (heatmap)
  niah      needle in a haystack over context lengths x needle depths (heatmap)
  recall    multi-query associative recall accuracy vs sequence length and number of pairs, beside a random-init
            model of the same config and chance
  speed     TTFT, decode tokens/s and peak memory vs context length for a config and its all-full-attention
            twin (--baseline full), log-log with fitted exponents

A user mistake (a missing file, a context longer than the text, a mesh that does not divide the context, an
unknown subcommand) prints one ``error:`` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from spb2_jax.eval.common import EvalError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one ``error:`` line (no usage block) and exits 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see python -m spb2_jax.eval --help)\n")


def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated integers, e.g. 4096,8192") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive integers")
    return out


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated numbers, e.g. 0,0.5,1") from None


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m spb2_jax.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="SUBCOMMAND", parser_class=_Parser)
    sub.required = True

    def common(q, default_out):
        q.add_argument("--checkpoint", default=None, help="HF checkpoint directory (default: the embedded tiny model)")
        q.add_argument("--mesh", default=None, help="device mesh, e.g. sequence=8 (default: one device)")
        q.add_argument("--out", default=default_out, help=f"output directory (default {default_out}/)")
        q.add_argument("--no-progress", action="store_true", help="no progress bars")

    q = sub.add_parser("ppl", help="perplexity of a long document and loss vs position")
    common(q, "eval_ppl")
    q.add_argument("--text", required=True, help="a text file")
    q.add_argument("--context", type=int, default=4096, help="tokens per window (default 4096)")
    q.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    q.add_argument("--tile-size", type=int, default=512, help="tokens per tile of logits (memory)")

    for task in ("passkey", "niah"):
        q = sub.add_parser(task, help=f"{task} accuracy over context lengths x depths")
        common(q, f"eval_{task}")
        q.add_argument("--lengths", type=_ints, default=[256, 512, 1024, 2048], help="context lengths in tokens")
        q.add_argument("--depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="needle depths in [0, 1]")
        q.add_argument("--trials", type=int, default=4, help="needles per cell (default 4)")
        q.add_argument("--format", default="auto", choices=["auto", "text", "pairs"],
                       help="text prompts (needs a tokenizer) or key/value id pairs (default: text if the "
                            "checkpoint has a tokenizer)")
        q.add_argument("--symbols", type=int, default=16, help="pairs format: number of key (and value) ids")
        if task == "niah":
            q.add_argument("--haystack", default=None, help="text file for the haystack (default: generated)")
        q.add_argument("--seed", type=int, default=0)

    q = sub.add_parser("recall", help="associative recall accuracy vs length and number of pairs")
    common(q, "eval_recall")
    q.add_argument("--lengths", type=_ints, default=[64, 128, 256, 512, 1024], help="sequence lengths in tokens")
    q.add_argument("--pairs", type=_ints, default=[4, 8, 16], help="numbers of key -> value pairs")
    q.add_argument("--symbols", type=int, default=16, help="number of key (and value) ids (training: recall_vocab)")
    q.add_argument("--examples", type=int, default=64, help="sequences per cell")
    q.add_argument("--train-length", type=int, default=256, help="the training sequence length (marked on the plot)")
    q.add_argument("--no-random-baseline", action="store_true", help="skip the random-init model of the same config")

    q = sub.add_parser("speed", help="TTFT, decode speed and peak memory vs context length")
    q.add_argument("--config", default=None, help="model config JSON (default: the --checkpoint's config)")
    q.add_argument("--checkpoint", default=None, help="HF checkpoint whose config is timed (random weights)")
    q.add_argument("--out", default="eval_speed", help="output directory (default eval_speed/)")
    q.add_argument("--lengths", type=_ints, default=[4096, 8192, 16384, 32768, 65536], help="context lengths")
    q.add_argument("--baseline", choices=["full"], default=None, help="also time the all-full-attention twin")
    q.add_argument("--sse-swa-only", action="store_true", help="also time the all SSE + SWA variant")
    q.add_argument("--dtype", default=None, help="compute dtype (default: the config's)")
    q.add_argument("--decode-steps", type=int, default=8, help="decode steps timed after each prefill")
    q.add_argument("--max-seconds", type=float, default=None, help="stop a curve after a slower prefill")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise EvalError(f"--text {path!r}: no such file")
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _run_ppl(args) -> dict[str, Any]:
    from spb2_jax.eval.common import load_model, mesh_sizes, parse_mesh, write_results
    from spb2_jax.eval.plots import plot_lines
    from spb2_jax.eval.ppl import check_context, perplexity

    text = _read_text(args.text)
    check_context(10 ** 18, args.context, mesh_sizes(args.mesh).get("sequence", 1))  # before any device work
    mesh = parse_mesh(args.mesh)
    model = load_model(args.checkpoint, mesh, not args.no_progress)
    if model.tokenizer is None:
        raise EvalError(f"--checkpoint {args.checkpoint!r} has no tokenizer.json (ppl reads text)")
    res = perplexity(model, model.encode(text), args.context, max_windows=args.max_windows,
                     tile_size=args.tile_size, progress=not args.no_progress)
    c = res["curve"]
    mid = [(a + b - 1) / 2 for a, b in zip(c["position_lo"], c["position_hi"])]
    png = plot_lines(os.path.join(args.out, "loss_vs_position.png"), {"mean loss": (mid, c["nll"])},
                     xlabel="token position in the window (tokens, log scale)", ylabel="loss (nats / token)",
                     title=f"loss vs position: ppl {res['ppl']:.3f}, {res['windows']} x {args.context} tokens",
                     logx=True)
    write_results(args.out, "ppl", vars(args), {**res, "plots": [os.path.basename(png)]}, mesh=mesh,
                  model_config=model.config)
    print(f"ppl {res['ppl']:.4f} (nll {res['nll']:.4f} nats/token) over {res['windows']} windows x {args.context} "
          f"tokens; wrote {args.out}/results.json, {os.path.basename(png)}")
    return res


def _run_retrieval(args) -> dict[str, Any]:
    import numpy as np

    from spb2_jax.eval.common import load_model, parse_mesh, write_results
    from spb2_jax.eval.plots import plot_heatmap
    from spb2_jax.eval.retrieval import retrieval_grid

    haystack = getattr(args, "haystack", None)
    if haystack is not None and not os.path.isfile(haystack):
        raise EvalError(f"--haystack {haystack!r}: no such file")
    if args.trials < 1:
        raise EvalError(f"--trials {args.trials} must be >= 1")
    if not args.depths or any(not 0.0 <= d <= 1.0 for d in args.depths):
        raise EvalError(f"--depths {args.depths} must lie in [0, 1]")
    mesh = parse_mesh(args.mesh)
    model = load_model(args.checkpoint, mesh, not args.no_progress)
    res = retrieval_grid(model, args.command, args.lengths, args.depths, trials=args.trials, fmt=args.format,
                         symbols=args.symbols, haystack=haystack, seed=args.seed, progress=not args.no_progress)
    acc = np.asarray(res["accuracy"])
    png = plot_heatmap(os.path.join(args.out, f"{args.command}_heatmap.png"), acc, rows=args.depths,
                       cols=args.lengths, xlabel="context length (tokens)", ylabel="needle depth (fraction of context)",
                       title=f"{args.command} ({res['format']} prompts, {args.trials} trials per cell): mean "
                             f"{acc.mean():.2f}", cbar="retrieval accuracy (fraction)")
    res["mean_accuracy"] = float(acc.mean())
    write_results(args.out, args.command, vars(args), {**res, "plots": [os.path.basename(png)]}, mesh=mesh,
                  model_config=model.config)
    print(f"{args.command} ({res['format']}): mean accuracy {acc.mean():.3f}")
    print("depth \\ length " + " ".join(f"{L:>7}" for L in args.lengths))
    for d, row in zip(args.depths, acc):
        print(f"{d:>14.2f} " + " ".join(f"{a:>7.2f}" for a in row))
    print(f"wrote {args.out}/results.json, {os.path.basename(png)}")
    return res


def _run_recall(args) -> dict[str, Any]:
    import jax

    from spb2_jax.eval.common import load_model, write_results
    from spb2_jax.eval.plots import plot_lines
    from spb2_jax.eval.recall import format_recall_table, recall_grid
    from spb2_jax.model import init_params

    if args.examples < 1 or args.symbols < 2:
        raise EvalError(f"--examples {args.examples} must be >= 1 and --symbols {args.symbols} >= 2")
    if max(args.pairs) > args.symbols:
        raise EvalError(f"--pairs {max(args.pairs)} needs that many distinct keys; --symbols {args.symbols} gives "
                        f"{args.symbols}")
    if args.mesh:
        raise EvalError("recall runs on one device (its sequences are short); drop --mesh")
    model = load_model(args.checkpoint, None, not args.no_progress)
    if 3 + 2 * args.symbols > model.config.vocab_size:
        raise EvalError(f"--symbols {args.symbols} needs {3 + 2 * args.symbols} ids; the model has "
                        f"vocab_size={model.config.vocab_size}")
    models = {"model": (model.config, model.options, model.params)}
    if not args.no_random_baseline:
        models["random init"] = (model.config, model.options, init_params(model.config, jax.random.key(0)))
    rows = recall_grid(models, args.lengths, args.pairs, examples=args.examples, symbols=args.symbols,
                       progress=not args.no_progress)
    chance = 1.0 / args.symbols
    table = format_recall_table(rows, chance)
    curves = {f"{name}, {p} pairs": ([r["length"] for r in rows if r["model"] == name and r["pairs"] == p],
                                     [r["accuracy"] for r in rows if r["model"] == name and r["pairs"] == p])
              for name in models for p in args.pairs}
    png = plot_lines(os.path.join(args.out, "recall_vs_length.png"), {k: v for k, v in curves.items() if v[0]},
                     xlabel="sequence length (tokens, log scale)", ylabel="recall accuracy (fraction of queries)",
                     title="multi-query associative recall", logx=True, ylim=(0, 1.02),
                     hline=(chance, f"chance 1/{args.symbols}"), vline=(args.train_length, "training length"))
    write_results(args.out, "recall", vars(args), {"rows": rows, "chance": chance, "table": table,
                                                   "plots": [os.path.basename(png)]}, model_config=model.config)
    sys.stdout.write(table)
    print(f"wrote {args.out}/results.json, {os.path.basename(png)}")
    return {"rows": rows, "chance": chance}


def _run_speed(args) -> dict[str, Any]:
    from spb2_jax.checkpoint.auto import config_of
    from spb2_jax.config import SpB2Config
    from spb2_jax.eval.common import write_results
    from spb2_jax.eval.memory import predict_memory
    from spb2_jax.eval.plots import fit_exponent, plot_loglog
    from spb2_jax.eval.speed import speed_curves, variant_config
    from spb2_jax.options import resolve_options

    if args.config is not None:
        if not os.path.isfile(args.config):
            raise EvalError(f"--config {args.config!r}: no such file")
        config = SpB2Config.from_json_file(args.config)
    else:
        config = config_of(args.checkpoint) if args.checkpoint else config_of(None)
    if args.decode_steps < 0:
        raise EvalError(f"--decode-steps {args.decode_steps} must be >= 0")
    variants = ["model"] + (["full"] if args.baseline == "full" else []) + (["sse_swa"] if args.sse_swa_only else [])
    curves = speed_curves(config, variants, args.lengths, dtype=args.dtype, decode_steps=args.decode_steps,
                          max_seconds=args.max_seconds, progress=not args.no_progress)
    summary = {}
    calibration = tuple(sorted(args.lengths)[:2]) if len(args.lengths) >= 2 else None
    for v, c in curves.items():
        cfg = variant_config(config, v)
        dtype = resolve_options(cfg, dtype=args.dtype).dtype
        for p in c["points"]:
            p["predicted_bytes"] = predict_memory(cfg, p["T"], dtype=dtype, extra_slots=args.decode_steps,
                                                  **({"calibration": calibration} if calibration else {}))["total"]
            p["prediction_error"] = p["predicted_bytes"] / p["peak_bytes"] - 1 if p["peak_bytes"] else None
        Ts = [p["T"] for p in c["points"]]
        summary[v] = {"ttft_exponent": fit_exponent(Ts, [p["ttft_s"] for p in c["points"]]),
                      "memory_exponent": fit_exponent(Ts, [p["peak_bytes"] or 0 for p in c["points"]]),
                      "largest_T": max(Ts) if Ts else None, "stopped": c["stopped"]}
    pngs = [plot_loglog(os.path.join(args.out, "ttft.png"),
                        {v: ([p["T"] for p in c["points"]], [p["ttft_s"] for p in c["points"]]) for v, c in curves.items()},
                        xlabel="context length T (tokens)", ylabel="time to first token (s)",
                        title="prefill time vs context (batch 1)"),
            plot_loglog(os.path.join(args.out, "memory.png"),
                        {v: ([p["T"] for p in c["points"]], [p["peak_bytes"] / 2 ** 20 for p in c["points"]])
                         for v, c in curves.items()},
                        xlabel="context length T (tokens)", ylabel="peak memory (MiB)",
                        title="peak memory vs context (batch 1)")]
    decode = {v: ([p["T"] for p in c["points"] if p["decode_tok_s"]], [p["decode_tok_s"] for p in c["points"]
                                                                          if p["decode_tok_s"]])
              for v, c in curves.items()}
    if any(x for x, _ in decode.values()):
        pngs.append(plot_loglog(os.path.join(args.out, "decode.png"), decode, xlabel="context length T (tokens)",
                                ylabel="decode speed (tokens / s)", title="decode speed vs context (batch 1)"))
    write_results(args.out, "speed", vars(args), {"curves": curves, "summary": summary,
                                                  "plots": [os.path.basename(p) for p in pngs]}, model_config=config)
    print(f"{'variant':>8} {'T':>7} {'TTFT s':>9} {'decode tok/s':>12} {'peak MiB':>9} {'model MiB':>9} {'err':>6}")
    for v, c in curves.items():
        for p in c["points"]:
            err = p["prediction_error"]
            print(f"{v:>8} {p['T']:>7} {p['ttft_s']:>9.3f} {p['decode_tok_s'] or 0:>12.1f} "
                  f"{p['peak_bytes'] / 2 ** 20:>9.1f} {p['predicted_bytes'] / 2 ** 20:>9.1f} "
                  f"{'' if err is None else f'{100 * err:+.1f}%':>6}")
    for v, s in summary.items():
        a = s["ttft_exponent"]
        print(f"{v}: TTFT exponent {'-' if a is None else f'{a:.2f}'}, largest T {s['largest_T']}"
              + (f", stopped: {s['stopped']}" if s["stopped"] else ""))
    print(f"wrote {args.out}/results.json, {', '.join(os.path.basename(p) for p in pngs)}")
    return {"curves": curves, "summary": summary}


RUNNERS = {"ppl": _run_ppl, "passkey": _run_retrieval, "niah": _run_retrieval, "recall": _run_recall,
           "speed": _run_speed}


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit status (2: a user mistake, printed as one ``error:`` line)."""
    args = _parser().parse_args(argv)
    try:
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise EvalError(f"--out {args.out!r} exists and is not a directory")
        os.makedirs(args.out, exist_ok=True)
        RUNNERS[args.command](args)
    except EvalError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
