"""Collective traffic read from compiled HLO text (``jax.jit(f).lower(*args).compile().as_text()``).

What a program sends between devices, counted statically from the text of the partitioned (per-device) module:
each collective instruction once, wherever it is (the entry computation, a loop body, the computation an
``async-start`` wraps; an instruction in a loop body is not multiplied by the trip count), with the bytes of its
RESULT shape on one device (a tuple result: the sum of its elements):

- ``all-gather``: the gathered array (P times the operand);
- ``all-reduce``, ``collective-permute``, ``all-to-all``: the same size as the operand;
- ``reduce-scatter``: the scattered result (the operand / P).

Asynchronous pairs are counted once: ``all-gather-start`` / ``all-reduce-start`` / ``collective-permute-start``
are skipped and the matching ``*-done`` (whose result is the collective's result) is counted; a collective
wrapped by ``async-start`` / ``async-done`` is counted as the instruction inside the wrapped computation.
"""

from __future__ import annotations

import dataclasses
import re

COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")

# bytes per element of the HLO primitive types (sub-byte types rounded up to one byte)
ELEMENT_BYTES = {
    "pred": 1, "s2": 1, "u2": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8,
    "c128": 16,
    "token": 0,
}

# "%name = TYPE opcode(" at the start of an instruction line (ROOT optional, "%" optional)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<rest>.*)$")
_ARRAY = re.compile(r"(?P<dtype>[a-z]+[0-9]*(?:e[0-9]+m[0-9]+\w*)?)\[(?P<dims>[^\]]*)\]")
_OPCODE = re.compile(r"^\s*(?P<opcode>[a-z][\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="(?P<op_name>[^"]*)"')


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled module.

    Attributes:
      kind: one of ``COLLECTIVES``.
      name: the instruction's name (of the ``*-done`` for an asynchronous pair).
      shapes: the result's arrays as ``(dtype, dims)`` (several for a tuple result).
      nbytes: bytes of the result on one device.
      op_name: the JAX operation it came from (``metadata={op_name=...}``; "" when the text has no metadata).
    """

    kind: str
    name: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    nbytes: int
    op_name: str = ""


def _split_type(rest: str) -> tuple[str, str]:
    """``"(f32[2], s32[]) all-reduce(...)"`` -> the type text and what follows it (balanced parentheses)."""
    rest = rest.lstrip()
    if not rest.startswith("("):
        end = rest.find(" ")
        return (rest, "") if end < 0 else (rest[:end], rest[end:])
    depth = 0
    for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return rest[:i + 1], rest[i + 1:]
    raise ValueError(f"unbalanced tuple type in HLO instruction: {rest[:200]!r}")


def parse_shapes(type_text: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The arrays of an HLO type: ``"(f32[1,4]{1,0}, s32[])"`` -> ``(("f32", (1, 4)), ("s32", ()))``.

    Dynamic dimensions (``<=8``) count at their bound."""
    out = []
    for m in _ARRAY.finditer(type_text):
        dims = tuple(int(d.strip().lstrip("<=")) for d in m["dims"].split(",") if d.strip())
        out.append((m["dtype"], dims))
    return tuple(out)


def element_bytes(dtype: str) -> int:
    """Bytes per element of an HLO primitive type (``f8e4m3fn`` and other 8-bit floats: 1)."""
    if dtype in ELEMENT_BYTES:
        return ELEMENT_BYTES[dtype]
    if dtype.startswith("f8") or dtype.startswith("f4") or dtype.startswith("f6"):
        return 1
    raise ValueError(f"unknown HLO element type {dtype!r}")


def shapes_bytes(shapes) -> int:
    total = 0
    for dtype, dims in shapes:
        n = 1
        for d in dims:
            n *= d
        total += n * element_bytes(dtype)
    return total


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective instruction of ``hlo_text`` (module docstring: what is counted), in text order."""
    out = []
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if m is None:
            continue
        type_text, after = _split_type(m["rest"])
        op = _OPCODE.match(after)
        if op is None:
            continue
        opcode = op["opcode"]
        kind = opcode[:-len("-done")] if opcode.endswith("-done") else opcode
        if kind not in COLLECTIVES:
            continue  # includes "*-start" (counted at its "*-done") and async-start / async-done wrappers
        shapes = parse_shapes(type_text)
        op_name = _OP_NAME.search(after)
        out.append(Collective(kind=kind, name=m["name"], shapes=shapes, nbytes=shapes_bytes(shapes),
                              op_name=op_name["op_name"] if op_name else ""))
    return out


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes per collective kind (every kind of ``COLLECTIVES`` a key, 0 when absent) of a compiled module."""
    totals = dict.fromkeys(COLLECTIVES, 0)
    for c in collectives(hlo_text):
        totals[c.kind] += c.nbytes
    return totals


def collective_counts(hlo_text: str) -> dict[str, int]:
    """Number of instructions per collective kind (every kind a key)."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for c in collectives(hlo_text):
        counts[c.kind] += 1
    return counts


def all_gather_shapes(hlo_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """The result arrays ``(dtype, dims)`` of every all-gather (one entry per array of a tuple result)."""
    return [s for c in collectives(hlo_text) if c.kind == "all-gather" for s in c.shapes]


def all_gathers(hlo_text: str) -> list[Collective]:
    """Every all-gather instruction (shapes, bytes and the JAX op it came from)."""
    return [c for c in collectives(hlo_text) if c.kind == "all-gather"]
