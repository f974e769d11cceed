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
                 "_attn_bwd_preprocess_kernel", "_dropout_mask_kernel", "_splitk_launch",
                 "_attn_splitk_merge_kernel"):
        monkeypatch.setattr(K, name, _Recorder(name, calls))
    return calls


def test_grid_function_puts_batch_heads_on_axis0():
    assert K._grid(70000, 17, "BLOCK_M")({"BLOCK_M": 16, "BLOCK_N": 64}) == (70000, 2)
    assert K._grid(3, 1000, "BLOCK_N")({"BLOCK_M": 16, "BLOCK_N": 64}) == (3, 16)


def test_launch_grids_past_65535_batch_heads(grids, monkeypatch):
    # B*H = 70000 > 65535 (CUDA's cap on grid axes 1 and 2): every launcher must put it on axis 0.
    # The kernels are recorded, not run (70000 interpreter programs would take an hour).
    B, H, Hkv, S, D = 35000, 2, 1, 3, 16
    q = torch.randn(B, H, S, D)
    k = torch.randn(B, Hkv, S, D)
    mask = torch.randn(1, 1, S, S)
    out, lse = K.attention_forward(q, k, k, attn_mask=mask, scale=0.25)
    K.attention_backward(out, q, k, k, out, lse, attn_mask=mask, scale=0.25, mask_grad=True)
    K.dropout_mask(B, H, S, S, 0.1, 1, "cpu")
    monkeypatch.setattr(K, "SPLITK_MIN_SK", 1)  # the split-K forward and its merge
    K.attention_forward(q, k, k, attn_mask=mask, scale=0.25)
    names = {n for n, _ in grids}
    assert names == {"_fwd_launch", "_dkdv_launch", "_dq_launch", "_dmask_launch",
                     "_attn_bwd_preprocess_kernel", "_dropout_mask_kernel", "_splitk_launch",
                     "_attn_splitk_merge_kernel"}
    for name, g in grids:
        # mask [1, 1, S, S]: its gradient has one (b, h) pair; split-K packs the GQA group's heads
        want = {"_dkdv_launch": B * Hkv, "_dmask_launch": 1, "_splitk_launch": B * Hkv}.get(name, B * H)
        assert g[0] == want, (name, g)
        assert all(x <= 65535 for x in g[1:]), (name, g)


def test_large_batch_heads_run(interpret_triton):
    # The (B*H, blocks) mapping run end to end at the largest B*H the interpreter affords here
    # (about 0.03 s per program on 2 cores); the > 65535 grid itself is checked above.
    B, H, Hkv, Sq, Sk, D = 4, 2, 1, 2, 3, 16
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
                         [((2, 2, 17, 40), False), ((17, 40), True), ((2, 1, 1, 40), True),
                          ((1, 2, 17, 1), True), ((2, 1, 17, 40), True)])
