"""The bad-input table of the LSTM: fastbig.ops.lstm_cell (the fused pointwise gates), fastbig.ops.lstm
(the layer op, packed batch_sizes included) and the LSTM/LSTMCell modules against their torch.nn
twins, with wrong dtypes, devices, ranks, sizes, layouts, empty batches and sequences, NaN/inf and
integer inputs. What raises/works/meta mean: tests/_bad_input.py.
``python tests/test_bad_input_lstm.py`` prints the table.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import assert_close  # first: sets TRITON_INTERPRET=1 without a GPU

import fastbig  # noqa: E402
from fastbig.reference import lstm as ref_lstm  # noqa: E402

from _bad_input import ERRORS, R, Table, _twin_spec, check_dtype_mismatch_like_torch, print_table, run_row  # noqa: E402

TABLE = Table()
row = TABLE.row


# =====================================================================================
# lstm_cell
# =====================================================================================
def _cell(B=3, H=5, dtype=torch.float32):
    return R(B, 4 * H, dtype=dtype, scale=2.0), R(B, H, dtype=dtype)


def _cell_spec(g, c, check=True):
    def chk(res):
        h, cn = res
        hr, cr = ref_lstm.lstm_cell_pointwise(g.double(), c.double())
        if hr.isnan().any():
            assert torch.equal(h.isnan(), hr.isnan()) and torch.equal(cn.isnan(), cr.isnan()), "NaN pattern"
            return f"{int(hr.isnan().sum())} NaN in h, as the reference"
        return f"rel err {max(assert_close(h, hr, g.dtype), assert_close(cn, cr, g.dtype)):.1e}"
    return dict(call=lambda: fastbig.ops.lstm_cell(g, c), inputs=[g, c], check=chk if check else None)


@row("lstm_cell", "wrong dtype (complex64)", "raises", TypeError, r"gates.*floating.*complex64")
def cell_complex64_gates_raises_naming_gates():
    g, c = _cell()
    return _cell_spec(g.to(torch.complex64), c)


@row("lstm_cell", "mixed dtypes (c_prev float64)", "raises", TypeError, r"c_prev.*float64.*float32")
def cell_float64_c_prev_raises_naming_c_prev():
    g, c = _cell()
    return _cell_spec(g, c.double())


@row("lstm_cell", "wrong device (all meta)", "meta")
def cell_all_meta_gives_meta_result():
    g, c = _cell()
    return dict(_cell_spec(g.to("meta"), c.to("meta"), check=False), shape=(3, 5))


@row("lstm_cell", "mixed devices (c_prev on meta)", "raises", RuntimeError, r"c_prev.*meta")
def cell_c_prev_on_meta_raises():
    g, c = _cell()
    return _cell_spec(g, c.to("meta"))


@row("lstm_cell", "wrong rank (gates 1-D)", "raises", ValueError, r"gates.*2-D.*1-D")
def cell_1d_gates_raises_naming_rank():
    g, c = _cell()
    return _cell_spec(g[0], c)


@row("lstm_cell", "wrong sizes (gates not 4*H)", "raises", ValueError, r"gates.*multiple of 4")
def cell_gates_not_4h_raises():
    g, c = _cell()
    return _cell_spec(g[:, :-1], c)


@row("lstm_cell", "mismatched batch (c_prev batch 2 vs 3)", "raises", ValueError, r"c_prev.*shape")
def cell_c_prev_batch_2_vs_3_raises():
    g, c = _cell()
    return _cell_spec(g, c[:2])


@row("lstm_cell", "non-contiguous gates (every other column)", "works")
def cell_noncontiguous_gates_match_reference():
    g, c = _cell()
    g = torch.stack([g, g], -1)[..., 0]
    return _cell_spec(g, c.t().contiguous().t())


@row("lstm_cell", "expanded (stride 0) gates and c_prev", "works")
def cell_stride0_gates_and_c_prev_match_reference():
    g, c = _cell(B=1)
    return _cell_spec(g.expand(4, -1), c.expand(4, -1))


@row("lstm_cell", "empty batch (B=0)", "works")
def cell_empty_batch_matches_reference():
    g, c = _cell(B=0)
    return _cell_spec(g, c)


@row("lstm_cell", "NaN and inf in gates", "works")
def cell_nan_and_inf_gates_match_reference():
    g, c = _cell()
    g[0, 1] = float("nan")
    g[1, 0] = float("inf")    # i gate saturates to 1: finite, as torch
    g[2, 5 + 2] = -float("inf")  # f gate 0
    return _cell_spec(g, c)


@row("lstm_cell", "integer gates", "raises", TypeError, r"gates.*floating.*int64")
def cell_int64_gates_raises_naming_gates():
    g, c = _cell()
    return _cell_spec(g.long(), c)


# =====================================================================================
# lstm (layer op)
# =====================================================================================
def _layer(T=4, B=3, I=6, H=5, dtype=torch.float32):
    k = 1 / math.sqrt(H)
    return dict(x=R(T, B, I, dtype=dtype), h0=R(B, H, dtype=dtype), c0=R(B, H, dtype=dtype),
                w_ih=R(4 * H, I, dtype=dtype, scale=k), w_hh=R(4 * H, H, dtype=dtype, scale=k),
                b_ih=R(4 * H, dtype=dtype, scale=k), b_hh=R(4 * H, dtype=dtype, scale=k))


def _layer_spec(a, check=True, **kw):
    order = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh")

    def chk(res):
        y, h, c = res
        x = a["x"]
        x2 = x.reshape(-1, x.shape[-1]) if kw.get("batch_sizes") is None else x
        ry, rh, rc = ref_lstm.lstm_layer(x2.double(), *[a[n].double() for n in order[1:]], **kw)
        ry = ry.view(y.shape)
        if ry.isnan().any():
            assert torch.equal(y.isnan(), ry.isnan()), "NaN pattern"
            return f"{int(ry.isnan().sum())} NaN in y, as the reference"
        return f"rel err {max(assert_close(y, ry, x.dtype), assert_close(c, rc, x.dtype)):.1e}"
    return dict(call=lambda: fastbig.ops.lstm(*[a[n] for n in order], **kw), inputs=list(a.values()),
                check=chk if check else None)


@row("lstm", "integer x", "raises", TypeError, r"\bx\b.*floating.*int64")
def lstm_int64_x_raises_naming_x():
    a = _layer()
    a["x"] = a["x"].long()
    return _layer_spec(a, check=False)


@row("lstm", "mixed dtypes (h0 float64)", "raises", TypeError, r"h0.*float64")
def lstm_float64_h0_raises_naming_h0():
    a = _layer()
    a["h0"] = a["h0"].double()
    return _layer_spec(a, check=False)


@row("lstm", "wrong device (all meta)", "meta")
def lstm_all_meta_gives_meta_result():
    a = {n: t.to("meta") for n, t in _layer().items()}
    return dict(_layer_spec(a, check=False), shape=(4, 3, 5))


@row("lstm", "mixed devices (w_hh on meta)", "raises", RuntimeError, r"w_hh.*meta")
def lstm_w_hh_on_meta_raises():
    a = _layer()
    a["w_hh"] = a["w_hh"].to("meta")
    return _layer_spec(a, check=False)


@row("lstm", "wrong rank (x 2-D without batch_sizes)", "raises", ValueError, r"\bx\b.*3-D.*2-D")
def lstm_2d_x_without_batch_sizes_raises():
    a = _layer()
    a["x"] = a["x"][0]
    return _layer_spec(a, check=False)


@row("lstm", "wrong sizes (input_size 7 vs 6)", "raises", RuntimeError, r"input_size.*6.*7")
def lstm_input_size_7_vs_6_raises():
    a = _layer()
    a["x"] = R(4, 3, 7)
    return _layer_spec(a, check=False)


@row("lstm", "mismatched batch (h0 batch 2 vs 3)", "raises", ValueError, r"h0.*shape")
def lstm_h0_batch_2_vs_3_raises():
    a = _layer()
    a["h0"] = a["h0"][:2]
    return _layer_spec(a, check=False)


@row("lstm", "bad batch_sizes (increasing)", "raises", ValueError, r"batch_sizes")
def lstm_increasing_batch_sizes_raises():
    a = _layer()
    a["x"] = R(6, 6)
    return _layer_spec(a, check=False, batch_sizes=torch.tensor([1, 2, 3]))


@row("lstm", "non-contiguous x and weights", "works")
def lstm_noncontiguous_x_and_weights_match_reference():
    a = _layer()
    a["x"] = a["x"].transpose(0, 1).contiguous().transpose(0, 1)
    a["w_ih"] = a["w_ih"].t().contiguous().t()
    a["b_ih"] = torch.stack([a["b_ih"], a["b_ih"]], -1)[:, 0]
    return _layer_spec(a)


@row("lstm", "expanded (stride 0) x over the batch", "works")
def lstm_stride0_x_over_batch_matches_reference():
    a = _layer()
    a["x"] = a["x"][:, :1].expand(-1, 3, -1)
    return _layer_spec(a)


@row("lstm", "empty sequence (T=0)", "raises", ValueError, r"\bx\b.*non-empty")
def lstm_empty_sequence_raises():
    a = _layer(T=0)
    return _layer_spec(a, check=False)


@row("lstm", "NaN in x at one step", "works")
def lstm_nan_in_x_matches_reference_nan_pattern():
    a = _layer()
    a["x"][2, 1, 0] = float("nan")
    return _layer_spec(a)


# =====================================================================================
# LSTM and LSTMCell: each against its torch.nn twin
# =====================================================================================
def _lstm_mod(**kw):
    torch.manual_seed(3)
    return fastbig.nn.LSTM(6, 5, **kw), nn.LSTM(6, 5, **kw)


@row("LSTM", "float64 input into a float32 module", "raises", ERRORS, r"input dtype \(torch.float64\)")
def nn_lstm_float64_input_raises():
    f, t = _lstm_mod()
    return _twin_spec(f, t, (R(4, 2, 6).double(),), pick=lambda o: o[0], check=False)


@row("LSTM", "integer input", "raises", ERRORS, r"input dtype \(torch.int64\)")
def nn_lstm_int64_input_raises():
    f, t = _lstm_mod()
    return _twin_spec(f, t, (R(4, 2, 6).long(),), pick=lambda o: o[0], check=False)


@row("LSTM", "wrong rank (4-D input)", "raises", ValueError, r"2D or 3D")
def nn_lstm_4d_input_raises():
    f, t = _lstm_mod()
    return _twin_spec(f, t, (R(1, 4, 2, 6),), pick=lambda o: o[0], check=False)


@row("LSTM", "wrong input_size (7 vs 6)", "raises", RuntimeError, r"input_size")
def nn_lstm_input_size_7_vs_6_raises():
    f, t = _lstm_mod()
    return _twin_spec(f, t, (R(4, 2, 7),), pick=lambda o: o[0], check=False)


@row("LSTM", "h_0 batch mismatch", "raises", RuntimeError, r"hidden")
def nn_lstm_h0_batch_mismatch_raises():
    f, t = _lstm_mod()
    return _twin_spec(f, t, (R(4, 2, 6), (R(1, 3, 5), R(1, 3, 5))), pick=lambda o: o[0], check=False)


@row("LSTM", "meta input (module on cpu)", "raises", RuntimeError, None)
def nn_lstm_meta_input_raises():
    f, t = _lstm_mod()
    return _twin_spec(f, t, (R(4, 2, 6, device="meta"),), pick=lambda o: o[0], check=False)


@row("LSTM", "non-contiguous batch_first input, 2 layers, bidirectional", "works")
def nn_lstm_noncontiguous_2_layer_bidirectional_matches_torch():
    f, t = _lstm_mod(batch_first=True, num_layers=2, bidirectional=True)
    return _twin_spec(f, t, (R(4, 3, 6).transpose(0, 1),), pick=lambda o: o[0])


@row("LSTM", "expanded (stride 0) input over the batch", "works")
def nn_lstm_stride0_input_over_batch_matches_torch():
    f, t = _lstm_mod()
    return _twin_spec(f, t, (R(4, 1, 6).expand(-1, 3, -1),), pick=lambda o: o[0])


@row("LSTM", "empty batch (B=0)", "works")
def nn_lstm_empty_batch_matches_torch():
    f, t = _lstm_mod()
    return _twin_spec(f, t, (R(4, 0, 6),), pick=lambda o: o[0])


@row("LSTM", "empty sequence (T=0): torch's RuntimeError", "raises", RuntimeError, r"sequence length")
def nn_lstm_empty_sequence_raises_as_torch():
    f, t = _lstm_mod()
    with pytest.raises(RuntimeError, match="sequence length"):
        t(R(0, 2, 6))
    return _twin_spec(f, t, (R(0, 2, 6),), pick=lambda o: o[0], check=False)


@row("LSTM", "NaN in the input", "works")
def nn_lstm_nan_input_matches_torch_nan_pattern():
    f, t = _lstm_mod()
    x = R(4, 2, 6)
    x[1, 0, 2] = float("nan")
    return _twin_spec(f, t, (x,), pick=lambda o: o[0])


def _cell_mod():
    torch.manual_seed(4)
    return fastbig.nn.LSTMCell(6, 5), nn.LSTMCell(6, 5)


@row("LSTMCell", "float64 input into a float32 module", "raises", (RuntimeError, TypeError), r"input.*float64")
def nn_cell_float64_input_raises():
    f, t = _cell_mod()
    return _twin_spec(f, t, (R(3, 6).double(),), pick=lambda o: o[0], check=False)


@row("LSTMCell", "integer input", "raises", (RuntimeError, TypeError), r"input")
def nn_cell_int64_input_raises():
    f, t = _cell_mod()
    return _twin_spec(f, t, (R(3, 6).long(),), pick=lambda o: o[0], check=False)


@row("LSTMCell", "wrong rank (3-D)", "raises", ValueError, r"1D or 2D")
def nn_cell_3d_input_raises():
    f, t = _cell_mod()
    return _twin_spec(f, t, (R(1, 3, 6),), pick=lambda o: o[0], check=False)


@row("LSTMCell", "hx batch mismatch", "raises", RuntimeError, r"batch size")
def nn_cell_hx_batch_mismatch_raises():
    f, t = _cell_mod()
    return _twin_spec(f, t, (R(3, 6), (R(2, 5), R(2, 5))), pick=lambda o: o[0], check=False)


@row("LSTMCell", "meta input", "raises", RuntimeError, r"meta")
def nn_cell_meta_input_raises():
    f, t = _cell_mod()
    return _twin_spec(f, t, (R(3, 6, device="meta"),), pick=lambda o: o[0], check=False)


@row("LSTMCell", "2-D hx for a 1-D input: torch's RuntimeError", "raises", RuntimeError, r"hx\[0\].*1D.*2D")
def nn_cell_2d_hx_for_1d_input_raises_as_torch():
    f, t = _cell_mod()
    with pytest.raises(RuntimeError):
        t(R(6), (R(1, 5), R(1, 5)))
    return _twin_spec(f, t, (R(6), (R(1, 5), R(1, 5))), pick=lambda o: o[0], check=False)


@row("LSTMCell", "non-contiguous input and hx", "works")
def nn_cell_noncontiguous_input_and_hx_match_torch():
    f, t = _cell_mod()
    return _twin_spec(f, t, (R(6, 3).t(), (R(5, 3).t(), R(5, 3).t())), pick=lambda o: o[0])


@row("LSTMCell", "empty batch", "works")
def nn_cell_empty_batch_matches_torch():
    f, t = _cell_mod()
    return _twin_spec(f, t, (R(0, 6),), pick=lambda o: o[0])


@row("LSTMCell", "NaN in hx", "works")
def nn_cell_nan_in_hx_matches_torch_nan_pattern():
    f, t = _cell_mod()
    h = R(3, 5)
    h[1, 1] = float("nan")
    return _twin_spec(f, t, (R(3, 6), (h, R(3, 5))), pick=lambda o: o[1])


# =====================================================================================
# the table as tests
# =====================================================================================
@pytest.mark.parametrize("r", TABLE.params())
def test_bad_input_table(r):
    run_row(r)


# =====================================================================================
# behaviours the table cannot express
# =====================================================================================
def test_ops_reject_wrong_python_types():
    with pytest.raises(TypeError, match=r"gates.*torch.Tensor"):
        fastbig.ops.lstm_cell([[1.0] * 8], torch.zeros(1, 2))


@pytest.mark.parametrize("make", [
    lambda: (fastbig.nn.LSTMCell(5, 6), nn.LSTMCell(5, 6), (torch.randn(3, 5, dtype=torch.float64),)),
], ids=["LSTMCell"])
def test_dtype_mismatch_raises_what_torch_raises_too(make):
    check_dtype_mismatch_like_torch(*make())


if __name__ == "__main__":  # print the table
    print_table(TABLE.rows)
