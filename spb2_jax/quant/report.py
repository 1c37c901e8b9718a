"""The INT8-Spiking report: per-layer spike statistics, operation counts, an energy estimate and a k sweep.

For a checkpoint and a text, the float32 model and the ``int8_spiking`` model (``quantize``) read the same tokens;
every coded linear layer sows its input's count statistics (``spb2_jax.ops.spikes.count_stats``). Derived per
layer, for the two signed spike codes (``T`` from the layer's largest count):

- ternary: ``T = max|n|``, spikes per activation ``mean|n|``, firing rate ``mean|n| / T``;
- bitwise (sign x bit, MSB first): ``T = ceil(log2(max|n| + 1))``, spikes per activation ``mean popcount(|n|)``,
  firing rate ``mean popcount / T``;
- spike sparsity ``1 - firing rate``; count sparsity (``n == 0``), silent channels, ``|n| <= 7`` share, clip rate.

Operations of a linear layer ``D -> F`` over ``M`` tokens: the dense model does ``M D F`` multiply-accumulates; the
event-driven spiking layer adds one weight row (``F`` additions) per spike: ``M D s F`` accumulates for ``s``
spikes per activation (bitwise code), plus ``M G F`` multiplies by the group scales (``G = ceil(D / 128)``).
Energy, 45 nm constants as cited by the SpikingBrain 1.0 report (arXiv 2509.05276, from Horowitz, ISSCC 2014):
FP16 MAC 1.5 pJ, INT8 MAC 0.23 pJ, INT8 add 0.03 pJ.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from spb2_jax.model import SpB2ForCausalLM
from spb2_jax.ops.quantized import GROUP
from spb2_jax.options import resolve_options
from spb2_jax.quant.accuracy import agreement, mean_nll
from spb2_jax.quant.quantize import quantize, quantized_layers

ENERGY_PJ = {"fp16_mac": 1.5, "int8_mac": 0.23, "int8_add": 0.03}
ENERGY_SOURCE = ("45 nm, as cited by the SpikingBrain 1.0 technical report (arXiv 2509.05276) from M. Horowitz, "
                 "'Computing's energy problem', ISSCC 2014")
K_SWEEP = (2.0, 2.5, 3.0, 3.5, 4.0)


@dataclasses.dataclass(frozen=True)
class LayerStats:
    """One coded layer's input statistics and operation counts (module docstring)."""

    name: str
    numel: int
    d_in: int
    d_out: int
    max_abs_count: int
    count_sparsity: float
    silent_channels: float
    small_count_share: float
    clip_rate: float
    ternary_spikes: float
    ternary_rate: float
    bitwise_spikes: float
    bitwise_rate: float

    @property
    def tokens(self) -> int:
        return self.numel // self.d_in

    @property
    def dense_macs(self) -> float:
        return float(self.tokens) * self.d_in * self.d_out

    @property
    def spike_accumulates(self) -> float:
        return float(self.numel) * self.bitwise_spikes * self.d_out

    @property
    def scale_macs(self) -> float:
        return float(self.tokens) * math.ceil(self.d_in / GROUP) * self.d_out


def _layer_stats(name: str, raw: dict, d_in: int, d_out: int) -> LayerStats:
    s = {k: float(np.asarray(v)) for k, v in raw.items()}
    top = int(s["max_abs_count"])
    t_ternary = max(top, 1)
    t_bitwise = max(1, math.ceil(math.log2(top + 1)))
    return LayerStats(name, int(s["numel"]), d_in, d_out, top, s["zero_fraction"], s["silent_channel_fraction"],
                      s["small_count_share"], s["clip_rate"], s["mean_abs_count"], s["mean_abs_count"] / t_ternary,
                      s["mean_popcount"], s["mean_popcount"] / t_bitwise)


def select_layers(params: Any, layers: str | None) -> list[str]:
    """The coded layer paths (``model/layers_0/attn/q_proj``...) of a param tree (or its abstract shapes) that the
    regex ``layers`` selects (all for None); ``ValueError`` when it selects none."""
    coded = ["/".join(p) for p in quantized_layers(params)]
    chosen = [n for n in coded if layers is None or re.search(layers, n)]
    if not chosen:
        raise ValueError(f"--layers {layers!r} matches none of the checkpoint's {len(coded)} coded layers (e.g. "
                         f"{coded[:3]})")
    return chosen


