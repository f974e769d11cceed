"""Drop-in conv + BatchNorm2d + activation blocks.

Each block IS the ``nn.Sequential(conv, bn, act)`` it replaces (index 0 the Conv2d or
ConvTranspose2d, 1 the BatchNorm2d, 2 the activation; ConvBn2d has no index 2), so its
state_dict keys ("0.weight", "1.running_mean", ...) are that Sequential's and checkpoints load
either way. ``forward`` runs ``fastbig.ops.conv_bn_act``:
- the bn in train mode, or without running statistics (``track_running_stats=False``): batch
  statistics through the fused kernels; the running statistics are updated in place as
  BatchNorm2d updates them. The bn's own mode decides, as in the Sequential (a frozen
  ``block.bn.eval()`` in a training model uses its running statistics);
- eval with running statistics: BatchNorm folded into the conv weight and bias, cached here and
  recomputed when any of conv.weight/bias, bn.weight/bias/running_mean/running_var (their
  ``_version`` or storage) or bn.eps changes; then ``fastbig.ops.conv_act`` (which path runs is
  its choice; its unchecked form, the layers were checked when built), given the folded weight
  prepacked for oneDNN, also cached here.
"""
from __future__ import annotations

import copy as _copy

import torch
from torch import nn

from ..ops import conv_bn_relu as _ops


def _check_slope(owner, negative_slope):
    """The fused kernels take LeakyReLU slopes > 0 (torch's LeakyReLU takes any): say so when the
    block is built, not at its first training step."""
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)) \
            or not 0 < negative_slope < float("inf"):
        raise ValueError(f"{owner}: negative_slope must be a finite number > 0 for the fused LeakyReLU, "
                         f"got {negative_slope!r}")


def _activation_of(act):
    if act is None:
        return "none", 0.01
    if isinstance(act, nn.LeakyReLU):
        return "leaky_relu", float(act.negative_slope)
    if isinstance(act, nn.ReLU):
        return "relu", 0.01
    if isinstance(act, nn.Identity):
        return "none", 0.01
    raise TypeError(f"activation module must be nn.ReLU, nn.LeakyReLU or nn.Identity, got {type(act).__name__}")


class _ConvBnAct(nn.Sequential):
    _transposed = False
    _act_kind = "relu"  # "relu" | "leaky_relu" | "none": which activation module the block holds

    # ---- the parts ----
    @property
    def conv(self):
        return self[0]

    @property
    def bn(self):
        return self[1]

    @property
    def act(self):
        return self[2] if len(self) > 2 else None

    @classmethod
    def from_modules(cls, conv, bn, act=None, copy=False):
        """A block made of existing layers: shares their parameters and buffers, or copies them
        when ``copy=True``. ``act`` defaults to a fresh module of the block's activation."""
        conv_type = nn.ConvTranspose2d if cls._transposed else nn.Conv2d
        if not isinstance(conv, conv_type):
            raise TypeError(f"{cls.__name__}.from_modules: conv must be {conv_type.__name__}, "
                            f"got {type(conv).__name__}")
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"{cls.__name__}.from_modules: bn must be BatchNorm2d, got {type(bn).__name__}")
        if bn.num_features != conv.out_channels:
            raise ValueError(f"{cls.__name__}.from_modules: bn.num_features must equal conv.out_channels "
                             f"({conv.out_channels}), got {bn.num_features}")
        if cls._act_kind == "none":
            if act is not None:
                raise ValueError(f"{cls.__name__}.from_modules: this block has no activation, got "
                                 f"{type(act).__name__}")
        elif act is None:
            act = nn.ReLU() if cls._act_kind == "relu" else nn.LeakyReLU()
        else:
            kind, slope = _activation_of(act)
            if kind != cls._act_kind:
                raise TypeError(f"{cls.__name__}.from_modules: act must be "
                                f"{'nn.ReLU' if cls._act_kind == 'relu' else 'nn.LeakyReLU'}, "
                                f"got {type(act).__name__}")
            if kind == "leaky_relu":
                _check_slope(f"{cls.__name__}.from_modules", act.negative_slope)
        if copy:
            conv, bn, act = _copy.deepcopy(conv), _copy.deepcopy(bn), _copy.deepcopy(act)
        block = cls.__new__(cls)
        nn.Sequential.__init__(block, *([conv, bn] if act is None else [conv, bn, act]))
        return block

    # ---- the fold cache (not state: never in state_dict, nor pickled / deep-copied) ----
    _CACHES = ("_fold_cache", "_pack_cache")

    def __getstate__(self):
        state = self.__dict__.copy()
        for k in self._CACHES:  # the packed weight is an opaque oneDNN tensor: no storage to copy
            state.pop(k, None)
        return state

    def _fold_key(self):
        conv, bn = self.conv, self.bn
        key = [bn.eps]
        for t in (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var):
            key.append(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device))
        return tuple(key)

    def _folded(self):
        conv, bn = self.conv, self.bn
        args = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
        kw = dict(transposed=self._transposed, groups=conv.groups)
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (conv.weight, conv.bias, bn.weight, bn.bias))
        if needs_grad or torch.compiler.is_compiling():
            return _ops.fold_bn(*args, **kw)  # differentiable (or traced): no cache
        key = self._fold_key()
        cache = self.__dict__.get("_fold_cache")
        if cache is not None and cache[0] == key:
            return cache[1], cache[2]
        with torch.no_grad():
            w, b = _ops.fold_bn(*args, **kw)
        self.__dict__["_fold_cache"] = (key, w, b)
        return w, b

    def _packed(self, x, w):
        """The folded weight ``w`` prepacked by oneDNN for inputs shaped like ``x``: cached on
        the fold's key (so refreshed exactly when the fold is) and the input's shape."""
        conv = self.conv
        key = (self._fold_key(), tuple(x.shape), tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation),
               conv.groups)
        cache = self.__dict__.get("_pack_cache")
        if cache is not None and cache[0] == key:
            return cache[1]
        wp = _ops.onednn_pack_conv_weight(w, conv.stride, conv.padding, conv.dilation, conv.groups, x.shape)
        self.__dict__["_pack_cache"] = (key, wp)
        return wp

    # ---- forward ----
    def forward(self, x):
        conv, bn = self.conv, self.bn
        activation, slope = _activation_of(self.act)
        # BatchNorm2d's own rule, on the bn's own mode (a frozen bn, bn.eval() inside a training
        # model, uses its running statistics): batch statistics in training or without running
        # statistics; the running statistics updated in training when tracked.
        batch_stats = bn.training or bn.running_mean is None
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] != conv.in_channels:
            # a RuntimeError, as torch's conv raises (train or eval)
            raise RuntimeError(f"{type(self).__name__}: input must have {conv.in_channels} channels, "
                               f"got {x.shape[1]} (shape {tuple(x.shape)})")
        if batch_stats and isinstance(bn, torch.nn.SyncBatchNorm):
            # Converted with nn.SyncBatchNorm.convert_sync_batchnorm: the fused kernels compute
            # per-process statistics, so run torch's SyncBatchNorm itself (it synchronizes across
            # the process group on GPU, and raises its own clear error on CPU).
            return self.act(bn(conv(x))) if len(self) > 2 else bn(conv(x))
        if batch_stats:
            track = bn.training and bn.track_running_stats and bn.running_mean is not None
            momentum = bn.momentum
            rm = bn.running_mean if track else None
            rv = bn.running_var if track else None
            nbt = bn.num_batches_tracked if track else None
            if not self._transposed and conv.padding_mode != "zeros":
                z = conv(x)  # the module's own _conv_forward pads; the fused part follows
                return _ops.bn_act(z, bn.weight, bn.bias, rm, rv, nbt, training=True, momentum=momentum,
                                   eps=bn.eps, activation=activation, negative_slope=slope)
            return _ops.conv_bn_act(x, conv.weight, conv.bias, bn.weight, bn.bias, rm, rv, nbt,
                                    stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                                    groups=conv.groups, transposed=self._transposed,
                                    output_padding=getattr(conv, "output_padding", 0), training=True,
                                    momentum=momentum, eps=bn.eps, activation=activation, negative_slope=slope)
        w, b = self._folded()
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__}: input must be 4-D [N, C, H, W], got {x.dim()}-D")
        return _ops.conv_act_unchecked(x, w, b, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                                       groups=conv.groups, transposed=self._transposed,
                                       output_padding=getattr(conv, "output_padding", 0),
                                       padding_mode=conv.padding_mode, activation=activation, negative_slope=slope,
                                       packed=lambda: self._packed(x, w))


