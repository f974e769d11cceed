"""Conv + BatchNorm + activation, whole life in one file: registration (schemas in
csrc/registration.cpp, CONV-BN section), fake impls, autograd, input checks and dispatch to _C
or the reference.

    conv_bn_act(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
                num_batches_tracked, *, stride, padding, dilation, groups, transposed,
                output_padding, training, momentum, eps, activation, negative_slope) -> y
    bn_act(z, weight, bias, running_mean, running_var, num_batches_tracked, *, training,
           momentum, eps, activation, negative_slope) -> y

The convolution stays with ATen (oneDNN / cuDNN) and its backward with autograd; fastbig fuses
what follows it:
- batch statistics (training, or no running stats): ``fastbig::bn_act_forward`` makes one
  Welford statistics pass and one normalize + affine + activation pass; its backward
  ``fastbig::bn_act_backward`` makes one reduction pass and one elementwise pass, recomputing
  x_hat and the activation's mask from the saved conv output z. The running statistics are
  updated in place by ``fastbig::bn_update_running_stats_`` exactly as BatchNorm2d updates them.
- running statistics (eval): BatchNorm is folded into the conv's weight and bias (fastbig.nn
  caches the fold), then the conv runs with the activation fused into it as a oneDNN post-op
  (CPU float32 without autograd, see _onednn_conv_act_ok), or else the activation is applied in
  place to the conv's fresh output.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import backends
from .._extension import has_op
from ..reference import conv_bn_relu as ref
from ._checks import DtypeError, check_same, check_tensor

_OP = "conv_bn_act"
ACTIVATIONS = {"none": 0, "relu": 1, "leaky_relu": 2}


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernel_format(z):
    """The memory format the kernels write: z's own when NCHW or channels_last, else NCHW."""
    if z.is_contiguous():
        return torch.contiguous_format
    if z.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


# ---- registration: fake impls and autograd for the C++ schemas ----------------------------
if has_op("bn_act_forward"):

    @torch.library.register_fake("fastbig::bn_act_forward")
    def _bn_act_forward_fake(z, weight, bias, eps, act, negative_slope):
        C = z.shape[1]
        acc = _acc_dtype(z.dtype)
        y = torch.empty_like(z, memory_format=_kernel_format(z))
        return y, z.new_empty(C, dtype=acc), z.new_empty(C, dtype=acc), z.new_empty(C, dtype=acc)

    @torch.library.register_fake("fastbig::bn_act_backward")
    def _bn_act_backward_fake(grad_y, z, mean, invstd, weight, bias, act, negative_slope):
        C = z.shape[1]
        gz = torch.empty_like(z, memory_format=_kernel_format(z))
        return gz, z.new_empty(C, dtype=mean.dtype), z.new_empty(C, dtype=mean.dtype)

    @torch.library.register_fake("fastbig::bn_update_running_stats_")
    def _bn_update_fake(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
        return None

    def _bn_act_setup(ctx, inputs, output):
        z, weight, bias, eps, act, slope = inputs
        _y, mean, invstd, var = output
        ctx.save_for_backward(z, mean, invstd, weight, bias)
        ctx.act, ctx.slope, ctx.eps = act, slope, eps
        ctx.mark_non_differentiable(mean, invstd, var)

    _ACT_NAMES = {v: k for k, v in ACTIVATIONS.items()}

    def _bn_act_backward_differentiable(ctx, grad_y, z, weight, bias):
        """create_graph=True (double backward): the same gradient through the plain-torch oracle,
        so that it is itself differentiable and right."""
        leaf = lambda t: None if t is None else (t if t.requires_grad else t.detach().requires_grad_())  # noqa
        zz, ww, bb = leaf(z), leaf(weight), leaf(bias)
        with torch.enable_grad():
            y, _ = ref.bn_act(zz, ww, bb, training=True, eps=ctx.eps, act=_ACT_NAMES[ctx.act],
                              negative_slope=ctx.slope)
            wrt = [t for t in (zz, ww, bb) if t is not None]
            got = list(torch.autograd.grad(y, wrt, grad_y, create_graph=True, allow_unused=True))
        gz = got.pop(0)
        gw = got.pop(0) if ww is not None else None
        gb = got.pop(0) if bb is not None else None
        return (gz, gw if ctx.needs_input_grad[1] else None, gb if ctx.needs_input_grad[2] else None,
                None, None, None)

    def _bn_act_backward(ctx, grad_y, _gm, _gi, _gv):
        z, mean, invstd, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # backward(create_graph=True): keep the graph, exactly
            return _bn_act_backward_differentiable(ctx, grad_y, z, weight, bias)
        gz, gw, gb = torch.ops.fastbig.bn_act_backward(grad_y, z, mean, invstd, weight, bias, ctx.act,
                                                       ctx.slope)
        gw = gw.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        gb = gb.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return gz, gw, gb, None, None, None

    torch.library.register_autograd("fastbig::bn_act_forward", _bn_act_backward, setup_context=_bn_act_setup)

if has_op("conv1x1_act"):

    @torch.library.register_fake("fastbig::conv1x1_act")
    def _conv1x1_act_fake(x, weight, bias, act, negative_slope):
        fmt = torch.channels_last if (not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)) \
            else torch.contiguous_format
        return x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3])).contiguous(memory_format=fmt)


