"""Minimal reproducer: XLA:CPU's YNNPACK fusion miscompiles a dot whose right operand is a scalar broadcast.

    python tools/ynn_miscompile_repro.py        # exit status 1 while this XLA miscompiles, 0 once it is fixed

Found with jax / jaxlib 0.10.2 on x86-64. No spb2_jax import: plain ``jax.numpy``.

Root cause. XLA:CPU hands fusions to YNNPACK (``kind=kCustom``, ``"fusion_config":{"kind":"__ynn_fusion"}``).
A dot alone becomes a one-op YNN fusion and its operands stay materialised buffers, which is correct. When the dot
shares a fusion with a ``reduce`` (a reduce consuming the dot, or feeding it, or both feeding one add), the fusion
pass also pulls the dot's producers into the YNN graph, including a ``broadcast`` of a rank-0 value
(``dimensions={}``). YNNPACK then evaluates ``dot(X, broadcast(s))`` wrong: the optimized HLO is right and
equals the eager result, but the values read back are garbage (up to 1e38, inf, nan) that change from run to run:
uninitialised memory. ``f`` below compiles to (metadata dropped)::

    %fused_computation (param_0.2: f32[64,64], param_1.4: f32[1]) -> f32[64] {
      %bitcast.1 = f32[] bitcast(%param_1.4)
      %broadcast_in_dim.0 = f32[64,64]{1,0} broadcast(%bitcast.1), dimensions={}
      %dot_general.0 = f32[64,64]{1,0} dot(%param_0.2, %broadcast_in_dim.0), lhs_contracting_dims={1},
                                           rhs_contracting_dims={0}
      ROOT %reduce_sum.0 = f32[64]{0} reduce(%dot_general.0, %constant.0), dimensions={1}, to_apply=%region_0.1
    }
    ROOT %ynn_fusion = f32[64]{0} fusion(%x.1, %s.1), kind=kCustom, calls=%fused_computation,
                                  backend_config={"fusion_config":{"kind":"__ynn_fusion"}, ...}

Evidence (one process per experiment, since XLA reads ``XLA_FLAGS`` once):
- with ``--xla_cpu_experimental_ynn_fusion_type=`` (no YNN fusions) the result is exact;
- ``=-reduce`` is exact too: the reduce leaves the fusion, the broadcast is materialised outside, and the dot
  becomes a one-op YNN fusion again; ``=dot`` and ``=reduce`` alone both still form the bad fusion;
- only a RANK-0 broadcast on the RIGHT is wrong: ``broadcast(s) @ X``, a row or a column broadcast as the right
  operand, and a scalar broadcast into elementwise ops of the same fusion are all exact;
- sizes: wrong from M = 64 output rows and N = 64 output columns with K >= 2 (``[48, 64] @ [64, 64]``,
  ``[64, 64] @ [64, 63]`` and ``[64, 1] @ [1, 64]`` are exact);
- the dot's precision (``DEFAULT`` or ``HIGHEST``) and the broadcast value (a constant such as 0, or a runtime
  scalar) do not matter.

Where the library met it: ``chunk_gla`` without ``initial_state`` and with a single chunk (T <= chunk_size).
The scan is then inlined, the zero initial state is ``broadcast(0)``, and the intra-chunk output
``q_in @ S + P @ v`` (``P`` = a multiply + reduce over the ``[C, C, K]`` decay tensor) put ``dot(q_in,
broadcast(0))`` into one YNN fusion with that reduce. ``spb2_jax/ops/gla_chunked.py`` now computes both terms
as one dot ``[q_in | P] @ [S; v]``: XLA turns ``concatenate(broadcast(0), v)`` into a ``pad`` that it
materialises outside the YNN fusion. ``tests/test_xla_cpu_miscompile.py`` checks that the library's GLA is
right with YNN fusions on and runs this reproducer to show that XLA still miscompiles the pattern.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

N = 64
FLAG = "--xla_cpu_experimental_ynn_fusion_type="  # an empty list: no YNN fusions


def f(x, s):
    """``sum_j (x @ broadcast(s))[i, j]``: [N, N], [1] -> [N]; exactly ``N * s * sum_k x[i, k]``."""
    import jax.numpy as jnp
    return jnp.sum(x @ jnp.broadcast_to(s[0], (N, N)), axis=-1)


def scalar_broadcast_dots(hlo: str) -> list[str]:
    """The dots inside ``__ynn_fusion`` computations of optimized HLO text (``compiled.as_text()``) that take a
    rank-0 broadcast (through bitcasts / copies / transposes / reshapes) as an operand: the miscompiled pattern."""
    bodies: dict[str, list[str]] = {}
    name = None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%([\w.\-]+) \(", line)
        if head:
            name = head.group(1)
            bodies[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            bodies[name].append(line)
    ynn = {m.group(1) for lines in bodies.values() for line in lines if '"__ynn_fusion"' in line
           for m in [re.search(r"calls=%([\w.\-]+)", line)] if m}
    found = []
    for comp in sorted(ynn):
        defs = {}  # instruction -> (opcode, operand names, attributes)
        for line in bodies[comp]:
            m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = \S+ ([\w\-]+)\(([^)]*)\)(.*)", line)
            if m:
                defs[m.group(1)] = (m.group(2), [a.strip().lstrip("%") for a in m.group(3).split(",")], m.group(4))

        def scalar_broadcast(x: str) -> bool:
            op, args, attrs = defs.get(x, ("", [], ""))
            if op == "broadcast":
                return "dimensions={}" in attrs
            return op in ("bitcast", "copy", "transpose", "reshape") and scalar_broadcast(args[0])

        found += [f"{comp}: {x}" for x, (op, args, _) in defs.items()
                  if op == "dot" and any(scalar_broadcast(a) for a in args)]
    return found


def measure() -> dict:
    """In this process: max |jit(f) - eager f| over three calls relative to max |eager f| ("error"), and the
    miscompiled pattern in the compiled HLO ("pattern", see ``scalar_broadcast_dots``)."""
    import jax
    import numpy as np
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, N)).astype(np.float32)
    s = rng.standard_normal((1,)).astype(np.float32)
    eager = np.asarray(f(x, s), np.float64)  # op by op: the broadcast is a real buffer
    compiled = jax.jit(f).lower(x, s).compile()
    err = max(float(np.max(np.abs(np.asarray(compiled(x, s), np.float64) - eager))) for _ in range(3))
    err = err / float(np.max(np.abs(eager))) if np.isfinite(err) else float("inf")
    return {"error": err, "pattern": scalar_broadcast_dots(compiled.as_text())}


def run(xla_flags: str | None) -> dict:
    """``measure()`` in a fresh Python with ``XLA_FLAGS`` set to ``xla_flags`` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    out = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True,
                         timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"child failed with XLA_FLAGS={xla_flags!r}:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    if sys.argv[1:] == ["--child"]:
        print(json.dumps(measure()))
        return 0
    default, off = run(None), run(FLAG)
    for label, r in (("YNN fusions at XLA's default", default), (f"XLA_FLAGS={FLAG}", off)):
        print(f"{label}: max |jit - eager| / max |eager| = {r['error']:.3e}; "
              f"YNN-fused dots with a scalar-broadcast operand: {r['pattern'] or 'none'}")
    broken = not default["error"] <= 1e-5
    print("miscompiled: XLA:CPU's YNN fusion gets dot(x, broadcast(scalar)) wrong" if broken
          else "not reproduced: this XLA computes the pattern right")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
