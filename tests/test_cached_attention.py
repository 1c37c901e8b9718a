"""Cached attention ops: the gathered MoBA decode equals the masked twin and a float64 numpy oracle."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spb2_jax.ops.cached_attention import moba_gathered_attention, moba_slot_mask, tiled_attention


def _numpy_moba(q, k, v, qpos, C, topk):
    """float64 oracle, one query and head at a time: own block (keys <= p) + the top-(topk-1) earlier blocks by
    q . mean(block keys), ties to the lower block."""
    B, t, N, H = q.shape
    K = k.shape[2]
    out = np.zeros(q.shape)
    for b in range(B):
        for i in range(t):
            p = qpos[b, i]
            if p < 0:
                continue
            own = p // C
            for n in range(N):
                kh = n // (N // K)
                gates = [q[b, i, n] @ k[b, j * C:(j + 1) * C, kh].mean(0) for j in range(own)]
                order = sorted(range(own), key=lambda j: (-gates[j], j))[:topk - 1]
                keys = [s for j in order + [own] for s in range(j * C, min((j + 1) * C, p + 1))]
                logits = k[b, keys, kh] @ q[b, i, n] / np.sqrt(H)
                w = np.exp(logits - logits.max())
                out[b, i, n] = (w / w.sum()) @ v[b, keys, kh]
    return out


CASES = [
    # B, t (queries), N, K, H, S (cache slots), C, topk
    (2, 1, 8, 2, 16, 45, 8, 3),   # GQA 4:1, S not a multiple of C
    (1, 1, 4, 4, 32, 64, 16, 2),  # no GQA
    (2, 3, 4, 2, 16, 37, 4, 12),  # topk > number of blocks, several queries
    (1, 1, 2, 1, 8, 9, 8, 2),     # two blocks, the second of length 1
]


@pytest.mark.parametrize("B,t,N,K,H,S,C,topk", CASES,
                         ids=[f"B{B}-T{t}-N{N}-K{K}-H{H}-S{S}-C{C}-top{k}" for B, t, N, K, H, S, C, k in CASES])
def test_gathered_moba_equals_masked_twin_and_numpy(B, t, N, K, H, S, C, topk):
    rng = np.random.default_rng(S * 31 + C)
    q = rng.standard_normal((B, t, N, H))
    k = rng.standard_normal((B, S, K, H))
    v = rng.standard_normal((B, S, K, H))
    qpos = rng.integers(0, S, size=(B, t))
    qpos[0, 0] = S - 1
    if t > 1:
        qpos[-1, 1], qpos[0, -1] = C - 1, -1  # the end of the first block, a padding query
    nblk = -(-S // C)
    padded = np.zeros((B, nblk * C, K, H))
    padded[:, :S] = k
    sums = padded.reshape(B, nblk, C, K, H).sum(2)  # the cache's block sums (every slot filled)
    f32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    sums32, qpos32 = jnp.asarray(sums, jnp.float32), jnp.asarray(qpos, jnp.int32)
    heads_major = [jnp.swapaxes(x, 1, 2) for x in f32[1:]]  # the cache layout [B, K, S, H]
    gathered = jax.jit(functools.partial(moba_gathered_attention, chunk_size=C, topk=topk))
    got = gathered(f32[0], *heads_major, qpos32, sums32)
    mask = lambda qt, pt: moba_slot_mask(qt, pt, sums32, num_slots=S, chunk_size=C, topk=topk)  # noqa: E731
    twin = jax.jit(lambda q, k, v, qpos: tiled_attention(q, k, v, mask, qpos))(*f32, qpos32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(twin), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got), _numpy_moba(q, k, v, qpos, C, topk), rtol=1e-4, atol=1e-5)
    with jax.enable_x64(True):  # float64: the same to rounding
        got64 = gathered(jnp.asarray(q), *(jnp.asarray(x.swapaxes(1, 2)) for x in (k, v)), jnp.asarray(qpos),
                         jnp.asarray(sums))
    np.testing.assert_allclose(np.asarray(got64), _numpy_moba(q, k, v, qpos, C, topk), rtol=1e-10, atol=1e-12)