def test_mask_grad_buffer(monkeypatch, interpret_triton, mask_shape, requires_grad):
    B, H, Sq, Sk, D = 2, 2, 17, 40, 16
    q = randn(B, H, Sq, D, device=DEV)
    k = randn(B, 1, Sk, D, device=DEV)
    v = randn(B, 1, Sk, D, device=DEV)
    mask = randn(*mask_shape, device=DEV)
    out, lse = K.attention_forward(q, k, v, attn_mask=mask, scale=0.25, window_left=9)
    do = randn(*out.shape, device=DEV)
    sizes = _track_allocations(monkeypatch)
    dq, dk, dv, dmask, _ = K.attention_backward(do, q, k, v, out, lse, attn_mask=mask, scale=0.25,
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


# ---------------------------------------------------------------------------------------------
# Issue 15: softcap, sinks, ALiBi, bottom_right in the Triton forward and backward
# ---------------------------------------------------------------------------------------------
def _features(names, B, Hq, sink_dtype=torch.float32):
    kw = {}
    if "softcap" in names:
        kw["softcap"] = 1.5
    if "sinks" in names:
        kw["sinks"] = randn(Hq, dtype=sink_dtype, device=DEV, requires_grad=True)
    if "alibi" in names:
        kw["alibi_slopes"] = torch.rand(Hq, device=DEV) * 0.3
    if "alibi_b" in names:
        kw["alibi_slopes"] = torch.rand(B, Hq, device=DEV) * 0.3
    if "br" in names:
        kw["bottom_right"] = True
    return kw


def _to64(t):
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        return t.detach().double().cpu().requires_grad_(t.requires_grad)
    return t.cpu() if isinstance(t, torch.Tensor) else t


def _check(q, k, v, varlen=None, **kw):
    """fastbig.ops.attention(_varlen) on the Triton path against the float64 reference: out, lse
    (finite rows equal, -inf rows the same), and the gradient of every input that requires one
    (q, k, v, sinks, an additive mask)."""
    if varlen is None:
        out, lse = fastbig.ops.attention(q, k, v, return_lse=True, **kw)
    else:
        out, lse = fastbig.ops.attention_varlen(q, k, v, *varlen, return_lse=True, **kw)
    named = [("q", q), ("k", k), ("v", v)] + [(n, t) for n, t in kw.items()
                                              if isinstance(t, torch.Tensor) and t.requires_grad]
    do = randn(*out.shape, dtype=out.dtype, device=out.device)
    grads = torch.autograd.grad(out, [t for _, t in named], do)
    rkw = {n: _to64(t) for n, t in kw.items()}
    rins = [_to64(q), _to64(k), _to64(v)]
    if varlen is None:
        rout, rlse = ref.attention(*rins, return_lse=True, **rkw)
    else:
        rout, rlse = ref.attention_varlen(*rins, varlen[0].cpu(), varlen[1].cpu(), return_lse=True,
                                          **rkw)
    rgrads = torch.autograd.grad(rout, rins + [rkw[n] for n, _ in named[3:]], do.double().cpu())
    dt = q.dtype
    assert_close(out, rout, dt, tf32=HAS_CUDA, name="out")
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse.cpu()), fin), "lse: -inf rows differ"
    assert_close(lse.cpu()[fin], rlse[fin], torch.float32 if dt != torch.float16 else dt,
                 tf32=HAS_CUDA, name="lse")
    for (n, t), g, rg in zip(named, grads, rgrads):  # a float16 sinks' gradient is float16
        gdt = t.dtype if t.dtype in (torch.float16, torch.bfloat16) else dt
        assert_close(g, rg, gdt, tf32=HAS_CUDA, name=f"d{n}")
    return out, lse, dict(zip([n for n, _ in named], grads))


def _qkv(B, Hq, Hkv, Sq, Sk, D=16, dtype=torch.float32):
    return (randn(B, Hq, Sq, D, dtype=dtype, device=DEV, requires_grad=True),
            randn(B, Hkv, Sk, D, dtype=dtype, device=DEV, requires_grad=True),
            randn(B, Hkv, Sk, D, dtype=dtype, device=DEV, requires_grad=True))


@pytest.fixture
def small_tiles(interpret_triton):
    """16 x 16 tiles: odd sizes cross several tiles at a small interpreter cost."""
    with K.interpreter_blocks(16, 16):
        yield


FEATURE_CASES = [  # (features, dtype, (B, Hq, Hkv, Sq, Sk), causal, window)
    (("softcap",), torch.float32, (1, 2, 1, 17, 70), False, None),
    (("sinks",), torch.float32, (1, 2, 1, 17, 70), False, None),
    (("alibi",), torch.float32, (1, 2, 1, 17, 70), False, None),
    (("br",), torch.float32, (1, 2, 1, 17, 70), True, None),        # causal on the shifted diagonal
    (("br",), torch.float32, (1, 2, 1, 33, 17), False, (5, 3)),     # Sq > Sk: negative shift
    (("softcap", "sinks", "alibi", "br"), torch.float32, (1, 4, 2, 17, 70), True, (9, None)),
    (("softcap", "sinks", "alibi_b", "br"), torch.float32, (2, 2, 1, 1, 70), False, (6, 0)),
    (("softcap", "sinks", "alibi", "br"), torch.float32, (1, 2, 2, 17, 17), False, None),
    (("softcap", "sinks", "alibi", "br"), torch.float32, (1, 2, 1, 1, 1), True, None),
    (("softcap", "sinks", "alibi", "br"), torch.float16, (1, 2, 1, 33, 70), True, None),
    (("sinks", "alibi_b"), torch.float16, (2, 2, 1, 17, 17), False, (4, 4)),
]


