"""Attention modules: MultiheadAttention (torch.nn's drop-in) and SelfAttention (single head)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backends as _backends
from ..errors import DtypeError
from ..ops.attention import attention as _attention

__all__ = ["MultiheadAttention", "SelfAttention", "MHA_FORWARD_ARGUMENTS"]


def _to_additive(mask: Tensor, dtype) -> Tensor:
    """torch.nn's mask convention (bool True = masked out, or additive float) -> additive."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _check_like_params(op: str, param: Tensor, **inputs) -> None:
    """Inputs must be on the parameters' device and, outside autocast, of their dtype: say which
    input, what was expected and what came (torch's own message, "mat1 and mat2 must have the
    same dtype", names neither)."""
    for name, t in inputs.items():
        if not isinstance(t, torch.Tensor):
            continue  # the shape checks say what it must be
        if t.device != param.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but the module's parameters are on "
                               f"{param.device}; expected {name} on {param.device}")
        if t.dtype != param.dtype and not torch.is_autocast_enabled(t.device.type):
            raise DtypeError(f"{op}: {name} must have the module's parameter dtype {param.dtype}, got "
                            f"{t.dtype} (convert the input, or the module with .to({t.dtype}))")


#: Every forward argument of torch.nn.MultiheadAttention and what fastbig's does with it
#: (tests/test_transformers.py checks the list against torch's own signature).
MHA_FORWARD_ARGUMENTS = {
    "query": "implemented: [L, E] / [L, B, E] / [B, L, E] (batch_first), torch's layouts",
    "key": "implemented: as query, with kdim",
    "value": "implemented: as query, with vdim",
    "key_padding_mask": "implemented: bool (True = padded) or additive float [B, S]",
    "need_weights": "False: fastbig's kernel; True (torch's default): handed back to torch's own "
                    "implementation, which returns the weights (one FastbigFallbackWarning)",
    "attn_mask": "implemented: bool (True = masked out) or additive float, [L, S] or [B*H, L, S]",
    "average_attn_weights": "handed back with need_weights=True (weights only exist there)",
    "is_causal": "implemented: the hint replaces attn_mask by the causal flag (as torch), or keeps "
                 "the mask when a key_padding_mask is given",
}


