"""The registry of fuzzed ops and the replay of one case: ``OpSpec``, ``register``, ``OPS``,
``case_params``, ``run_case``, ``seeds``."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import torch

from conftest import rel_err, tol

from ._common import Check


def _always() -> Tuple[bool, str]:
    return True, ""


@dataclass
class OpSpec:
    name: str
    gen: Callable[[random.Random], dict]
    run: Callable[[dict, int], List[Check]]
    default_count: int
    # (ok, why not): whether this machine can run the op's path at all (the Triton interpreter)
    available: Callable[[], Tuple[bool, str]] = _always
    note: str = ""
    extra: Dict = field(default_factory=dict)


OPS: Dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    OPS[spec.name] = spec
    return spec


# ---- replay ----------------------------------------------------------------------------------
def case_params(op: str, seed: int) -> dict:
    return OPS[op].gen(random.Random(seed))


def run_case(op: str, seed: int):
    """Returns (params, [(name, err, bound)]); raises what the op raises."""
    p = case_params(op, seed)
    results = []
    for name, out, ref, dtype, tf32 in OPS[op].run(p, seed):
        if out is None and ref is None:
            continue
        if out is None or ref is None:  # autograd's None is a zero gradient (an unused input)
            out = torch.zeros_like(ref) if out is None else out
            ref = torch.zeros_like(out, dtype=torch.float64) if ref is None else ref
        results.append((name, rel_err(out, ref), tol(dtype, tf32=tf32)))
    return p, results


def seeds(op: str, count: int, base: int = 0):
    """The seeds of the first ``count`` cases of ``op`` (distinct per op)."""
    salt = sum(ord(ch) * 131 ** i for i, ch in enumerate(op)) % 1_000_003
    return [base * 10_000_019 + salt * 100_003 + i for i in range(count)]
