"""Conv + BatchNorm2d + activation oracle in plain torch: readable, differentiable, exact in float64.

    z = conv(x)                                   Conv2d or ConvTranspose2d
    train: mean, var = per-channel batch mean and biased variance of z over (N, H, W)
    eval:  mean, var = running_mean, running_var
    y = act((z - mean) / sqrt(var + eps) * weight + bias)      act: relu | leaky_relu | none

Training also gives the new running statistics, by BatchNorm2d's rules:
    num_batches_tracked += 1
    factor = momentum, or 1 / num_batches_tracked when momentum is None (cumulative average)
    running_mean = (1 - factor) * running_mean + factor * mean
    running_var  = (1 - factor) * running_var  + factor * var * n / (n - 1)   (unbiased)
They are returned as new tensors; the caller's buffers change only with ``update_in_place=True``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "leaky_relu", "none")


class RunningStats(NamedTuple):
    running_mean: Optional[torch.Tensor]
    running_var: Optional[torch.Tensor]
    num_batches_tracked: Optional[torch.Tensor]


def activation(u: torch.Tensor, act: str = "relu", negative_slope: float = 0.01) -> torch.Tensor:
    if act == "relu":
        return torch.relu(u)
    if act == "leaky_relu":
        return F.leaky_relu(u, negative_slope)
    if act == "none":
        return u
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {act!r}")


def conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, transposed=False,
         output_padding=0):
    """Conv2d, or ConvTranspose2d when ``transposed``."""
    if transposed:
        return F.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def batch_stats(z: torch.Tensor):
    """Per-channel mean and biased variance over (N, H, W), and the count n."""
    n = z.numel() // z.shape[1]
    mean = z.mean(dim=(0, 2, 3))
    var = ((z - mean[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))
    return mean, var, n


def new_running_stats(mean, var, n, running_mean, running_var, num_batches_tracked, momentum):
    """BatchNorm2d's update rule; returns new tensors, touches nothing."""
    nbt = None if num_batches_tracked is None else num_batches_tracked + 1
    if momentum is None:
        factor = 1.0 / float(nbt)
    else:
        factor = momentum
    mean, var = mean.detach(), var.detach()
    unbiased = var * n / (n - 1)
    rm = None if running_mean is None else (1 - factor) * running_mean + factor * mean.to(running_mean.dtype)
    rv = None if running_var is None else (1 - factor) * running_var + factor * unbiased.to(running_var.dtype)
    return RunningStats(rm, rv, nbt)


def bn_act(z, weight, bias, running_mean=None, running_var=None, num_batches_tracked=None, *,
           training=True, momentum: Optional[float] = 0.1, eps=1e-5, act="relu", negative_slope=0.01,
           update_in_place=False):
    """BatchNorm2d (+ activation) of z. Returns (y, RunningStats of the new buffers or None)."""
    use_batch = training or running_mean is None
    new = None
    if use_batch:
        n = z.numel() // z.shape[1]
        if n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                             f"{list(z.shape)}")
        mean, var, n = batch_stats(z)
        if training and running_mean is not None:
            new = new_running_stats(mean, var, n, running_mean, running_var, num_batches_tracked, momentum)
            if update_in_place:
                with torch.no_grad():
                    running_mean.copy_(new.running_mean)
                    running_var.copy_(new.running_var)
                    if num_batches_tracked is not None:
                        num_batches_tracked.copy_(new.num_batches_tracked)
    else:
        mean, var = running_mean, running_var
    shape = (1, -1, 1, 1)
    u = (z - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps)
    if weight is not None:
        u = u * weight.reshape(shape)
    if bias is not None:
        u = u + bias.reshape(shape)
    return activation(u, act, negative_slope), new


def conv_bn_act(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean=None, running_var=None,
                num_batches_tracked=None, *, stride=1, padding=0, dilation=1, groups=1, transposed=False,
                output_padding=0, training=True, momentum: Optional[float] = 0.1, eps=1e-5, act="relu",
                negative_slope=0.01, update_in_place=False):
    """The whole block. Returns (y, RunningStats or None)."""
    z = conv(x, conv_weight, conv_bias, stride, padding, dilation, groups, transposed, output_padding)
    return bn_act(z, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                  training=training, momentum=momentum, eps=eps, act=act, negative_slope=negative_slope,
                  update_in_place=update_in_place)


def fold(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, *, transposed=False,
         groups=1):
    """BatchNorm (eval) folded into the conv: returns (weight, bias) with conv(x, w, b) == bn(conv(x))."""
    s = torch.rsqrt(running_var + eps)
    if bn_weight is not None:
        s = s * bn_weight
    b = -running_mean * s if conv_bias is None else (conv_bias - running_mean) * s
    if bn_bias is not None:
        b = b + bn_bias
    if transposed:  # weight [C_in, C_out / groups, kh, kw]; out channel o = g * (C_out/groups) + j
        cin, cog = conv_weight.shape[:2]
        w = conv_weight.reshape(groups, cin // groups, cog, *conv_weight.shape[2:])
        w = w * s.reshape(groups, 1, cog, *([1] * (conv_weight.dim() - 2)))
        w = w.reshape(conv_weight.shape)
    else:
        w = conv_weight * s.reshape(-1, *([1] * (conv_weight.dim() - 1)))
    return w, b
