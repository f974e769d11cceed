"""The Triton attention kernels' launchers and features (issues 15 and 18), under the interpreter
on CPU (a GPU when present), against the float64 reference.

Kept small: every interpreter program costs tens of milliseconds on the CI's 2 cores, so shapes
cross a few tiles (16 x 16 here) and features are combined in one case where they can be."""
import importlib

import pytest
import torch

import fastbig
from fastbig import backends
from fastbig.reference import attention as ref
from conftest import HAS_CUDA, assert_close, randn

DEV = "cuda" if HAS_CUDA else "cpu"
K = pytest.importorskip("fastbig.kernels.attention")
attn_ops = importlib.import_module("fastbig.ops.attention")


@pytest.fixture(autouse=True)
def _poison():
    old = K.POISON_OUTPUTS
    K.POISON_OUTPUTS = True
    yield
    K.POISON_OUTPUTS = old


def _f64(*ts):
    return [t.detach().double().cpu().requires_grad_(t.requires_grad) for t in ts]


# ---------------------------------------------------------------------------------------------
# Issue 18: GPU hazards
# ---------------------------------------------------------------------------------------------
class _Recorder:
    """Stands in for a kernel (or its autotuner): records the grid a launcher computes for the
    tile sizes the interpreter or any autotune config could pick, and runs nothing."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            for bm, bn in ((16, 16), (32, 32), (128, 64), (64, 128)):
                g = grid({"BLOCK_M": bm, "BLOCK_N": bn}) if callable(grid) else grid
                self.calls.append((self.name, tuple(g)))
        return launch


@pytest.fixture
def grids(monkeypatch):
    calls = []
    for name in ("_fwd_launch", "_dkdv_launch", "_dq_launch", "_dmask_launch",
                 "_attn_bwd_preprocess_kernel", "_dropout_mask_kernel"):
        monkeypatch.setattr(K, name, _Recorder(name, calls))
    return calls


def test_grid_function_puts_batch_heads_on_axis0():
    assert K._grid(70000, 17, "BLOCK_M")({"BLOCK_M": 16, "BLOCK_N": 64}) == (70000, 2)
    assert K._grid(3, 1000, "BLOCK_N")({"BLOCK_M": 16, "BLOCK_N": 64}) == (3, 16)


def test_launch_grids_past_65535_batch_heads(grids):
    # B*H = 70000 > 65535 (CUDA's cap on grid axes 1 and 2): every launcher must put it on axis 0.
    # The kernels are recorded, not run (70000 interpreter programs would take an hour).
    B, H, Hkv, S, D = 35000, 2, 1, 3, 16
    q = torch.randn(B, H, S, D)
    k = torch.randn(B, Hkv, S, D)
    mask = torch.randn(1, 1, S, S)
    out, lse = K.attention_forward(q, k, k, attn_mask=mask, scale=0.25)
    K.attention_backward(out, q, k, k, out, lse, attn_mask=mask, scale=0.25, mask_grad=True)
    K.dropout_mask(B, H, S, S, 0.1, 1, "cpu")
    names = {n for n, _ in grids}
    assert names == {"_fwd_launch", "_dkdv_launch", "_dq_launch", "_dmask_launch",
                     "_attn_bwd_preprocess_kernel", "_dropout_mask_kernel"}
    for name, g in grids:
        want = {"_dkdv_launch": B * Hkv, "_dmask_launch": 1}.get(name, B * H)  # mask [1, 1, S, S]
        assert g[0] == want, (name, g)
        assert all(x <= 65535 for x in g[1:]), (name, g)


def test_large_batch_heads_run(interpret_triton):
    # The (B*H, blocks) mapping run end to end at the largest B*H the interpreter affords here
    # (about 0.03 s per program on 2 cores); the > 65535 grid itself is checked above.
    B, H, Hkv, Sq, Sk, D = 8, 2, 1, 2, 3, 16
    q = randn(B, H, Sq, D, device=DEV, requires_grad=True)
    k = randn(B, Hkv, Sk, D, device=DEV, requires_grad=True)
    v = randn(B, Hkv, Sk, D, device=DEV, requires_grad=True)
    out = fastbig.ops.attention(q, k, v)
    do = torch.randn_like(out)
    g = torch.autograd.grad(out, (q, k, v), do)
    rq, rk, rv = _f64(q, k, v)
    rout = ref.attention(rq, rk, rv)
    rg = torch.autograd.grad(rout, (rq, rk, rv), do.double().cpu())
    assert_close(out, rout, tf32=HAS_CUDA)
    for a, b, n in zip(g, rg, "qkv"):
        assert_close(a, b, tf32=HAS_CUDA, name=f"d{n}")


def test_launchers_run_under_the_inputs_device(monkeypatch):
    import contextlib
    assert isinstance(K._on_device(torch.empty(1)), contextlib.nullcontext)  # CPU: a no-op
    seen = []

    def guard(t):
        seen.append(t.device)
        return contextlib.nullcontext()
    monkeypatch.setattr(K, "_on_device", guard)
    q = torch.randn(1, 1, 3, 16)
    out, lse = K.attention_forward(q, q, q, scale=0.25)
    assert seen == [q.device]
    K.attention_backward(out, q, q, q, out, lse, scale=0.25)
    K.dropout_mask(1, 1, 3, 3, 0.5, 1, "cpu")
    assert seen == [q.device] * 3


def test_autotune_key_is_coarse():
    # A decode loop (Sq = 1, cache growing to 100k keys) and a training run with any lengths
    # see at most three length classes each: a handful of tunings, not one per power of two.
    assert {K._len_class(n) for n in range(1, 100001)} == {16, 512, 4096}
    assert len({(K._len_class(1), K._len_class(sk)) for sk in range(1, 100001)}) == 3
    for c in {K._len_class(n) for n in range(1, 5000)}:
        assert c % 16 == 0 and c != 1  # one integer specialization for all
    assert "SQ_CLASS" in K._KEY and "SK_CLASS" in K._KEY
    assert not any("BUCKET" in k or k in ("SQ", "SK") for k in K._KEY)
    import inspect
    import triton
    if "cache_results" in inspect.signature(triton.autotune).parameters:  # 3.6 and 3.8 have it
        assert K._autotune_kwargs() == {"cache_results": True}


def _track_allocations(monkeypatch):
    sizes = []

    def wrap(owner, name):
        real = getattr(owner, name)

        def f(*a, **kw):
            t = real(*a, **kw)
            sizes.append(t.numel())
            return t
        monkeypatch.setattr(owner, name, f)
    for name in ("empty", "zeros", "full", "empty_like", "zeros_like"):
        wrap(torch, name)
    for name in ("new_empty", "new_zeros", "new_full"):
        wrap(torch.Tensor, name)
    return sizes


@pytest.mark.parametrize("mask_shape,requires_grad",
                         [((1, 1, 33, 40), False), ((2, 2, 33, 40), False), ((33, 40), True),
                          ((2, 1, 1, 40), True), ((1, 2, 33, 1), True), ((2, 1, 33, 40), True)])
def test_mask_grad_buffer(monkeypatch, interpret_triton, mask_shape, requires_grad):
    B, H, Sq, Sk, D = 2, 2, 33, 40, 16
    q = randn(B, H, Sq, D, device=DEV)
    k = randn(B, 1, Sk, D, device=DEV)
    v = randn(B, 1, Sk, D, device=DEV)
    mask = randn(*mask_shape, device=DEV)
    out, lse = K.attention_forward(q, k, v, attn_mask=mask, scale=0.25, window_left=9)
    do = randn(*out.shape, device=DEV)
    sizes = _track_allocations(monkeypatch)
    dq, dk, dv, dmask = K.attention_backward(do, q, k, v, out, lse, attn_mask=mask, scale=0.25,
                                             window_left=9, mask_grad=requires_grad)
    monkeypatch.undo()
    full = B * H * Sq * Sk
    assert max(sizes) < full, f"a {max(sizes)}-element buffer (full [B, H, Sq, Sk] = {full})"
    if not requires_grad:
        assert dmask is None
        return
    assert dmask.shape == mask.shape and dmask.dtype == torch.float32
    rq, rk, rv, rm = (t.detach().double().cpu().requires_grad_() for t in (q, k, v, mask))
    rout = ref.attention(rq, rk, rv, attn_mask=rm, window=(9, None), scale=0.25)
    rg = torch.autograd.grad(rout, (rq, rk, rv, rm), do.double().cpu())
    for a, b, n in zip((dq, dk, dv), rg, ("dq", "dk", "dv")):
        assert_close(a, b, torch.float32, tf32=HAS_CUDA, name=n)
    if mask.shape[-1] == 1:  # a per-row constant does not change the softmax: its gradient is 0
        assert torch.isfinite(dmask).all() and dmask.abs().max() < 1e-5 * rg[0].abs().max()
    else:
        assert_close(dmask, rg[3], torch.float32, tf32=HAS_CUDA, name="dmask")