def spiking_report(config, params, ids: np.ndarray, *, k: float = 3.0, layers: str | None = None,
                   sweep: tuple[float, ...] = K_SWEEP) -> dict[str, Any]:
    """The report's numbers for token ids ``[1, T]`` (module docstring); ``layers``: a regex selecting layer paths
    (``"mlp"``, ``"layers_3/"``); a pattern that matches no coded layer is a ``ValueError``."""
    if not k > 0:
        raise ValueError(f"k={k} must be > 0 (the spiking threshold is mean|x| / k)")
    chosen = select_layers(params, layers)
    ids = jnp.asarray(ids, jnp.int32)
    ref = jax.jit(lambda p, i: SpB2ForCausalLM(config).apply({"params": p}, i).logits)(params, ids)
    nll_ref = mean_nll(ref, ids)
    qparams = quantize(params, config, "int8_spiking")
    flat = traverse_util.flatten_dict(params)

    def coded_run(kk: float):
        model = SpB2ForCausalLM(config, resolve_options(config, coding="int8_spiking", spike_k=kk))
        out, state = jax.jit(lambda p, i: model.apply({"params": p}, i, mutable=["intermediates"]))(qparams, ids)
        stats = {"/".join(p[:-1]): v[0] for p, v in traverse_util.flatten_dict(state["intermediates"]).items()
                 if p[-1] == "spike_stats"}
        return out.logits, stats

    logits, stats = coded_run(k)
    rows = []
    for name in chosen:
        kernel = flat[tuple(name.split("/")) + ("kernel",)]
        rows.append(_layer_stats(name, stats[name], int(kernel.shape[0]), int(kernel.shape[1])))
    top1, kl = agreement(ref, logits)
    sweep_rows = []
    for kk in sweep:
        lk, sk = (logits, stats) if kk == k else coded_run(kk)
        numel = sum(float(np.asarray(sk[n]["numel"])) for n in chosen)
        rate = sum(float(np.asarray(sk[n]["numel"])) * _layer_stats(n, sk[n], 1, 1).bitwise_rate for n in chosen)
        zero = sum(float(np.asarray(sk[n]["numel"])) * float(np.asarray(sk[n]["zero_fraction"])) for n in chosen)
        t1, klk = agreement(ref, lk)
        sweep_rows.append({"k": kk, "bitwise_sparsity": 1 - rate / numel, "count_sparsity": zero / numel,
                           "ppl": math.exp(mean_nll(lk, ids)), "top1": t1, "kl": klk})
    total = lambda f: sum(f(r) for r in rows)  # noqa: E731
    numel = total(lambda r: r.numel)
    overall = {
        "tokens": int(ids.shape[1]), "k": k, "layers": len(rows), "ppl_float32": math.exp(nll_ref),
        "ppl_spiking": math.exp(mean_nll(logits, ids)), "top1_agreement": top1, "kl_to_float32": kl,
        "count_sparsity": total(lambda r: r.numel * r.count_sparsity) / numel,
        "bitwise_firing_rate": total(lambda r: r.numel * r.bitwise_rate) / numel,
        "bitwise_spikes_per_activation": total(lambda r: r.numel * r.bitwise_spikes) / numel,
        "ternary_spikes_per_activation": total(lambda r: r.numel * r.ternary_spikes) / numel,
        "small_count_share": total(lambda r: r.numel * r.small_count_share) / numel,
        "clip_rate": total(lambda r: r.numel * r.clip_rate) / numel,
        "dense_macs": total(lambda r: r.dense_macs), "spike_accumulates": total(lambda r: r.spike_accumulates),
        "scale_macs": total(lambda r: r.scale_macs),
    }
    overall["bitwise_sparsity"] = 1 - overall["bitwise_firing_rate"]
    e = ENERGY_PJ
    overall["energy_pj"] = {
        "dense_fp16": overall["dense_macs"] * e["fp16_mac"], "dense_int8": overall["dense_macs"] * e["int8_mac"],
        "spiking": overall["spike_accumulates"] * e["int8_add"] + overall["scale_macs"] * e["int8_mac"],
    }
    return {"overall": overall, "layers": [dataclasses.asdict(r) for r in rows], "k_sweep": sweep_rows,
            "energy_constants_pj": ENERGY_PJ, "energy_source": ENERGY_SOURCE}