# ---- input checks ---------------------------------------------------------------------------
def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_activation(activation, negative_slope, op=_OP):
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if not _is_number(negative_slope):  # (the kernels take it whatever the activation)
        raise TypeError(f"{op}: negative_slope must be a number, got {type(negative_slope).__name__}")
    if activation == "leaky_relu" and not (0 < negative_slope < math.inf):
        raise ValueError(f"{op}: negative_slope must be a number > 0 for leaky_relu (finite: the fused "
                         f"kernels' gradient needs it), got {negative_slope!r}")


def _check_eps(eps):
    if not _is_number(eps) or not 0 < eps < math.inf:
        raise ValueError(f"{_OP}: eps must be a number > 0, got {eps!r} (expected a finite float)")


def _check_output_padding(output_padding, stride, dilation, transposed, op=_OP):
    """As torch's conv_transpose2d: each output_padding < max(stride, dilation); a conv (not
    transposed) has none (a nonzero one would be silently ignored)."""
    if isinstance(output_padding, (str, bool)):
        raise TypeError(f"{op}: output_padding must be an int or a pair of ints, got {output_padding!r}")
    op = _pair(output_padding)
    if not transposed:
        if any(o != 0 for o in op):
            raise ValueError(f"{op}: output_padding applies to transposed convolutions only; got "
                             f"output_padding={output_padding!r} with transposed=False")
        return
    if isinstance(stride, str) or isinstance(dilation, str):
        return  # torch's conv says what is wrong with those
    for o, s, d in zip(op, _pair(stride), _pair(dilation)):
        if not 0 <= o < max(s, d):
            raise RuntimeError(f"{op}: output_padding must be >= 0 and smaller than either stride or "
                               f"dilation, got output_padding={tuple(op)} with stride={tuple(_pair(stride))}, "
                               f"dilation={tuple(_pair(dilation))}")


def _check_channel_vec(name, t, C, z):
    if t is None:
        return
    check_tensor(_OP, name, t)
    if tuple(t.shape) != (C,):
        raise ValueError(f"{_OP}: {name} must have shape ({C},) (one per channel), got {tuple(t.shape)}")
    if t.device != z.device:
        raise RuntimeError(f"{_OP}: {name} is on {t.device} but the input is on {z.device}; "
                           f"expected all tensors on one device")