@pytest.mark.parametrize("names,dtype,shape,causal,window", FEATURE_CASES,
                         ids=["+".join(c[0]) + f"-{str(c[1])[6:]}-" + "x".join(map(str, c[2]))
                              + ("-causal" if c[3] else "") + (f"-w{c[4][0]}_{c[4][1]}" if c[4] else "")
                              for c in FEATURE_CASES])
def test_features_match_reference(small_tiles, names, dtype, shape, causal, window):
    B, Hq = shape[:2]
    _check(*_qkv(*shape, dtype=dtype), causal=causal, window=window, **_features(names, B, Hq))


def test_features_with_masks_and_padding(small_tiles):
    # an additive mask that requires grad (full shape: the dQ kernel writes dmask; [Sq, Sk]:
    # the reduction kernel), a bool mask, key padding, sinks in float16, everything on
    B, Hq, Hkv, Sq, Sk = 2, 2, 1, 17, 33
    kpm = torch.zeros(B, Sk, dtype=torch.bool, device=DEV)
    kpm[0, :5] = True
    kpm[1, 25:] = True
    for mask in (randn(B, Hq, Sq, Sk, device=DEV, requires_grad=True),
                 randn(Sq, Sk, device=DEV, requires_grad=True),
                 torch.rand(B, 1, Sq, Sk, device=DEV) > 0.3):
        kw = _features(("softcap", "sinks", "alibi", "br"), B, Hq, sink_dtype=torch.float16)
        _check(*_qkv(B, Hq, Hkv, Sq, Sk), attn_mask=mask, key_padding_mask=kpm, causal=True,
               window=(20, None), **kw)


def test_sinks_fully_masked_rows(small_tiles):
    # no key visible: out 0, every gradient 0, lse = the head's sink (the reference's too)
    B, Hq, Sq, Sk = 2, 2, 5, 20
    q, k, v = _qkv(B, Hq, 1, Sq, Sk)
    kpm = torch.zeros(B, Sk, dtype=torch.bool, device=DEV)
    kpm[1] = True
    sinks = randn(Hq, device=DEV, requires_grad=True)
    out, lse, g = _check(q, k, v, key_padding_mask=kpm, sinks=sinks, softcap=2.0)
    assert torch.all(out[1] == 0) and torch.equal(lse[1], sinks.detach()[:, None].expand(Hq, Sq))
    assert torch.all(g["q"][1] == 0) and torch.all(g["k"][1] == 0) and torch.all(g["v"][1] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_varlen_features(small_tiles, dtype):
    # bottom_right per sequence (Sk_b - Sq_b: positive, zero, negative), an empty-key sequence
    lens_q, lens_k = (1, 17, 20, 3, 4), (40, 17, 9, 0, 33)
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=DEV)
    Hq, Hkv, D = 2, 1, 16
    q = randn(int(cu_q[-1]), Hq, D, dtype=dtype, device=DEV, requires_grad=True)
    k = randn(int(cu_k[-1]), Hkv, D, dtype=dtype, device=DEV, requires_grad=True)
    v = randn(int(cu_k[-1]), Hkv, D, dtype=dtype, device=DEV, requires_grad=True)
    kw = _features(("softcap", "sinks", "alibi_b", "br"), len(lens_q), Hq)
    _check(q, k, v, varlen=(cu_q, cu_k, max(lens_q), max(lens_k)), causal=True, window=(12, None),
           **kw)


