"""The bad-input table of conv+BN+activation: fastbig.ops.conv_bn_act (conv and transposed conv,
training and eval, its running statistics), fastbig.ops.fold_bn and the ConvBnReLU2d,
ConvTransposeBnReLU2d, ConvBnLeakyReLU2d and ConvBn2d modules against their torch.nn twins, with
wrong dtypes, devices, ranks, channel counts, layouts (channels_last, stride 0), empty batches,
NaN and bad scalars (eps, negative_slope, output_padding, activation). What raises/works/meta
mean: tests/_bad_input.py. ``python tests/test_bad_input_conv_bn_relu.py`` prints the table.
"""
from __future__ import annotations


import pytest
import torch
from torch import nn

from conftest import assert_close  # first: sets TRITON_INTERPRET=1 without a GPU

import fastbig  # noqa: E402
from fastbig.reference import conv_bn_relu as ref_conv  # noqa: E402

from _bad_input import R, Table, _twin_spec, check_dtype_mismatch_like_torch, print_table, run_row  # noqa: E402

TABLE = Table()
row = TABLE.row


# =====================================================================================
# conv_bn_act
# =====================================================================================
def _conv(N=2, C=3, K=4, Hs=6, dtype=torch.float32):
    return dict(x=R(N, C, Hs, Hs, dtype=dtype), w=R(K, C, 3, 3, dtype=dtype, scale=0.3),
                bw=R(K, dtype=dtype).abs() + 0.5, bb=R(K, dtype=dtype), rm=R(K, dtype=dtype) * 0.1,
                rv=R(K, dtype=dtype).abs() + 0.5, nbt=torch.tensor(3))


def _conv_spec(a, check=True, training=True, **kw):
    def chk(y):
        rm, rv, nbt = a["rm"].clone(), a["rv"].clone(), a["nbt"].clone()
        ry, _ = ref_conv.conv_bn_act(a["x"].double(), a["w"].double(), None, a["bw"].double(), a["bb"].double(),
                                     rm.double(), rv.double(), nbt, training=training, padding=1, **kw)
        if ry.isnan().any():
            assert torch.equal(y.isnan(), ry.isnan()), "NaN pattern differs from the reference"
            return f"{int(ry.isnan().sum())} NaN, as the reference"
        return f"rel err {assert_close(y, ry, a['x'].dtype):.1e}"
    fixed = [a["x"], a["w"], a["bw"], a["bb"]]
    return dict(call=lambda: fastbig.ops.conv_bn_act(a["x"], a["w"], None, a["bw"], a["bb"], a["rm"].clone(),
                                                     a["rv"].clone(), a["nbt"].clone(), training=training,
                                                     padding=1, **kw),
                inputs=fixed, check=chk if check else None)


@row("conv_bn_act", "integer x", "raises", TypeError, r"\bx\b.*floating.*int64")
def conv_bn_act_int64_x_raises_naming_x():
    a = _conv()
    a["x"] = a["x"].long()
    return _conv_spec(a, check=False)


@row("conv_bn_act", "mixed dtypes (conv_weight float64)", "raises", TypeError, r"conv_weight.*float64")
def conv_bn_act_float64_conv_weight_raises():
    a = _conv()
    a["w"] = a["w"].double()
    return _conv_spec(a, check=False)


@row("conv_bn_act", "wrong device (all meta)", "meta")
def conv_bn_act_all_meta_gives_meta_result():
    a = {n: t.to("meta") for n, t in _conv().items()}
    return dict(_conv_spec(a, check=False), shape=(2, 4, 6, 6))


@row("conv_bn_act", "mixed devices (bn_weight on meta)", "raises", RuntimeError, r"bn_weight.*meta")
def conv_bn_act_bn_weight_on_meta_raises():
    a = _conv()
    a["bw"] = a["bw"].to("meta")
    return _conv_spec(a, check=False)


@row("conv_bn_act", "wrong rank (x 3-D)", "raises", ValueError, r"\bx\b.*4-D.*3-D")
def conv_bn_act_3d_x_raises_naming_rank():
    a = _conv()
    a["x"] = a["x"][0]
    return _conv_spec(a, check=False)