def _bn(out_channels, eps, momentum, affine, track_running_stats, device, dtype):
    return nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, affine=affine,
                          track_running_stats=track_running_stats, device=device, dtype=dtype)


def _conv_bn(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
             eps, momentum, affine, track_running_stats, device, dtype):
    """The Conv2d and BatchNorm2d of a block, from the block's constructor arguments."""
    return (nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                      padding_mode, device=device, dtype=dtype),
            _bn(out_channels, eps, momentum, affine, track_running_stats, device, dtype))


class ConvBnReLU2d(_ConvBnAct):
    """nn.Sequential(Conv2d, BatchNorm2d, ReLU), fused."""
    _act_kind = "relu"

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=False, padding_mode="zeros", eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None):
        super().__init__(
            *_conv_bn(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                      padding_mode, eps, momentum, affine, track_running_stats, device, dtype),
            nn.ReLU())


class ConvBnLeakyReLU2d(_ConvBnAct):
    """nn.Sequential(Conv2d, BatchNorm2d, LeakyReLU(negative_slope)), fused."""
    _act_kind = "leaky_relu"

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=False, padding_mode="zeros", eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, negative_slope=0.01):
        _check_slope(type(self).__name__, negative_slope)
        super().__init__(
            *_conv_bn(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                      padding_mode, eps, momentum, affine, track_running_stats, device, dtype),
            nn.LeakyReLU(negative_slope))


class ConvBn2d(_ConvBnAct):
    """nn.Sequential(Conv2d, BatchNorm2d), fused."""
    _act_kind = "none"

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=False, padding_mode="zeros", eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None):
        super().__init__(
            *_conv_bn(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                      padding_mode, eps, momentum, affine, track_running_stats, device, dtype))


class ConvTransposeBnReLU2d(_ConvBnAct):
    """nn.Sequential(ConvTranspose2d, BatchNorm2d, ReLU), fused: the DCGAN generator block."""
    _act_kind = "relu"
    _transposed = True

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, groups=1,
                 bias=False, dilation=1, padding_mode="zeros", eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None):
        super().__init__(
            nn.ConvTranspose2d(in_channels, out_channels, kernel_size, stride, padding, output_padding, groups,
                               bias, dilation, padding_mode, device=device, dtype=dtype),
            _bn(out_channels, eps, momentum, affine, track_running_stats, device, dtype),
            nn.ReLU())