def test_features_take_the_triton_path(interpret_triton, monkeypatch):
    # no silent fallback: the four features reach the kernel; slopes that require grad do not
    calls = []
    real = K.attention_forward
    monkeypatch.setattr(K, "attention_forward", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    q, k, v = _qkv(1, 2, 1, 3, 5)
    kw = _features(("softcap", "sinks", "alibi", "br"), 1, 2)
    fastbig.ops.attention(q, k, v, causal=True, **kw)
    assert len(calls) == 1 and calls[0]["softcap"] == 1.5 and calls[0]["bottom_right"]
    ok, why = attn_ops._triton_ok(q, 16, 0.0, 3, 5, attn_ops._Features(
        "attention", q, 2, 1, None, None, torch.rand(2, requires_grad=True), False))
    assert not ok and "alibi_slopes" in why


# ---------------------------------------------------------------------------------------------
# Issue 15 item 4: split-K decoding forward (flash-decoding)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def splitk(small_tiles, monkeypatch):
    """Split-K for every Sq <= 16 here (the default needs Sk >= 1024), 3 splits of a few 16-key
    tiles each (some empty under the causal/window band), and a count of its launches."""
    monkeypatch.setattr(K, "SPLITK_MIN_SK", 1)
    monkeypatch.setattr(K, "SPLITK_NUM_SPLITS", 3)
    calls = []
    real = K._splitk_forward
    monkeypatch.setattr(K, "_splitk_forward", lambda *a, **kw: calls.append(a[5]) or real(*a, **kw))
    return calls


SPLITK_CASES = [  # (B, Hq, Hkv, Sq, Sk), features, causal, window, key padding, mask
    ((2, 4, 2, 1, 70), ("sinks", "alibi_b", "softcap"), False, None, True, False),
    ((1, 4, 1, 3, 45), ("softcap", "sinks", "alibi", "br"), True, (30, None), True, True),
    ((1, 2, 2, 16, 33), ("br",), True, None, False, True),
    ((2, 2, 1, 17, 70), (), False, None, False, False),  # Sq 17: not split-K
]


@pytest.mark.parametrize("shape,names,causal,window,pad,mask", SPLITK_CASES,
                         ids=["x".join(map(str, c[0])) + "-" + "+".join(c[1]) for c in SPLITK_CASES])
def test_splitk_matches_reference(splitk, shape, names, causal, window, pad, mask):
    B, Hq, Hkv, Sq, Sk = shape
    kw = _features(names, B, Hq)
    if pad:
        kpm = torch.zeros(B, Sk, dtype=torch.bool, device=DEV)
        kpm[0, 3:11] = True
        kpm[-1, -5:] = True
        kw["key_padding_mask"] = kpm
    if mask:
        kw["attn_mask"] = randn(1, Hq, Sq, Sk, device=DEV, requires_grad=True)
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk)
    out, lse, _ = _check(q, k, v, causal=causal, window=window, **kw)  # backward: normal kernels
    assert len(splitk) == (1 if Sq <= 16 else 0)
    if splitk:  # the GQA group's heads share one program when their rows fit
        assert splitk[0][0] == min(Hq // Hkv, 64 // Sq) and splitk[0][1] == 3
        # the normal forward gives the same out and lse
        K.SPLITK_MIN_SK = 10 ** 9
        out2, lse2 = fastbig.ops.attention(q, k, v, return_lse=True, causal=causal, window=window,
                                           **kw)
        assert_close(out, out2, tf32=HAS_CUDA, name="split-K vs normal out")
        assert_close(lse, lse2, tf32=HAS_CUDA, name="split-K vs normal lse")


def test_splitk_varlen_and_fp16(splitk):
    lens_q, lens_k = (1, 4, 2), (50, 0, 21)
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=DEV)
    Hq, Hkv, D = 4, 2, 16
    q = randn(int(cu_q[-1]), Hq, D, dtype=torch.float16, device=DEV, requires_grad=True)
    k = randn(int(cu_k[-1]), Hkv, D, dtype=torch.float16, device=DEV, requires_grad=True)
    v = randn(int(cu_k[-1]), Hkv, D, dtype=torch.float16, device=DEV, requires_grad=True)
    kw = _features(("softcap", "sinks", "alibi", "br"), len(lens_q), Hq)
    _check(q, k, v, varlen=(cu_q, cu_k, max(lens_q), max(lens_k)), causal=True, **kw)
    assert len(splitk) == 1