@row("conv_bn_act", "wrong sizes (x 5 channels, weight 3)", "raises", ValueError, r"\bx\b.*3 channels")
def conv_bn_act_x_5_channels_vs_weight_3_raises():
    a = _conv()
    a["x"] = R(2, 5, 6, 6)
    return _conv_spec(a, check=False)


@row("conv_bn_act", "bn_weight of the wrong length", "raises", ValueError, r"bn_weight.*\(4,\)")
def conv_bn_act_bn_weight_wrong_length_raises():
    a = _conv()
    a["bw"] = a["bw"][:3]
    return _conv_spec(a, check=False)


@row("conv_bn_act", "non-contiguous x (every other column)", "works")
def conv_bn_act_noncontiguous_x_matches_reference():
    a = _conv()
    a["x"] = torch.stack([a["x"], a["x"]], -1)[..., 0]
    return _conv_spec(a)


@row("conv_bn_act", "channels_last x", "works")
def conv_bn_act_channels_last_x_matches_reference():
    a = _conv()
    a["x"] = a["x"].contiguous(memory_format=torch.channels_last)
    return _conv_spec(a)


@row("conv_bn_act", "expanded (stride 0) x over channels", "works")
def conv_bn_act_stride0_x_over_channels_matches_reference():
    a = _conv()
    a["x"] = a["x"][:, :1].expand(-1, 3, -1, -1)
    return _conv_spec(a)


@row("conv_bn_act", "empty batch (N=0), training: empty output, stats kept, batch counted", "works")
def conv_bn_act_empty_batch_training_keeps_stats_counts_batch():
    a = _conv(N=0)
    rm, rv, nbt = a["rm"].clone(), a["rv"].clone(), a["nbt"].clone()

    def check(y):  # torch's batch_norm on an empty batch (and BatchNorm2d's count)
        assert y.shape == (0, 4, 6, 6)
        assert torch.equal(rm, a["rm"]) and torch.equal(rv, a["rv"]) and int(nbt) == int(a["nbt"]) + 1
        return "empty, running stats unchanged, num_batches_tracked + 1"
    return dict(call=lambda: fastbig.ops.conv_bn_act(a["x"], a["w"], None, a["bw"], a["bb"], rm, rv, nbt,
                                                     training=True, padding=1),
                inputs=[a["x"], a["w"], a["bw"], a["bb"]], check=check)


@row("conv_bn_act", "output_padding on a conv (not transposed)", "raises", ValueError, r"output_padding.*transposed")
def conv_bn_act_output_padding_without_transposed_raises():
    return _conv_spec(_conv(), check=False, output_padding=1)


@row("conv_bn_act", "output_padding >= stride, transposed, eval", "raises", RuntimeError,
     r"output_padding.*stride")
def conv_bn_act_transposed_output_padding_past_stride_raises():
    a = _conv()
    a["w"] = R(3, 4, 3, 3)  # ConvTranspose2d weight [in, out, kH, kW]
    return _conv_spec(a, check=False, training=False, transposed=True, output_padding=2)


@row("conv_bn_act", "eps=True (a bool)", "raises", ValueError, r"eps must be a number > 0.*True")
def conv_bn_act_bool_eps_raises():
    return _conv_spec(_conv(), check=False, eps=True)


@row("conv_bn_act", "negative_slope a string (relu)", "raises", TypeError, r"negative_slope.*str")
def conv_bn_act_string_negative_slope_raises():
    return _conv_spec(_conv(), check=False, negative_slope="0.1")


@row("conv_bn_act", "num_batches_tracked on meta", "raises", RuntimeError, r"num_batches_tracked.*meta")
def conv_bn_act_num_batches_tracked_on_meta_raises():
    a = _conv()
    a["nbt"] = a["nbt"].to("meta")
    return _conv_spec(a, check=False)


def _fold_spec(**over):
    a = _conv()
    args = dict(conv_weight=a["w"], conv_bias=None, bn_weight=a["bw"], bn_bias=a["bb"], running_mean=a["rm"],
                running_var=a["rv"], eps=1e-5)
    args.update(over)
    return dict(call=lambda: fastbig.ops.fold_bn(**args),
                inputs=[t for t in args.values() if isinstance(t, torch.Tensor)])


@row("fold_bn", "eps=0 (was a silent inf)", "raises", ValueError, r"eps")
def fold_bn_eps_0_raises():
    return _fold_spec(eps=0.0)


