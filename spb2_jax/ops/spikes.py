"""INT8-Spiking math (pure jnp; re-exported by ``spb2_jax.quant``): SpikingBrain's integer spike counts and an exact
spike-train emulator.

Counts (SpikingBrain 1.0, arXiv 2509.05276 eqs. 19-23; ``W8ASpike``): per token, an adaptive threshold over the
input features ``V_th = clip(mean(|x|) / k, 1e-5, 1e4)`` (float32) and integer counts ``n = round(x / V_th)``,
kept in int8: a count beyond +-127 is clipped there (``clip_rate`` reports how often), never wrapped.

Spike trains ``s [T, *n.shape]`` (Int2Spike's encoders), each decoding to ``n`` exactly:

- ``binary``: s in {0, 1}, T = max n, n >= 0 only; ``n = sum_t s_t``;
- ``ternary``: s in {-1, 0, 1}, T = max |n|; ``n = sum_t s_t`` (a sign per spike);
- ``bitwise``: bidirectional bit-serial, s_t = sign(n) x bit ``T-1-t`` of |n| (MSB first),
  T = max(1, ceil(log2(max|n| + 1))); ``n = sum_t 2^(T-1-t) s_t``;
- ``twos_complement``: s in {0, 1}, the T-bit two's complement of n (MSB first, T the fewest bits that hold
  every count); ``n = -2^(T-1) s_0 + sum_{t>=1} 2^(T-1-t) s_t``.

``spike_matmul(s, w, scheme)`` is the event-driven accumulator: per time step it adds the weight rows where a spike
fires (``s_t @ w`` with s_t in {-1, 0, 1}: additions and subtractions only, int32), then combines the steps with
the scheme's weights (a shift-and-add for the bit-serial codes), equal bit for bit to ``n @ w`` in int32.

T depends on the values: ``encode_spikes`` computes it from concrete counts (outside ``jit``), or takes ``T``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

SCHEMES = ("binary", "ternary", "bitwise", "twos_complement")
V_TH_MIN, V_TH_MAX = 1e-5, 1e4
COUNT_MAX = 127  # int8, symmetric: counts are clipped to [-127, 127]


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown spike scheme {scheme!r}; the schemes are {SCHEMES}")


def threshold(x: jax.Array, k: float = 3.0) -> jax.Array:
    """``V_th [..., 1] = clip(mean(|x|, last axis) / k, 1e-5, 1e4)`` in float32."""
    if not k > 0:
        raise ValueError(f"k={k} must be > 0 (the threshold is mean|x| / k)")
    mean = jnp.mean(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True)
    return jnp.clip(mean / k, V_TH_MIN, V_TH_MAX)


def spike_counts(x: jax.Array, k: float = 3.0) -> tuple[jax.Array, jax.Array]:
    """``(n int8 [..., D], v_th float32 [..., 1])``: ``n = clip(round(x / v_th), -127, 127)`` per token (module
    docstring); ``x ~ n * v_th``."""
    v_th = threshold(x, k)
    n = jnp.round(x.astype(jnp.float32) / v_th)
    return jnp.clip(n, -COUNT_MAX, COUNT_MAX).astype(jnp.int8), v_th


def clip_rate(x: jax.Array, v_th: jax.Array) -> jax.Array:
    """Fraction of entries whose count ``round(x / v_th)`` lies beyond +-127 (clipped by ``spike_counts``)."""
    n = jnp.round(x.astype(jnp.float32) / v_th)
    return jnp.mean((jnp.abs(n) > COUNT_MAX).astype(jnp.float32))


def num_steps(n: np.ndarray | jax.Array, scheme: str) -> int:
    """T of ``scheme`` for the concrete counts ``n`` (module docstring)."""
    _check_scheme(scheme)
    n = np.asarray(n).astype(np.int64)
    top = int(np.abs(n).max()) if n.size else 0
    if scheme == "binary":
        if n.size and n.min() < 0:
            raise ValueError(f"binary spikes are {{0, 1}}: counts must be >= 0, got {int(n.min())}")
        return max(top, 1)
    if scheme == "ternary":
        return max(top, 1)
    if scheme == "bitwise":
        return max(1, math.ceil(math.log2(top + 1)))
    hi, lo = (int(n.max()), int(n.min())) if n.size else (0, 0)
    bits = 1
    while not (-(1 << (bits - 1)) <= lo and hi <= (1 << (bits - 1)) - 1):
        bits += 1
    return bits


def step_weights(T: int, scheme: str) -> np.ndarray:
    """int64 ``[T]``: the weight of time step t when decoding (1 for binary / ternary, powers of two MSB first for
    the bit-serial codes, the MSB negative in two's complement)."""
    _check_scheme(scheme)
    if scheme in ("binary", "ternary"):
        return np.ones(T, np.int64)
    w = np.asarray([1 << (T - 1 - t) for t in range(T)], np.int64)
    if scheme == "twos_complement":
        w[0] = -w[0]
    return w


def encode_spikes(n: jax.Array, scheme: str, T: int | None = None) -> jax.Array:
    """Spike train ``s [T, *n.shape]`` int8 of integer counts ``n`` (module docstring). ``T``: the number of time
    steps (default: the scheme's T for these counts, which needs concrete ``n``); a ``T`` too small to hold a count
    is an error when ``n`` is concrete."""
    _check_scheme(scheme)
    concrete = not isinstance(n, jax.core.Tracer)
    if T is None:
        if not concrete:
            raise ValueError("encode_spikes under jit needs T (the number of time steps is value-dependent)")
        T = num_steps(n, scheme)
    elif concrete and T < num_steps(n, scheme):
        raise ValueError(f"T={T} cannot hold these counts in {scheme!r} spikes: it needs {num_steps(n, scheme)}")
    n = jnp.asarray(n).astype(jnp.int32)
    t = jnp.arange(T, dtype=jnp.int32).reshape((T,) + (1,) * n.ndim)
    if scheme in ("binary", "ternary"):
        s = jnp.sign(n) * (t < jnp.abs(n)).astype(jnp.int32)
    elif scheme == "bitwise":
        s = jnp.sign(n) * ((jnp.abs(n) >> (T - 1 - t)) & 1)
    else:
        s = (jnp.bitwise_and(n, (1 << T) - 1) >> (T - 1 - t)) & 1  # the T low bits of two's complement
    return s.astype(jnp.int8)


def decode_spikes(s: jax.Array, scheme: str) -> jax.Array:
    """Counts ``n`` int32 ``[...]`` of a spike train ``s [T, ...]``: ``sum_t weight_t s_t``."""
    w = jnp.asarray(step_weights(s.shape[0], scheme), jnp.int32)
    return jnp.tensordot(w, s.astype(jnp.int32), axes=1)


def spike_matmul(s: jax.Array, w_int8: jax.Array, scheme: str) -> jax.Array:
    """Event-driven ``n @ w`` int32 ``[..., F]`` from spikes ``s [T, ..., D]`` and weights ``w_int8 [D, F]``: per
    step the rows of ``w`` where a spike fires are added (or subtracted, for a -1 spike), then the steps are
    combined by shift-and-add (``acc = 2 acc + step`` MSB first for the bit-serial codes; the two's-complement
    MSB subtracts). Equal bit for bit to ``n @ w`` accumulated in int32."""
    _check_scheme(scheme)
    if w_int8.dtype != jnp.int8:
        raise ValueError(f"w_int8 must be int8, got {w_int8.dtype}")
    dims = (((s.ndim - 2,), (0,)), ((), ()))  # the last axis of one step s[t]
    steps = [jax.lax.dot_general(s[t], w_int8, dims, preferred_element_type=jnp.int32) for t in range(s.shape[0])]
    if scheme in ("binary", "ternary"):
        return sum(steps[1:], steps[0])
    acc = -steps[0] if scheme == "twos_complement" else steps[0]
    for step in steps[1:]:
        acc = 2 * acc + step
    return acc


def count_stats(n: jax.Array, x: jax.Array, v_th: jax.Array) -> dict[str, jax.Array]:
    """Float32 scalars describing one layer input's counts ``n [..., D]`` (from ``spike_counts(x)``), from which
    the spiking report derives firing rates for any scheme (``sum|s| / (numel T)``):

    - ``numel``; ``max_abs_count`` (sets T: ``max|n|`` ternary, ``ceil(log2(max|n| + 1))`` bitwise);
    - ``zero_fraction``: counts equal to 0; ``small_count_share``: counts with ``|n| <= 7``;
    - ``mean_abs_count``: ternary spikes per activation (``sum|s| = sum|n|``); ``mean_popcount``: bitwise spikes
      per activation (set bits of ``|n|``);
    - ``silent_channel_fraction``: input channels whose count is 0 for every token;
    - ``clip_rate``: counts clipped at +-127 (``clip_rate``).
    """
    a = jnp.abs(n.astype(jnp.int32))
    bits = sum((a >> i) & 1 for i in range(8))
    flat = a.reshape(-1, a.shape[-1])
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    return {
        "numel": f32(a.size), "max_abs_count": f32(jnp.max(a)), "zero_fraction": f32(jnp.mean(a == 0)),
        "small_count_share": f32(jnp.mean(a <= 7)), "mean_abs_count": f32(jnp.mean(a)),
        "mean_popcount": f32(jnp.mean(bits)), "silent_channel_fraction": f32(jnp.mean(jnp.all(flat == 0, axis=0))),
        "clip_rate": clip_rate(x, v_th),
    }