def _check_bn(z, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
              activation, negative_slope, zname="z"):
    check_tensor(_OP, zname, z, dim=4)
    C = z.shape[1]
    for name, t in (("bn_weight", weight), ("bn_bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        _check_channel_vec(name, t, C, z)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{_OP}: running_mean and running_var must both be given or both be None, got "
                         f"running_mean={'None' if running_mean is None else 'a tensor'}, "
                         f"running_var={'None' if running_var is None else 'a tensor'}")
    if running_mean is not None and running_var.dtype != running_mean.dtype:
        raise DtypeError(f"{_OP}: running_var has dtype {running_var.dtype} but running_mean has "
                        f"{running_mean.dtype}; expected one dtype")
    if num_batches_tracked is not None:
        if not isinstance(num_batches_tracked, torch.Tensor) or num_batches_tracked.dtype != torch.long \
                or num_batches_tracked.numel() != 1:
            raise TypeError(f"{_OP}: num_batches_tracked must be a one-element int64 tensor, got "
                            f"{getattr(num_batches_tracked, 'dtype', type(num_batches_tracked).__name__)}")
        if num_batches_tracked.device != z.device:
            raise RuntimeError(f"{_OP}: num_batches_tracked is on {num_batches_tracked.device} but the input is "
                               f"on {z.device}; expected all tensors on one device")
    _check_eps(eps)
    if momentum is not None and (not _is_number(momentum) or not 0.0 <= momentum <= 1.0):
        raise ValueError(f"{_OP}: momentum must be a number in [0, 1] or None, got {momentum!r}")
    if training and running_mean is not None and momentum is None and num_batches_tracked is None:
        raise ValueError(f"{_OP}: momentum=None (cumulative average) needs num_batches_tracked, got None")
    _check_activation(activation, negative_slope)
    if training or running_mean is None:  # as torch's _verify_batch_size: an empty batch is fine
        n = z.numel() // C if C > 0 else 0
        if n == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                             f"{list(z.shape)}")


def _activation_(z, activation, negative_slope):
    """The activation in place on a fresh tensor (the conv's own output)."""
    if activation == "relu":
        return torch.relu_(z)
    if activation == "leaky_relu":
        return F.leaky_relu_(z, negative_slope)
    return z


def _pair(v):
    return [int(v), int(v)] if isinstance(v, numbers.Integral) else [int(t) for t in v]


_ONEDNN_MIN_FLOP = 50e6


def _onednn_conv_act_ok(x, weight, bias, padding, transposed) -> bool:
    """Whether conv + activation can run as one oneDNN primitive, the activation a post-op
    applied while the output tile is still in registers: CPU float32 without autograd (the fused
    op has no backward), oneDNN on, not under torch.compile (inductor does its own fusion), a
    non-empty NCHW or channels_last input (the output then has the layout torch's own conv gives).
    Single-threaded 1x1 NCHW convs stay with torch, which runs them as one GEMM with no layout
    reorders (torch makes the same choice for its own conv)."""
    if torch.compiler.is_compiling():  # first: nothing below needs tracing
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if bias is not None and bias.dtype != torch.float32:
        return False
    if isinstance(padding, str) or x.dim() != 4 or x.numel() == 0:
        return False
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    if backends.current() == "reference":
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return False
    if x.is_contiguous():  # (a channels_last weight would make torch's conv write channels_last)
        one_by_one = tuple(weight.shape[-2:]) == (1, 1)
        # oneDNN reorders the dense weight on every call: below _ONEDNN_MIN_FLOP that costs more
        # than the separate activation pass it saves (torch's conv + relu_ win there).
        # Stride-1 estimate: 2 * N * H * W * |weight|.
        small = 2 * x.shape[0] * x.shape[2] * x.shape[3] * weight.numel() < _ONEDNN_MIN_FLOP
        return weight.is_contiguous() and not small and not (one_by_one and not transposed
                                                             and torch.get_num_threads() == 1)
    cl = torch.channels_last  # a model moved to channels_last has channels_last weights too
    return x.is_contiguous(memory_format=cl) and (weight.is_contiguous() or weight.is_contiguous(memory_format=cl))


def _onednn_conv_act(x, weight, bias, stride, padding, dilation, groups, transposed, output_padding, activation,
                     negative_slope):
    """The one oneDNN primitive (callers check _onednn_conv_act_ok). ``weight`` is the dense
    weight or, for a conv (not transposed), one prepacked by onednn_pack_conv_weight."""
    scalars = [float(negative_slope)] if activation == "leaky_relu" else []
    if weight.layout == torch.strided:
        weight = weight.contiguous()  # oneDNN's dense weight: plain OIHW (IOHW transposed)
    if transposed:
        return torch.ops.mkldnn._convolution_transpose_pointwise(
            x, weight, bias, _pair(padding), _pair(output_padding), _pair(stride), _pair(dilation), groups,
            activation, scalars, "")
    return torch.ops.mkldnn._convolution_pointwise(
        x, weight, bias, _pair(padding), _pair(stride), _pair(dilation), groups, activation, scalars, "")