class MultiheadAttention(nn.MultiheadAttention):
    """torch.nn.MultiheadAttention with the attention itself run by fastbig.ops.attention.

    Same constructor, parameters and state_dict keys (it is a subclass), so torch checkpoints load
    as they are. forward(query, key, value, key_padding_mask=None, need_weights=True,
    attn_mask=None, average_attn_weights=True, is_causal=False) has torch's semantics:
    attn_mask / key_padding_mask bool True = NOT allowed, or additive float; is_causal is a hint
    that attn_mask is the causal mask. The fused path never materialises the attention weights,
    so need_weights=True (torch's default) runs torch's own implementation, the reference, and
    returns exactly torch's weights, with one FastbigFallbackWarning per process; pass
    need_weights=False for the fast path.
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        _check_like_params("MultiheadAttention",
                           self.in_proj_weight if self._qkv_same_embed_dim else self.q_proj_weight,
                           query=query, key=key, value=value)
        if need_weights:  # handed back to torch's own implementation, with one warning
            _backends.warn_fallback("nn.MultiheadAttention", "need_weights=True, torch's default: "
                                    "the attention weights exist only in torch's implementation, "
                                    "which ran; pass need_weights=False for fastbig's kernel")
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=True, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)
        op = "MultiheadAttention"
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() not in (2, 3):
                raise ValueError(f"{op}: {name} must be 3-D (batched) or 2-D (unbatched), got "
                                 f"{t.dim()}-D with shape {tuple(t.shape)}")
        batched = query.dim() == 3
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"{op}: query, key and value must all be batched (3-D) or all "
                             f"unbatched (2-D), got {query.dim()}-D, {key.dim()}-D, {value.dim()}-D")
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if self.batch_first:  # work in [B, S, E]
            q_in, k_in, v_in = query, key, value
        else:
            q_in, k_in, v_in = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, L, E = q_in.shape
        S = k_in.shape[1]
        if E != self.embed_dim:
            raise ValueError(f"{op}: query must have embed dim {self.embed_dim}, got {E}")
        if k_in.shape[0] != B or v_in.shape[0] != B or v_in.shape[1] != S:
            raise ValueError(f"{op}: key and value must have batch {B} and one sequence length, "
                             f"got key {tuple(key.shape)} and value {tuple(value.shape)}")
        H = self.num_heads
        hd = self.head_dim
        dtype = q_in.dtype

        # in-projection (one GEMM when it is self-attention with packed weights)
        if self._qkv_same_embed_dim:
            if q_in is k_in and k_in is v_in:
                q, k, v = F.linear(q_in, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
            else:
                w_q, w_k, w_v = self.in_proj_weight.chunk(3)
                b_q = b_k = b_v = None
                if self.in_proj_bias is not None:
                    b_q, b_k, b_v = self.in_proj_bias.chunk(3)
                q, k, v = F.linear(q_in, w_q, b_q), F.linear(k_in, w_k, b_k), F.linear(v_in, w_v, b_v)
        else:
            b_q = b_k = b_v = None
            if self.in_proj_bias is not None:
                b_q, b_k, b_v = self.in_proj_bias.chunk(3)
            q = F.linear(q_in, self.q_proj_weight, b_q)
            k = F.linear(k_in, self.k_proj_weight, b_k)
            v = F.linear(v_in, self.v_proj_weight, b_v)

        # masks in torch's convention; fastbig wants bool True = attend, or additive
        for name, m in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask)):
            if m is not None and (not isinstance(m, torch.Tensor)
                                  or (m.dtype != torch.bool and not m.is_floating_point())):
                # torch refuses these too; taken as additive, an integer 0/1 mask would be silently wrong
                raise TypeError(f"{op}: {name} must be a bool (True = masked out) or floating (additive) "
                                f"tensor, got {getattr(m, 'dtype', type(m).__name__)}")
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (L, S):
                    raise RuntimeError(f"{op}: the shape of the 2D attn_mask is "
                                       f"{tuple(attn_mask.shape)}, but should be {(L, S)}.")
                attn_mask = attn_mask[None, None]
            elif attn_mask.dim() == 3:
                if tuple(attn_mask.shape) != (B * H, L, S):
                    raise RuntimeError(f"{op}: the shape of the 3D attn_mask is "
                                       f"{tuple(attn_mask.shape)}, but should be {(B * H, L, S)}.")
                attn_mask = attn_mask.view(B, H, L, S)
            else:
                raise RuntimeError(f"{op}: attn_mask's dimension {attn_mask.dim()} is not supported")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, S):
            raise RuntimeError(f"{op}: key_padding_mask must have shape {(B, S)}, got "
                               f"{tuple(key_padding_mask.shape)}")
        causal = False
        if is_causal:
            if attn_mask is None:
                raise RuntimeError(f"{op}: Need attn_mask if specifying the is_causal hint. You may "
                                   f"use the Transformer module method `generate_square_subsequent_mask`"
                                   f" to create this mask.")
            if key_padding_mask is None:  # as torch: the hint replaces the mask
                attn_mask, causal = None, True
        mask_float = (attn_mask is not None and attn_mask.dtype != torch.bool) or \
            (key_padding_mask is not None and key_padding_mask.dtype != torch.bool)
        if mask_float:
            if attn_mask is not None:
                attn_mask = _to_additive(attn_mask, dtype)
            if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
                kp = _to_additive(key_padding_mask, dtype)[:, None, None, :]
                attn_mask = kp if attn_mask is None else attn_mask + kp
                key_padding_mask = None
        elif attn_mask is not None:
            attn_mask = ~attn_mask

        # bias_kv and zero_attn append a key (with mask columns that attend)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(B, 1, E)], dim=1)
            v = torch.cat([v, self.bias_v.expand(B, 1, E)], dim=1)
            attn_mask, key_padding_mask = self._pad_masks(attn_mask, key_padding_mask)
        q = q.view(B, L, H, hd).transpose(1, 2)
        k = k.view(B, k.shape[1], H, hd).transpose(1, 2)
        v = v.view(B, v.shape[1], H, hd).transpose(1, 2)
        if self.add_zero_attn:
            z = torch.zeros(B, H, 1, hd, dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, z], dim=2), torch.cat([v, z], dim=2)
            attn_mask, key_padding_mask = self._pad_masks(attn_mask, key_padding_mask)

        out = _attention(q, k, v, causal=causal, attn_mask=attn_mask,
                              key_padding_mask=key_padding_mask,
                              dropout_p=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(B, L, E)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
        return out, None

    @staticmethod
    def _pad_masks(attn_mask, key_padding_mask):
        """One more key that every query attends (mask value: True for bool, 0 for additive)."""
        if attn_mask is not None:
            val = True if attn_mask.dtype == torch.bool else 0.0
            attn_mask = F.pad(attn_mask, (0, 1), value=val)
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1), value=False)
        return attn_mask, key_padding_mask


class SelfAttention(nn.Module):
    """Single-head self-attention: Linear query/key/value (embed_dim -> embed_dim), scale
    1/sqrt(embed_dim), optional causal; forward(x [B, S, E], key_padding_mask bool [B, S] with
    True = padded key) -> [B, S, E]."""

    def __init__(self, embed_dim: int, bias: bool = True, causal: bool = False):
        super().__init__()
        self.embed_dim = embed_dim
        self.causal = causal
        self.query = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.key = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.value = nn.Linear(embed_dim, embed_dim, bias=bias)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"SelfAttention: x must be [B, S, {self.embed_dim}], got {shape}")
        _check_like_params("SelfAttention", self.query.weight, x=x)
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            if key_padding_mask.is_floating_point():
                raise TypeError(f"SelfAttention: key_padding_mask must be bool [B, S] (True = "
                                f"padded), got {key_padding_mask.dtype}")
            key_padding_mask = key_padding_mask != 0
        q = self.query(x)[:, None]
        k = self.key(x)[:, None]
        v = self.value(x)[:, None]
        out = _attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask,
                              scale=1.0 / math.sqrt(self.embed_dim))
        return out[:, 0]

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, causal={self.causal}"
