"""Collective traffic read from compiled HLO text (``jax.jit(f).lower(*args).compile().as_text()``).

What a program sends between devices, read from the text of the partitioned (per-device) module. Each
collective instruction (wherever it is: the entry computation, a loop body, the computation an ``async-start``
wraps) counts the bytes of its RESULT shape on one device (a tuple result: the sum of its elements):

- ``all-gather``: the gathered array (P times the operand);
- ``all-reduce``, ``collective-permute``, ``all-to-all``: the same size as the operand;
- ``reduce-scatter``: the scattered result (the operand / P).

Asynchronous pairs are counted once: ``all-gather-start`` / ``all-reduce-start`` / ``collective-permute-start``
are skipped and the matching ``*-done`` (whose result is the collective's result) is counted; a collective
wrapped by ``async-start`` / ``async-done`` is counted as the instruction inside the wrapped computation.

Per run or per instruction: ``Collective.executions`` is how often an instruction runs per execution of the
program: the product of the ``known_trip_count`` s of the ``while`` loops around it (XLA annotates loops whose
trip count it knows, e.g. ``lax.fori_loop`` / ``lax.scan`` with static bounds), or None inside a loop without
one. ``collective_bytes(text)`` counts per run (an unknown trip count counts as 1: check ``executions``);
``per_run=False`` counts each instruction once (the static view). Conditional branches count as if each ran.
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
# "[ENTRY] %name (params) -> type {": a computation's header
_COMPUTATION = re.compile(r"^(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_ARRAY = re.compile(r"(?P<dtype>[a-z]+[0-9]*(?:e[0-9]+m[0-9]+\w*)?)\[(?P<dims>[^\]]*)\]")
_OPCODE = re.compile(r"^\s*(?P<opcode>[a-z][\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="(?P<op_name>[^"]*)"')
_CALLEE = re.compile(r"\b(?P<attr>body|condition|calls|to_apply|true_computation|false_computation)"
                     r"=%?(?P<name>[\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{(?P<names>[^}]*)\}")
_TRIP_COUNT = re.compile(r'known_trip_count"?\s*[:=]\s*\{\s*"?n"?\s*[:=]\s*"?(?P<n>\d+)')


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled module.

    Attributes:
      kind: one of ``COLLECTIVES``.
      name: the instruction's name (of the ``*-done`` for an asynchronous pair).
      shapes: the result's arrays as ``(dtype, dims)`` (several for a tuple result).
      nbytes: bytes of the result on one device (one execution).
      op_name: the JAX operation it came from (``metadata={op_name=...}``; "" when the text has no metadata).
      executions: how often it runs per run of the program (module docstring); None inside a loop of unknown
        trip count.
    """

    kind: str
    name: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    nbytes: int
    op_name: str = ""
    executions: int | None = 1


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


@dataclasses.dataclass
class _Instruction:
    computation: str
    name: str
    type_text: str
    after: str  # opcode, operands and attributes


def _instructions(hlo_text: str) -> tuple[list[_Instruction], list[str], str | None]:
    """Every instruction with its computation; the computations in text order; the entry computation."""
    out, order, entry, current = [], [], None, ""
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header is not None and not line.startswith((" ", "\t")):
            current = header["name"]
            order.append(current)
            if header["entry"]:
                entry = current
            continue
        m = _INSTRUCTION.match(line)
        if m is None:
            continue
        type_text, after = _split_type(m["rest"])
        out.append(_Instruction(current, m["name"], type_text, after))
    return out, order, entry


def _executions(instructions: list[_Instruction], order: list[str], entry: str | None) -> dict[str, int | None]:
    """Runs per program run of every computation reachable from the entry (None: under an unknown loop)."""
    calls: dict[str, list[tuple[str, int | None]]] = {}  # callee -> [(caller, factor)]
    for ins in instructions:
        op = _OPCODE.match(ins.after)
        if op is not None and op["opcode"] in ("async-update", "async-done"):
            continue  # they name the computation their async-start runs; it runs once
        trip = _TRIP_COUNT.search(ins.after)
        for m in _CALLEE.finditer(ins.after):
            if m["attr"] == "body":
                factor = int(trip["n"]) if trip else None
            elif m["attr"] == "condition":
                factor = int(trip["n"]) + 1 if trip else None
            else:
                factor = 1
            calls.setdefault(m["name"], []).append((ins.computation, factor))
        branches = _BRANCHES.search(ins.after)
        if branches:
            for name in branches["names"].split(","):
                calls.setdefault(name.strip().lstrip("%"), []).append((ins.computation, 1))
    runs: dict[str, int | None] = {}
    if entry is None:  # a fragment without ENTRY: every computation once
        return dict.fromkeys(order, 1)
    runs[entry] = 1
    for comp in reversed(order):  # callees are defined before their callers: callers come first here
        if comp == entry:
            continue
        total: int | None = 0
        for caller, factor in calls.get(comp, []):
            if caller not in runs:
                continue  # not reachable from the entry
            if runs[caller] is None or factor is None:
                total = None
                break
            total += runs[caller] * factor
        if total != 0:
            runs[comp] = total
    return runs


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective instruction of ``hlo_text`` (module docstring: what is counted), in text order."""
    instructions, order, entry = _instructions(hlo_text)
    runs = _executions(instructions, order, entry)
    out = []
    for ins in instructions:
        op = _OPCODE.match(ins.after)
        if op is None:
            continue
        opcode = op["opcode"]
        kind = opcode[:-len("-done")] if opcode.endswith("-done") else opcode
        if kind not in COLLECTIVES:
            continue  # includes "*-start" (counted at its "*-done") and async-start / async-done wrappers
        shapes = parse_shapes(ins.type_text)
        op_name = _OP_NAME.search(ins.after)
        out.append(Collective(kind=kind, name=ins.name, shapes=shapes, nbytes=shapes_bytes(shapes),
                              op_name=op_name["op_name"] if op_name else "", executions=runs.get(ins.computation, 1)))
    return out


def _times(c: Collective, per_run: bool) -> int:
    return (c.executions or 1) if per_run else 1


def collective_bytes(hlo_text: str, per_run: bool = True) -> dict[str, int]:
    """Bytes per collective kind (every kind of ``COLLECTIVES`` a key, 0 when absent) of a compiled module, per run
    of the program (``per_run=False``: each instruction once)."""
    totals = dict.fromkeys(COLLECTIVES, 0)
    for c in collectives(hlo_text):
        totals[c.kind] += c.nbytes * _times(c, per_run)
    return totals


def collective_counts(hlo_text: str, per_run: bool = True) -> dict[str, int]:
    """Number of collectives per kind (every kind a key), per run of the program or (``per_run=False``) per
    instruction."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for c in collectives(hlo_text):
        counts[c.kind] += _times(c, per_run)
    return counts


def all_gather_shapes(hlo_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """The result arrays ``(dtype, dims)`` of every all-gather instruction (one entry per array of a tuple)."""
    return [s for c in collectives(hlo_text) if c.kind == "all-gather" for s in c.shapes]


def all_gathers(hlo_text: str) -> list[Collective]:
    """Every all-gather instruction (shapes, bytes, executions and the JAX op it came from)."""
    return [c for c in collectives(hlo_text) if c.kind == "all-gather"]
