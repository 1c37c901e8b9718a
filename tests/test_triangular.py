"""``ops.triangular.unit_lower_inverse`` against numpy float64 inverses (sizes 1, odd, powers of two, batched)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spb2_jax.ops.triangular import unit_lower_inverse


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 33, 64], ids=lambda n: f"C{n}")
def test_matches_float64_inverse(n):
    rng = np.random.default_rng(n)
    # entries like the chunked delta rule's beta * decay * k.k with beta < 2: |L_ij| < 2, well-conditioned enough
    L = np.tril(rng.uniform(-1, 1, size=(2, 3, n, n)) * 0.5, -1) + np.eye(n)
    upper_garbage = np.triu(rng.normal(size=(n, n)), 0)  # diagonal and upper triangle must not be read
    got = np.asarray(jax.jit(unit_lower_inverse)(jnp.asarray(L + upper_garbage, jnp.float32)), np.float64)
    want = np.linalg.inv(L)
    cond = np.linalg.cond(L).max()
    # float32 triangular inversion: backward error ~ n * eps, forward error <= cond * n * eps
    bound = cond * n * np.finfo(np.float32).eps * np.abs(want).max()
    assert np.abs(got - want).max() <= bound, (np.abs(got - want).max(), bound)
    assert np.all(np.triu(got, 1) == 0)


def test_float64_and_gradient():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        L = jnp.asarray(np.tril(rng.normal(size=(5, 5)) * 0.4, -1) + np.eye(5))
        np.testing.assert_allclose(jax.jit(unit_lower_inverse)(L), np.linalg.inv(np.asarray(L)), rtol=0, atol=1e-13)
        w = jnp.asarray(rng.normal(size=(5, 5)))
        grad = jax.jit(jax.grad(lambda m: jnp.sum(unit_lower_inverse(m) * w)))(L)
        # d inv(L) = -inv(L) dL inv(L): the gradient wrt the strict lower triangle is -(inv^T w inv^T)
        inv = np.linalg.inv(np.asarray(L))
        want = np.tril(-(inv.T @ np.asarray(w) @ inv.T), -1)
        np.testing.assert_allclose(grad, want, rtol=0, atol=1e-12)


def test_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        unit_lower_inverse(jnp.zeros((3, 4)))