def onednn_pack_conv_weight(weight, stride, padding, dilation, groups, input_size):
    """``weight`` reordered once into the blocked layout oneDNN's conv picks for inputs of
    ``input_size`` (an opaque mkldnn tensor, for _onednn_conv_act only). Worth it for channels_last
    inputs (a packed weight makes oneDNN write channels_last output, so NCHW inputs keep the dense
    weight): the dense weight, which oneDNN reorders on every call, is the slower there."""
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_convolution_weight(weight.contiguous(), _pair(padding), _pair(stride),
                                                            _pair(dilation), groups, list(input_size))


def _conv1x1_act_ok(x, weight, bias, stride, padding, dilation, groups, transposed) -> bool:
    """Whether fastbig::conv1x1_act takes this conv: a 1x1 conv (stride 1, no padding, groups 1,
    not transposed) on CPU float32/float64 without autograd, torch built with MKL (the op calls
    the BLAS GEMM torch exports), not under torch.compile, backend not forced to the reference.
    NCHW inputs only: for channels_last, oneDNN's prepacked conv with the activation post-op is
    faster, so those stay with _onednn_conv_act (the op itself takes channels_last too)."""
    if torch.compiler.is_compiling() or transposed or groups != 1 or x.device.type != "cpu":
        return False
    if x.dtype not in (torch.float32, torch.float64) or weight.dtype != x.dtype:
        return False
    if bias is not None and bias.dtype != x.dtype:
        return False
    if x.dim() != 4 or x.numel() == 0 or weight.dim() != 4 or tuple(weight.shape[-2:]) != (1, 1):
        return False
    if not has_op("conv1x1_act") or not torch.backends.mkl.is_available():
        return False
    if isinstance(padding, str):
        if padding not in ("valid", "same"):  # "same" is no padding for a 1x1 kernel too
            return False
    elif any(p != 0 for p in _pair(padding)):
        return False
    if any(s != 1 for s in _pair(stride)):  # strided 1x1: torch's conv (it subsamples in the im2col)
        return False
    if backends.current() == "reference":
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return False
    return x.is_contiguous()


def _conv1x1_act(x, weight, bias, activation, negative_slope):
    """fastbig::conv1x1_act (callers check _conv1x1_act_ok)."""
    return torch.ops.fastbig.conv1x1_act(x, weight, bias, ACTIVATIONS[activation], float(negative_slope))


def _conv_act(x, weight, bias, stride, padding, dilation, groups, transposed, output_padding, activation,
              negative_slope):
    """act(conv(x, weight) + bias), no batch norm (eval: it is folded into weight and bias).
    A 1x1 conv runs as GEMM blocks with the bias + activation applied to each block while it is in
    cache where _conv1x1_act_ok (fastbig::conv1x1_act); else one oneDNN primitive with the
    activation fused where _onednn_conv_act_ok, else torch's conv and the activation in place on
    its output."""
    if weight.layout == torch.strided and _conv1x1_act_ok(x, weight, bias, stride, padding, dilation, groups,
                                                          transposed):
        return _conv1x1_act(x, weight, bias, activation, negative_slope)
    if _onednn_conv_act_ok(x, weight, bias, padding, transposed):
        return _onednn_conv_act(x, weight, bias, stride, padding, dilation, groups, transposed, output_padding,
                                activation, negative_slope)
    if transposed:
        z = F.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation)
    elif activation == "relu" and _cpu_add_relu_ok(x, weight, bias):
        # torch's CPU conv adds a bias by filling its output with it before the GEMM: one more
        # pass over the output. Conv without it, then bias + ReLU in one in-place pass.
        z = F.conv2d(x, weight, None, stride, padding, dilation, groups)
        return torch.ops.aten._add_relu_(z, bias.view(1, -1, 1, 1))
    else:
        z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return _activation_(z, activation, negative_slope)


def _cpu_add_relu_ok(x, weight, bias) -> bool:
    return (bias is not None and x.device.type == "cpu" and x.dtype == weight.dtype == bias.dtype == torch.float32
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias))))