@row("fold_bn", "running_var None", "raises", TypeError, r"running_var")
def fold_bn_running_var_none_raises():
    return _fold_spec(running_var=None)


@row("fold_bn", "bn_weight of the wrong length", "raises", ValueError, r"bn_weight.*\(4,\)")
def fold_bn_bn_weight_wrong_length_raises():
    return _fold_spec(bn_weight=R(5))


@row("fold_bn", "integer conv_weight (was silently truncated)", "raises", TypeError, r"conv_weight.*floating")
def fold_bn_int64_conv_weight_raises():
    return _fold_spec(conv_weight=R(4, 3, 3, 3).mul(10).long())


@row("conv_bn_act", "empty batch (N=0), eval", "works")
def conv_bn_act_empty_batch_eval_matches_reference():
    a = _conv(N=0)
    return _conv_spec(a, training=False)


@row("conv_bn_act", "NaN in one pixel (training: the channel's stats go NaN)", "works")
def conv_bn_act_nan_pixel_training_matches_reference_nan_pattern():
    a = _conv()
    a["x"][1, 0, 2, 2] = float("nan")
    return _conv_spec(a)


@row("conv_bn_act", "bad activation name", "raises", ValueError, r"activation")
def conv_bn_act_bad_activation_name_raises():
    return _conv_spec(_conv(), check=False, activation="gelu")


# =====================================================================================
# ConvBnReLU2d, ConvTransposeBnReLU2d, ConvBnLeakyReLU2d, ConvBn2d: each against its torch.nn twin
# =====================================================================================
def _cbr(cls=None, transposed=False):
    torch.manual_seed(5)
    if transposed:
        f = fastbig.nn.ConvTransposeBnReLU2d(3, 4, 3, stride=2, padding=1)
        t = nn.Sequential(nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    else:
        f = (cls or fastbig.nn.ConvBnReLU2d)(3, 4, 3, padding=1)
        t = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    return f, t


@row("ConvBnReLU2d", "float64 input into a float32 module", "raises", (RuntimeError, TypeError), r"float64|Double")
def conv_bn_relu2d_float64_input_raises():
    f, t = _cbr()
    return _twin_spec(f, t, (R(2, 3, 6, 6).double(),), check=False)


@row("ConvBnReLU2d", "integer input", "raises", (RuntimeError, TypeError), r"\bx\b|Long|int64")
def conv_bn_relu2d_int64_input_raises():
    f, t = _cbr()
    return _twin_spec(f, t, (R(2, 3, 6, 6).long(),), check=False)


@row("ConvBnReLU2d", "wrong rank (3-D input)", "raises", (ValueError, RuntimeError), r"4-D|3-D")
def conv_bn_relu2d_3d_input_raises():
    f, t = _cbr()
    return _twin_spec(f, t, (R(3, 6, 6),), check=False)


@row("ConvBnReLU2d", "wrong channels (5 vs 3)", "raises", (ValueError, RuntimeError), r"channels")
def conv_bn_relu2d_5_vs_3_channels_raises():
    f, t = _cbr()
    return _twin_spec(f, t, (R(2, 5, 6, 6),), check=False)


@row("ConvBnReLU2d", "meta input", "raises", RuntimeError, None)
def conv_bn_relu2d_meta_input_raises():
    f, t = _cbr()
    return _twin_spec(f, t, (R(2, 3, 6, 6, device="meta"),), check=False)


@row("ConvBnReLU2d", "non-contiguous input (train mode)", "works")
def conv_bn_relu2d_noncontiguous_input_train_matches_torch():
    f, t = _cbr()
    return _twin_spec(f, t, (R(2, 3, 6, 6).transpose(2, 3),))


@row("ConvBnReLU2d", "expanded (stride 0) input (eval mode)", "works")
def conv_bn_relu2d_stride0_input_eval_matches_torch():
    f, t = _cbr()
    f.eval(), t.eval()
    return _twin_spec(f, t, (R(1, 3, 6, 6).expand(3, -1, -1, -1),))


@row("ConvBnReLU2d", "single value per channel in training", "raises", ValueError, r"more than 1 value")
def conv_bn_relu2d_one_value_per_channel_training_raises():
    f, t = _cbr()
    return _twin_spec(f, t, (R(1, 3, 1, 1),), check=False)


@row("ConvBnReLU2d", "empty batch (eval)", "works")
def conv_bn_relu2d_empty_batch_eval_matches_torch():
    f, t = _cbr()
    f.eval(), t.eval()
    return _twin_spec(f, t, (R(0, 3, 6, 6),))


@row("ConvBnReLU2d", "empty batch (train), as torch.nn", "works")
def conv_bn_relu2d_empty_batch_train_matches_torch():
    f, t = _cbr()
    return _twin_spec(f, t, (R(0, 3, 6, 6),))


@row("ConvTransposeBnReLU2d", "output_padding >= stride (eval, no_grad: oneDNN's path), named", "raises",
     RuntimeError, r"output_padding")
def conv_transpose_output_padding_past_stride_raises_naming_it():
    torch.manual_seed(5)
    f = fastbig.nn.ConvTransposeBnReLU2d(3, 4, 3, stride=1, output_padding=1).eval()
    x = R(2, 3, 5, 5)
    with torch.no_grad(), pytest.raises(RuntimeError, match="output padding must be smaller"):
        nn.ConvTranspose2d(3, 4, 3, stride=1, output_padding=1)(x)  # torch's own type

    def call():
        with torch.no_grad():  # (was oneDNN's "could not create a primitive descriptor")
            return f(x)
    return dict(call=call, inputs=[x])


@row("ConvBnReLU2d", "NaN in the input (train)", "works")
def conv_bn_relu2d_nan_input_train_matches_torch_nan_pattern():
    f, t = _cbr()
    x = R(2, 3, 6, 6)
    x[0, 1, 2, 2] = float("nan")
    return _twin_spec(f, t, (x,))


@row("ConvBnReLU2d", "NaN in the input (eval)", "works")
def conv_bn_relu2d_nan_input_eval_matches_torch_nan_pattern():
    f, t = _cbr()
    f.eval(), t.eval()
    x = R(2, 3, 6, 6)
    x[0, 1, 2, 2] = float("nan")
    return _twin_spec(f, t, (x,))


@row("ConvBnLeakyReLU2d", "non-contiguous input (train mode)", "works")
def conv_bn_leaky_relu2d_noncontiguous_input_matches_torch():
    torch.manual_seed(6)
    f = fastbig.nn.ConvBnLeakyReLU2d(3, 4, 3, padding=1, negative_slope=0.2)
    t = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.LeakyReLU(0.2))
    return _twin_spec(f, t, (R(2, 3, 6, 6).transpose(2, 3),))


