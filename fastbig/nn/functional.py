"""Drop-in functionals with torch.nn.functional's signatures and semantics."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backends
from ..ops.attention import _check_heads, attention as _attention

__all__ = ["scaled_dot_product_attention"]

_OP = "scaled_dot_product_attention"


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention, running fastbig's attention.

    query [N, ..., Hq, L, E], key [N, ..., H, S, E], value [N, ..., H, S, Ev]; attn_mask bool
    (True = attend) or additive float, broadcastable to [N, ..., Hq, L, S]; is_causal is
    top-left aligned; enable_gqa lets Hq be a multiple of H. Dropout applies whenever
    dropout_p > 0, as in SDPA. Shapes fastbig's kernel cannot take (Ev != E, key batch dims that
    only broadcast to query's) run torch's own SDPA, with one fallback warning.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{_OP}: {name} must be at least 2-D [..., L, E], got {t.dim()}-D")
    if is_causal and attn_mask is not None:
        raise RuntimeError(f"{_OP}: Explicit attn_mask should not be set when is_causal=True")
    if query.dim() != key.dim() or key.dim() != value.dim():
        raise ValueError(f"{_OP}: query, key and value must have one rank, got "
                         f"{query.dim()}-D, {key.dim()}-D and {value.dim()}-D")
    L, E = query.shape[-2:]
    S = key.shape[-2]
    if key.shape[-1] != E:
        raise ValueError(f"{_OP}: key must have embedding dim {E} (query's), got {key.shape[-1]}")
    if value.shape[-2] != S:
        raise ValueError(f"{_OP}: value must have sequence length {S} (key's), got {value.shape[-2]}")
    if query.dim() >= 3:
        Hq, Hk = query.shape[-3], key.shape[-3]
        if Hq != Hk:
            if not enable_gqa:
                raise RuntimeError(f"{_OP}: query has {Hq} heads but key has {Hk}; pass "
                                   f"enable_gqa=True for grouped-query attention")
            _check_heads(_OP, Hq, Hk)
        if value.shape[-3] != Hk:
            raise ValueError(f"{_OP}: value must have {Hk} heads (key's), got {value.shape[-3]}")

    lead_q, lead_k = query.shape[:-3], key.shape[:-3]
    if value.shape[-1] != E or lead_q != lead_k or value.shape[:-3] != lead_k:
        why = ("value's head dim differs from query's" if value.shape[-1] != E
               else "key's batch dims only broadcast to query's")
        if backends.current() not in ("auto", "reference"):
            raise RuntimeError(f"{_OP}: backend {backends.current()!r} cannot run these inputs: {why}")
        backends.warn_fallback(_OP, why)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                              dropout_p=dropout_p, is_causal=is_causal,
                                              scale=scale, enable_gqa=enable_gqa)
    if isinstance(attn_mask, torch.Tensor) and attn_mask.dim() < 2:
        attn_mask = attn_mask[(None,) * (2 - attn_mask.dim())]
    if query.dim() == 4:
        return _attention(query, key, value, causal=is_causal, attn_mask=attn_mask,
                               dropout_p=dropout_p, scale=scale)
    # Any other rank: fold the leading dims into one batch dim (heads at -3 stay heads).
    if query.dim() == 2:
        q4, k4, v4 = query[None, None], key[None, None], value[None, None]
    else:
        q4 = query.reshape(-1, *query.shape[-3:])
        k4 = key.reshape(-1, *key.shape[-3:])
        v4 = value.reshape(-1, *value.shape[-3:])
    mask4 = attn_mask
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"{_OP}: attn_mask must be a torch.Tensor or None, got "
                            f"{type(attn_mask).__name__}")
        full = tuple(query.shape[:-2]) + (L, S)
        try:
            mask4 = attn_mask.expand(full).reshape(q4.shape[0], q4.shape[1], L, S)
        except RuntimeError:
            raise ValueError(f"{_OP}: attn_mask must be broadcastable to {list(full)}, got "
                             f"{tuple(attn_mask.shape)}") from None
    out = _attention(q4, k4, v4, causal=is_causal, attn_mask=mask4, dropout_p=dropout_p,
                          scale=scale)
    return out.reshape(*query.shape[:-1], E)