def _reversed_padding_repeated_twice(padding, weight, dilation):
    """F.pad's padding for a conv's ``padding`` (ints or "same"/"valid"), as nn.Conv2d computes
    its own ``_reversed_padding_repeated_twice`` for a padding_mode other than "zeros"."""
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0, 0, 0]
        out = [0, 0, 0, 0]
        for d, k, i in zip(_pair(dilation), weight.shape[-2:], (1, 0)):
            total = d * (k - 1)
            out[2 * i], out[2 * i + 1] = total // 2, total - total // 2
        return out
    ph, pw = _pair(padding)
    return [pw, pw, ph, ph]


def conv_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, stride=1,
             padding=0, dilation=1, groups: int = 1, transposed: bool = False, output_padding=0,
             padding_mode: str = "zeros", activation: str = "relu", negative_slope: float = 0.01,
             packed: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
    """act(conv(x, weight) + bias) with Conv2d (ConvTranspose2d when ``transposed``) arguments and
    no batch norm: the eval-mode conv of a block whose BatchNorm is folded into ``weight`` and
    ``bias`` (see fold_bn). For inference; differentiable (the paths below that have no backward
    are taken only when no input requires grad).

    Which path runs (the same result within the dtype's tolerance; the first that takes the
    inputs):
    - ``padding_mode`` other than "zeros" (reflect, replicate, circular; not transposed): the
      input padded as nn.Conv2d pads it, torch's conv, the activation in place on its output;
    - a 1x1 conv on NCHW CPU float32/float64 input (fastbig::conv1x1_act): GEMM blocks with bias
      + activation applied to each block while it is in cache;
    - CPU float32 (oneDNN on): one oneDNN primitive with the activation as a post-op, except a
      small NCHW conv (under ``_ONEDNN_MIN_FLOP``, where oneDNN's per-call weight reorder costs
      more than the activation pass it saves) and a single-threaded 1x1 NCHW conv. For a
      channels_last input, ``packed()`` (when given) supplies the weight prepacked by
      ``onednn_pack_conv_weight`` for x's shape, so the reorder is not paid per call: the caller
      keeps that cache (fastbig.nn's blocks key it on the fold and the input shape). ``packed``
      is called only on that path;
    - else torch's conv and the activation in place on its fresh output.

    ``activation`` is "relu", "leaky_relu" (``negative_slope`` > 0) or "none".
    """
    _check_conv(x, weight, bias, groups, transposed, stride, dilation, output_padding, op="conv_act",
                names=("weight", "bias"))
    _check_activation(activation, negative_slope, op="conv_act")
    return conv_act_unchecked(x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups,
                              transposed=transposed, output_padding=output_padding, padding_mode=padding_mode,
                              activation=activation, negative_slope=negative_slope, packed=packed)


def conv_act_unchecked(x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1, transposed=False,
                       output_padding=0, padding_mode="zeros", activation="relu", negative_slope=0.01, packed=None):
    """conv_act without its Python argument checks, for a caller that has them from elsewhere:
    fastbig.nn's blocks, whose layers were checked when built (torch's conv still raises its own
    errors for inputs that do not fit). On a small input the checks are a tenth of an eval step.
    A transposed conv's output_padding is still checked: oneDNN would take a wrong one silently."""
    if transposed:
        _check_output_padding(output_padding, stride, dilation, True)
    if padding_mode != "zeros":
        if transposed:
            raise ValueError(f"conv_act: padding_mode must be 'zeros' for a transposed conv (as "
                             f"ConvTranspose2d), got {padding_mode!r}")
        if padding_mode not in ("reflect", "replicate", "circular"):
            raise ValueError(f"conv_act: padding_mode must be one of 'zeros', 'reflect', 'replicate', "
                             f"'circular', got {padding_mode!r}")
        z = F.conv2d(F.pad(x, _reversed_padding_repeated_twice(padding, weight, dilation), mode=padding_mode),
                     weight, bias, stride, 0, dilation, groups)
        return _activation_(z, activation, negative_slope)
    if packed is not None and not transposed and not x.is_contiguous() \
            and _onednn_conv_act_ok(x, weight, bias, padding, False) \
            and not _conv1x1_act_ok(x, weight, bias, stride, padding, dilation, groups, False):
        return _onednn_conv_act(x, packed(), bias, stride, padding, dilation, groups, False, 0, activation,
                                negative_slope)
    return _conv_act(x, weight, bias, stride, padding, dilation, groups, transposed, output_padding, activation,
                     negative_slope)