@row("ConvBn2d", "integer input", "raises", (RuntimeError, TypeError), None)
def conv_bn2d_int64_input_raises():
    torch.manual_seed(6)
    f = fastbig.nn.ConvBn2d(3, 4, 3, padding=1)
    t = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
    return _twin_spec(f, t, (R(2, 3, 6, 6).long(),), check=False)


@row("ConvTransposeBnReLU2d", "channels_last input (train mode)", "works")
def conv_transpose_channels_last_input_train_matches_torch():
    f, t = _cbr(transposed=True)
    return _twin_spec(f, t, (R(2, 3, 5, 5).contiguous(memory_format=torch.channels_last),))


@row("ConvTransposeBnReLU2d", "wrong rank (3-D input, eval)", "raises", (ValueError, RuntimeError), r"4-D|3-D")
def conv_transpose_3d_input_eval_raises():
    f, t = _cbr(transposed=True)
    f.eval(), t.eval()
    return _twin_spec(f, t, (R(3, 5, 5),), check=False)


# =====================================================================================
# the table as tests
# =====================================================================================
@pytest.mark.parametrize("r", TABLE.params())
def test_bad_input_table(r):
    run_row(r)


# =====================================================================================
# behaviours the table cannot express
# =====================================================================================
@pytest.mark.parametrize("make", [
    lambda: (fastbig.nn.ConvBnReLU2d(3, 4, 3), nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
             (torch.randn(2, 3, 8, 8, dtype=torch.float64),)),
], ids=["ConvBnReLU2d"])
def test_dtype_mismatch_raises_what_torch_raises_too(make):
    check_dtype_mismatch_like_torch(*make())


if __name__ == "__main__":  # print the table
    print_table(TABLE.rows)