def format_report(report: dict[str, Any]) -> str:
    """The per-layer and overall table, the sweep and the energy estimate as text."""
    o = report["overall"]
    lines = [f"{'layer':<40} {'D->F':>10} {'count sp.':>9} {'bitwise sp.':>11} {'spk/act':>8} {'|n|<=7':>7} "
             f"{'silent':>7} {'clip':>8}"]
    for r in report["layers"]:
        lines.append(f"{r['name']:<40} {str(r['d_in']) + '->' + str(r['d_out']):>10} {r['count_sparsity']:>9.3f} "
                     f"{1 - r['bitwise_rate']:>11.3f} {r['bitwise_spikes']:>8.3f} {r['small_count_share']:>7.3f} "
                     f"{r['silent_channels']:>7.3f} {r['clip_rate']:>8.2e}")
    lines += ["", f"overall ({o['layers']} layers, {o['tokens']} tokens, k = {o['k']}): count sparsity "
              f"{o['count_sparsity']:.4f}, bitwise spike sparsity {o['bitwise_sparsity']:.4f}, spikes per activation "
              f"{o['bitwise_spikes_per_activation']:.3f} (bitwise) / {o['ternary_spikes_per_activation']:.3f} "
              f"(ternary), |n| <= 7: {o['small_count_share']:.4f}, clip rate {o['clip_rate']:.2e}",
              f"perplexity {o['ppl_float32']:.4f} (float32) -> {o['ppl_spiking']:.4f} (INT8-Spiking), top-1 "
              f"agreement {o['top1_agreement']:.4f}, KL {o['kl_to_float32']:.3e}",
              f"operations: dense {o['dense_macs']:.4g} MACs vs spiking {o['spike_accumulates']:.4g} accumulates "
              f"+ {o['scale_macs']:.4g} scale MACs",
              "energy ({}): dense FP16 {:.4g} pJ, dense INT8 {:.4g} pJ, spiking {:.4g} pJ (constants {})".format(
                  report["energy_source"], o["energy_pj"]["dense_fp16"], o["energy_pj"]["dense_int8"],
                  o["energy_pj"]["spiking"], report["energy_constants_pj"]),
              "", f"{'k':>4} {'count sp.':>9} {'bitwise sp.':>11} {'ppl':>10} {'top-1':>7} {'KL':>9}"]
    for s in report["k_sweep"]:
        lines.append(f"{s['k']:>4} {s['count_sparsity']:>9.4f} {s['bitwise_sparsity']:>11.4f} {s['ppl']:>10.4f} "
                     f"{s['top1']:>7.4f} {s['kl']:>9.2e}")
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], out_dir: str) -> list[str]:
    """``sparsity_per_layer.png`` and ``k_sweep.png`` in ``out_dir``; returns their paths."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["layers"]
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(rows)), 4))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [1 - r["bitwise_rate"] for r in rows], 0.4, label="bitwise spike sparsity")
    ax.bar(x + 0.2, [r["count_sparsity"] for r in rows], 0.4, label="count sparsity (n = 0)")
    ax.set_xticks(x, [r["name"].replace("model/", "") for r in rows], rotation=90, fontsize=6)
    ax.set_ylim(0, 1)
    ax.set_ylabel("sparsity")
    ax.set_title(f"INT8-Spiking sparsity per layer (k = {report['overall']['k']})")
    ax.legend()
    fig.tight_layout()
    first = os.path.join(out_dir, "sparsity_per_layer.png")
    fig.savefig(first, dpi=100)
    plt.close(fig)
    sw = report["k_sweep"]
    ks = [s["k"] for s in sw]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(ks, [s["bitwise_sparsity"] for s in sw], "o-", label="bitwise spike sparsity")
    left.plot(ks, [s["count_sparsity"] for s in sw], "s-", label="count sparsity (n = 0)")
    left.set_xlabel("k (threshold = mean|x| / k)")
    left.set_ylabel("sparsity (fraction)")
    left.set_ylim(0, 1)
    left.legend()
    left.set_title("sparsity vs k")
    right.plot(ks, [s["ppl"] for s in sw], "o-", color="C0", label="INT8-Spiking perplexity")
    right.axhline(report["overall"]["ppl_float32"], color="gray", ls="--", label="float32 perplexity")
    right.set_xlabel("k (threshold = mean|x| / k)")
    right.set_ylabel("perplexity")
    twin = right.twinx()
    twin.plot(ks, [s["kl"] for s in sw], "s:", color="C3", label="KL(float32 || spiking), nats/token")
    twin.set_ylabel("KL (nats / token)")
    lines = right.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    right.legend(lines, [line.get_label() for line in lines], fontsize=8)
    right.set_title("accuracy vs k")
    fig.tight_layout()
    second = os.path.join(out_dir, "k_sweep.png")
    fig.savefig(second, dpi=100)
    plt.close(fig)
    return [first, second]