# ---- the ops --------------------------------------------------------------------------------
def bn_act(z: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
           running_mean: Optional[torch.Tensor] = None, running_var: Optional[torch.Tensor] = None,
           num_batches_tracked: Optional[torch.Tensor] = None, *, training: bool = True,
           momentum: Optional[float] = 0.1, eps: float = 1e-5, activation: str = "relu",
           negative_slope: float = 0.01) -> torch.Tensor:
    """BatchNorm2d (as F.batch_norm with these arguments) then the activation, fused.

    With ``training`` and running stats given, the running stats (and num_batches_tracked) are
    updated in place as BatchNorm2d updates them."""
    _check_bn(z, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
              activation, negative_slope)
    return _bn_act(z, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
                   activation, negative_slope)


def _bn_act(z, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
            activation, negative_slope):
    use_batch = training or running_mean is None
    if use_batch and z.numel() == 0:
        # An empty batch, as torch's batch_norm takes it: an empty output (linked to z, weight and
        # bias so that backward gives them their gradients: empty for z, zeros for the weights),
        # the running statistics left as they are, num_batches_tracked counted.
        link = z.sum()
        for t in (weight, bias):
            if t is not None:
                link = link + t.sum()
        if training and running_mean is not None and num_batches_tracked is not None:
            with torch.no_grad():
                num_batches_tracked.add_(1)
        return torch.empty_like(z, memory_format=_kernel_format(z)) + link.to(z.dtype)
    if not use_batch:  # eval with running stats: a per-channel affine, plain torch
        y, _ = ref.bn_act(z, weight, bias, running_mean, running_var, training=False, eps=eps, act=activation,
                          negative_slope=negative_slope)
        return y
    if backends.extension_backend(_OP, z.device, "bn_act_forward") == "reference":
        y, _ = ref.bn_act(z, weight, bias, running_mean, running_var, num_batches_tracked, training=training,
                          momentum=momentum, eps=eps, act=activation, negative_slope=negative_slope,
                          update_in_place=True)
        return y
    y, mean, _invstd, var = torch.ops.fastbig.bn_act_forward(z, weight, bias, float(eps),
                                                             ACTIVATIONS[activation], float(negative_slope))
    if training and running_mean is not None:
        nbt = num_batches_tracked
        if nbt is None:  # momentum is set (checked): the count is not needed, a scratch one is
            nbt = torch.zeros((), dtype=torch.long, device=z.device)
        torch.ops.fastbig.bn_update_running_stats_(running_mean, running_var, nbt, mean, var,
                                                   z.numel() // z.shape[1],
                                                   None if momentum is None else float(momentum))
    return y


def _check_conv(x, conv_weight, conv_bias, groups, transposed, stride=1, dilation=1, output_padding=0, op=_OP,
                names=("conv_weight", "conv_bias")):
    wn, bn = names
    check_tensor(op, "x", x, dim=4)
    check_tensor(op, wn, conv_weight, dim=4)
    if conv_bias is not None:
        check_tensor(op, bn, conv_bias, dim=1)
    check_same(op, "x", x, **{wn: conv_weight, bn: conv_bias})
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    _check_output_padding(output_padding, stride, dilation, transposed, op)
    cin = conv_weight.shape[0] if transposed else conv_weight.shape[1] * groups
    if x.shape[1] != cin:
        raise ValueError(f"{op}: x must have {cin} channels ({wn} {tuple(conv_weight.shape)}, "
                         f"groups={groups}), got {x.shape[1]} (x shape {tuple(x.shape)})")
    cout = conv_weight.shape[1] * groups if transposed else conv_weight.shape[0]
    if conv_bias is not None and tuple(conv_bias.shape) != (cout,):
        raise ValueError(f"{op}: {bn} must have shape ({cout},), got {tuple(conv_bias.shape)}")
    return cout


