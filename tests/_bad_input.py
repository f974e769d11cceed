"""The bad-input tables' machinery: every public op and module against wrong dtypes, devices,
ranks, sizes, layouts, empty tensors, NaN/inf, integer tensors and masks, and sizes past a
kernel's limits. Each op group has its own table in tests/test_bad_input_<op>.py; adding an op
means adding one such file (a ``Table``, its rows, ``test_bad_input_table`` and the script mode).

Each row says what must happen:
- ``raises``: that exception type (ValueError/TypeError/RuntimeError), with a message that names
  the argument (a regex over the message), never a crash; the caller's tensors unmodified;
- ``works``: the right answer (vs the float64 oracle or the torch.nn twin, conftest bounds);
- ``meta``: a "meta" tensor is a device the op cannot compute on; it must either say so clearly
  (an exception naming the device) or propagate shapes (a meta result of the right shape).

``python tests/test_bad_input_<op>.py`` prints that file's table with what each row actually did.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch

from conftest import assert_close  # first: sets TRITON_INTERPRET=1 without a GPU

from fastbig.backends import FastbigFallbackWarning  # noqa: E402

ERRORS = (ValueError, TypeError, RuntimeError)


@dataclass
class Row:
    op: str
    case: str
    build: Callable[[], dict]   # -> dict(call=..., inputs=[tensors], check=fn(result) | None)
    expect: str                 # "raises" | "works" | "meta"
    exc: tuple = ERRORS
    match: Optional[str] = None  # regex the message must contain (the argument's name, ...)

    @property
    def id(self):
        return f"{self.op}: {self.case}"


class Table:
    """One test file's rows. ``@table.row(op, case, expect, exc, match)`` registers a builder (its
    case text is the test id's); ``table.params()`` gives them to ``pytest.mark.parametrize``.

    ``known_bugs``: rows that still fail because of a reported, unfixed bug (/tmp/bugs/<op>.md):
    id -> reason. Strict: when the bug is fixed the row XPASSes, which fails, so the entry goes."""

    def __init__(self, known_bugs: Optional[dict] = None):
        self.rows: list[Row] = []
        self.known_bugs = dict(known_bugs or {})

    def row(self, op, case, expect, exc=ERRORS, match=None):
        def deco(fn):
            self.rows.append(Row(op, case, fn, expect, exc if isinstance(exc, tuple) else (exc,), match))
            return fn
        return deco

    def params(self):
        out = []
        for r in self.rows:
            marks = [pytest.mark.xfail(strict=True, reason=self.known_bugs[r.id])] if r.id in self.known_bugs else []
            out.append(pytest.param(r, id=r.id, marks=marks))
        return out


def R(*shape, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


def _snap(ts):
    return [t.detach().clone() for t in ts if isinstance(t, torch.Tensor) and t.device.type != "meta"]


def _same(a, b):
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(
            torch.nan_to_num(a, 0.0, 1.0, -1.0), torch.nan_to_num(b, 0.0, 1.0, -1.0))
    return torch.equal(a, b)


def run_row(r: Row):
    """Returns (outcome, detail): outcome 'raised <Type>' or 'works' or 'meta'; raises
    AssertionError when the row's expectation is not met."""
    spec = r.build()
    inputs = [t for t in spec.get("inputs", []) if isinstance(t, torch.Tensor)]
    before = _snap(inputs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FastbigFallbackWarning)
            res = spec["call"]()
    except Exception as e:  # noqa: BLE001 - the table records what was raised
        after = _snap(inputs)
        assert all(_same(b, a) for b, a in zip(before, after)), f"{r.op}/{r.case}: raised AND modified an input"
        outcome = f"raised {type(e).__name__}"
        msg = str(e).split("\n")[0][:160]
        if r.expect == "raises" or (r.expect == "meta" and "meta" in str(e).lower()):
            assert isinstance(e, r.exc), f"{r.op}/{r.case}: raised {type(e).__name__}, expected {r.exc}: {e}"
            if r.match:
                assert re.search(r.match, str(e)), f"{r.op}/{r.case}: message {str(e)!r} does not match {r.match!r}"
            return outcome, msg
        raise AssertionError(f"{r.op}/{r.case}: expected {r.expect}, raised {type(e).__name__}: {e}") from e
    after = _snap(inputs)
    assert all(_same(b, a) for b, a in zip(before, after)), f"{r.op}/{r.case}: modified a caller's tensor"
    if r.expect == "raises":
        raise AssertionError(f"{r.op}/{r.case}: expected {r.exc} naming {r.match!r}, but it returned")
    if r.expect == "meta":
        outs = res if isinstance(res, (tuple, list)) else (res,)
        t = [o for o in outs if isinstance(o, torch.Tensor)][0]
        assert t.device.type == "meta", f"{r.op}/{r.case}: meta input gave a {t.device} result"
        if spec.get("shape") is not None:
            assert tuple(t.shape) == tuple(spec["shape"]), f"{r.op}/{r.case}: meta shape {tuple(t.shape)}"
        return "meta result", f"shape {tuple(t.shape)}"
    detail = ""
    if spec.get("check") is not None:
        detail = spec["check"](res) or ""
    return "works", detail


def print_table(rows):
    """Script mode: every row with what it actually did (never stops at a failing row)."""
    width = max(len(r.id) for r in rows)
    for r in rows:
        try:
            outcome, detail = run_row(r)
            status = "ok  "
        except Exception as e:  # noqa: BLE001
            outcome, detail, status = "FAIL", f"{type(e).__name__}: {str(e)[:200]}", "FAIL"
        print(f"{status} {r.id:<{width}}  expect {r.expect:<7} -> {outcome}: {detail}")


# =====================================================================================
# modules: each against its torch.nn twin
# =====================================================================================
def _twin_spec(fmod, tmod, args, kwargs=None, pick=lambda o: o, check=True):
    kwargs = kwargs or {}
    tmod.load_state_dict(fmod.state_dict())

    def chk(res):
        out = pick(res)
        with torch.no_grad():
            r = pick(tmod(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                            for a in args], **kwargs)) if next(tmod.parameters()).dtype == torch.float64 else \
                pick(tmod(*args, **kwargs))
        if r.isnan().any():
            assert torch.equal(out.isnan(), r.isnan()), "NaN pattern differs from torch.nn"
            return f"{int(r.isnan().sum())} NaN, as torch.nn"
        return f"rel err vs torch.nn {assert_close(out, r, out.dtype, factor=1.0):.1e}"
    return dict(call=lambda: fmod(*args, **kwargs), inputs=[a for a in args if isinstance(a, torch.Tensor)],
                check=chk if check else None)


def check_dtype_mismatch_like_torch(fb, tm, args):
    """A drop-in's dtype error is catchable as torch.nn's (RuntimeError) and as fastbig's TypeError."""
    with pytest.raises(Exception) as torch_err:
        tm(*args)
    with pytest.raises(TypeError, match="dtype") as fb_err:
        fb(*args)
    assert isinstance(fb_err.value, type(torch_err.value)), (type(fb_err.value), type(torch_err.value))