def test_splitk_plan(monkeypatch):
    # defaults: decode shapes only, splits filling about two waves of 132 SMs, >= 256 keys each
    assert K._splitk_plan(1, 32, 8, 1, 1023, torch.device("cpu")) is None
    assert K._splitk_plan(1, 32, 8, 17, 4096, torch.device("cpu")) is None
    assert K._splitk_plan(1, 32, 8, 1, 4096, torch.device("cpu"), dropout_p=0.1) is None
    hpp, splits, bm = K._splitk_plan(1, 32, 8, 1, 4096, torch.device("cpu"))
    assert (hpp, bm) == (4, 16) and splits == 16  # 8 programs x 16 splits; 4096 / 256 = 16
    hpp, splits, bm = K._splitk_plan(1, 32, 8, 1, 65536, torch.device("cpu"))
    assert splits == 33 and 8 * splits >= 2 * 132
    hpp, splits, bm = K._splitk_plan(64, 32, 32, 4, 8192, torch.device("cpu"))
    assert (hpp, splits, bm) == (1, 1, 16)  # 2048 programs fill the device already
    hpp, splits, bm = K._splitk_plan(2, 16, 2, 16, 2048, torch.device("cpu"))
    assert (hpp, bm) == (4, 64)  # 4 heads x 16 rows = 64 rows per program


def test_opcheck_with_features(small_tiles):
    # the custom op's schema, fake impl and autograd registration (dsinks) with every feature on
    # (torch.compile of the op is tests/test_attention.py::test_torch_compile_fullgraph)
    q, k, v = _qkv(1, 2, 1, 5, 7)
    sinks = randn(2, device=DEV, requires_grad=True)
    slopes = torch.rand(1, 2, device=DEV)
    args = (q, k, v, None, None, None, None, 5, 7, 0.3, 4, 0, 0.0, None, 1.5, sinks, slopes, True)
    torch.library.opcheck(torch.ops.fastbig.flash_attn.default, args)


def test_dropout_with_features_and_mask_grad(small_tiles):
    # dropout regenerated in every backward kernel, the mask-gradient reduction kernel included
    B, Hq, Sq, Sk, p = 1, 2, 17, 20, 0.25
    q, k, v = _qkv(B, Hq, 1, Sq, Sk)
    mask = randn(Sq, Sk, device=DEV, requires_grad=True)
    sinks = randn(Hq, device=DEV, requires_grad=True)
    kw = dict(attn_mask=mask, sinks=sinks, softcap=2.0, causal=True, bottom_right=True,
              alibi_slopes=torch.rand(Hq, device=DEV) * 0.3)
    torch.manual_seed(7)
    out = fastbig.ops.attention(q, k, v, dropout_p=p, **kw)
    torch.manual_seed(7)
    keep = attn_ops.dropout_mask(B, Hq, Sq, Sk, p, seed=int(attn_ops._new_seed()), device=DEV).cpu()
    do = randn(*out.shape, device=DEV)
    ins = (q, k, v, mask, sinks)
    g = torch.autograd.grad(out, ins, do)
    r = [_to64(t) for t in ins]
    rkw = dict(kw, attn_mask=r[3], sinks=r[4], alibi_slopes=_to64(kw["alibi_slopes"]))
    rout = ref.attention(*r[:3], dropout_p=p, dropout_keep=keep, **rkw)
    rg = torch.autograd.grad(rout, r, do.double().cpu())
    assert_close(out, rout, tf32=HAS_CUDA)
    for a, b, n in zip(g, rg, ("dq", "dk", "dv", "dmask", "dsinks")):
        assert_close(a, b, tf32=HAS_CUDA, name=n)