def conv_bn_act(x: torch.Tensor, conv_weight: torch.Tensor, conv_bias: Optional[torch.Tensor] = None,
                bn_weight: Optional[torch.Tensor] = None, bn_bias: Optional[torch.Tensor] = None,
                running_mean: Optional[torch.Tensor] = None, running_var: Optional[torch.Tensor] = None,
                num_batches_tracked: Optional[torch.Tensor] = None, *, stride=1, padding=0, dilation=1,
                groups: int = 1, transposed: bool = False, output_padding=0, training: bool = True,
                momentum: Optional[float] = 0.1, eps: float = 1e-5, activation: str = "relu",
                negative_slope: float = 0.01) -> torch.Tensor:
    """act(BatchNorm2d(conv(x))) with Conv2d (or ConvTranspose2d when ``transposed``) arguments.

    Batch statistics when ``training`` or no running stats are given (running stats, if given,
    are then updated in place as BatchNorm2d does); else BatchNorm is folded into the conv."""
    cout = _check_conv(x, conv_weight, conv_bias, groups, transposed, stride, dilation, output_padding)
    use_batch = training or running_mean is None
    if use_batch:
        if transposed:
            z = F.conv_transpose2d(x, conv_weight, conv_bias, stride, padding, output_padding, groups, dilation)
        else:
            z = F.conv2d(x, conv_weight, conv_bias, stride, padding, dilation, groups)
        if z.shape[1] != cout:  # pragma: no cover - torch's conv guarantees it
            raise RuntimeError(f"{_OP}: conv produced {z.shape[1]} channels, expected {cout}")
        _check_bn(z, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
                  activation, negative_slope, zname="conv output")
        return _bn_act(z, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, training, momentum,
                       eps, activation, negative_slope)
    # eval with running statistics: fold, conv, activation in place on the conv's fresh output
    _check_channel_vec("bn_weight", bn_weight, cout, x)
    _check_channel_vec("bn_bias", bn_bias, cout, x)
    _check_channel_vec("running_mean", running_mean, cout, x)
    _check_channel_vec("running_var", running_var, cout, x)
    _check_eps(eps)
    _check_activation(activation, negative_slope)
    w, b = fold_bn(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps,
                   transposed=transposed, groups=groups)
    return _conv_act(x, w, b, stride, padding, dilation, groups, transposed, output_padding, activation,
                     negative_slope)


def _check_fold(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, transposed, groups):
    op = "fold_bn"
    check_tensor(op, "conv_weight", conv_weight, dim=4)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    if transposed and conv_weight.shape[0] % groups != 0:
        raise ValueError(f"{op}: a transposed conv_weight [in_channels, out_channels/groups, kH, kW] needs "
                         f"in_channels divisible by groups={groups}, got {tuple(conv_weight.shape)}")
    cout = conv_weight.shape[1] * groups if transposed else conv_weight.shape[0]
    for name, t, required in (("conv_bias", conv_bias, False), ("bn_weight", bn_weight, False),
                              ("bn_bias", bn_bias, False), ("running_mean", running_mean, True),
                              ("running_var", running_var, True)):
        if t is None:
            if required:
                raise TypeError(f"{op}: {name} must be a tensor of shape ({cout},) (the fold needs the "
                                f"running statistics), got None")
            continue
        check_tensor(op, name, t)
        if tuple(t.shape) != (cout,):
            raise ValueError(f"{op}: {name} must have shape ({cout},) (one per output channel of conv_weight "
                             f"{tuple(conv_weight.shape)}), got {tuple(t.shape)}")
        if t.device != conv_weight.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but conv_weight is on {conv_weight.device}; "
                               f"expected all tensors on one device")
    if not _is_number(eps) or not 0 < eps < math.inf:
        raise ValueError(f"{op}: eps must be a number > 0, got {eps!r} (expected a finite float)")


def fold_bn(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, *, transposed=False,
            groups=1):
    """Eval BatchNorm folded into the conv: (weight, bias), computed in float32 or wider and
    returned in the conv weight's dtype. Differentiable."""
    _check_fold(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, transposed, groups)
    acc = torch.promote_types(conv_weight.dtype, torch.float32)
    cast = (lambda t: None if t is None else t.to(acc))
    w, b = ref.fold(cast(conv_weight), cast(conv_bias), cast(bn_weight), cast(bn_bias), cast(running_mean),
                    cast(running_var), eps, transposed=transposed, groups=groups)
    return w.to(conv_weight.dtype), b.to(conv_weight.dtype)
