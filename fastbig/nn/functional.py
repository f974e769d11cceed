"""Drop-in functionals with torch.nn.functional's signatures and semantics."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import backends
from ..ops.attention import attention as _attention

__all__ = ["scaled_dot_product_attention", "SDPA_PARAMETERS"]

_OP = "scaled_dot_product_attention"

#: Every parameter of F.scaled_dot_product_attention, and what the drop-in does with it
#: (tests/test_transformers.py checks this against torch's own schema).
SDPA_PARAMETERS = {
    "query": "[N, ..., Hq, L, E] (rank >= 2); batch dims broadcast with key's and value's",
    "key": "[N, ..., H, S, E]; any rank >= 2 (rank 3 with a rank-4 query etc., as torch)",
    "value": "[N, ..., H, S, Ev]; Ev != E runs torch's own SDPA (one fallback warning)",
    "attn_mask": "bool (True = attend) or additive float, broadcastable to the scores "
                 "[..., L, S] (as torch's math path), kept unexpanded where it broadcasts",
    "dropout_p": "dropout on the attention probabilities whenever > 0 (as SDPA)",
    "is_causal": "top-left causal (as SDPA); exclusive with attn_mask",
    "scale": "score scale (None: 1/sqrt(E))",
    "enable_gqa": "key/value heads that divide the query heads (GQA/MQA, run without copies)",
}


def _heads(t):
    return t.shape[-3] if t.dim() >= 3 else 1


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention, running fastbig's attention, with SDPA's shape rules.

    query [N, ..., Hq, L, E], key [N, ..., H, S, E], value [N, ..., H, S, Ev]: the dims before
    the last two broadcast against each other as torch's SDPA broadcasts them (e.g. a rank-3
    query [Hq, L, E] with rank-4 key/value [N, H, S, E], or a batch of 1 against a batch of N).
    With enable_gqa, the key and value heads (dim -3) each divide the query heads (GQA/MQA);
    without it, a head count of 1 broadcasts. attn_mask bool (True = attend) or additive float,
    broadcastable to the scores [..., L, S]; is_causal is top-left aligned. Dropout applies
    whenever dropout_p > 0, as in SDPA. Value head dims other than E run torch's own SDPA, with
    one fallback warning.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{_OP}: {name} must be at least 2-D [..., L, E], got {t.dim()}-D")
    if is_causal and attn_mask is not None:
        raise RuntimeError(f"{_OP}: Explicit attn_mask should not be set when is_causal=True")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"{_OP}: attn_mask must be a torch.Tensor or None, got "
                            f"{type(attn_mask).__name__}")
    L, E = query.shape[-2:]
    S = key.shape[-2]
    if key.shape[-1] != E:
        raise ValueError(f"{_OP}: key must have embedding dim {E} (query's), got {key.shape[-1]}")
    if value.shape[-2] != S:
        raise ValueError(f"{_OP}: value must have sequence length {S} (key's), got {value.shape[-2]}")

    # heads (dim -3): GQA divides, otherwise they broadcast like the other batch dims
    Hq, Hk, Hv = _heads(query), _heads(key), _heads(value)
    if enable_gqa and min(query.dim(), key.dim(), value.dim()) < 3:
        raise RuntimeError(f"{_OP}: enable_gqa=True needs query, key and value of rank >= 3 (heads "
                           f"at dim -3, as torch's SDPA), got {query.dim()}-D, {key.dim()}-D and "
                           f"{value.dim()}-D")
    gqa = False
    if enable_gqa and query.dim() >= 3 and (Hk != Hq or Hv != Hq):
        if Hk == 0 or Hv == 0 or Hq % Hk or Hq % Hv:
            raise RuntimeError(f"{_OP}: Number of heads in key and value must divide the number of "
                               f"heads in query (enable_gqa=True), got query {Hq}, key {Hk}, "
                               f"value {Hv}")
        gqa = True
    else:
        for name, h in (("key", Hk), ("value", Hv)):
            if h != Hq and h != 1 and Hq != 1:
                raise RuntimeError(f"{_OP}: query has {Hq} heads but {name} has {h} (they do not "
                                   f"broadcast); pass enable_gqa=True for grouped-query attention "
                                   f"if {h} divides {Hq}")
    R = max(query.dim(), key.dim(), value.dim(), 3)

    def lead(t):  # dims before the heads, padded to R - 3
        s = tuple(t.shape[:-3]) if t.dim() >= 3 else ()
        return (1,) * (R - 3 - len(s)) + s
    try:
        lead_out = torch.broadcast_shapes(lead(query), lead(key), lead(value))
    except RuntimeError:
        raise RuntimeError(f"{_OP}: the batch dims of query {tuple(query.shape[:-2])}, key "
                           f"{tuple(key.shape[:-2])} and value {tuple(value.shape[:-2])} do not "
                           f"broadcast") from None
    H = Hq if gqa else max(Hq, Hk, Hv)
    out_batch = lead_out + (H,)
    Ev = value.shape[-1]
    full = out_batch + (L, S)
    if attn_mask is not None:
        extra = attn_mask.dim() - len(full)
        if extra > 0 and all(d == 1 for d in attn_mask.shape[:extra]):
            attn_mask = attn_mask.reshape(attn_mask.shape[extra:])  # leading 1s broadcast away
        try:
            ok = torch.broadcast_shapes(tuple(attn_mask.shape), full) == full
        except RuntimeError:
            ok = False
        if not ok:
            raise RuntimeError(f"{_OP}: attn_mask must be broadcastable to the scores "
                               f"{list(full)}, got {tuple(attn_mask.shape)}")
    if Ev != E:
        if backends.current() not in ("auto", "reference"):
            raise RuntimeError(f"{_OP}: backend {backends.current()!r} cannot run these inputs: "
                               f"value's head dim differs from query's")
        backends.warn_fallback(_OP, "value's head dim differs from query's")
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                              dropout_p=dropout_p, is_causal=is_causal,
                                              scale=scale, enable_gqa=enable_gqa)
    N = math.prod(lead_out)

    def as4(t, heads, last):
        """t -> [N, heads, rows, last]: leading dims expanded to lead_out (a view when they
        already are), heads as given (1 stays 1 where it broadcasts)."""
        t = t.reshape((1,) * (R - t.dim()) + tuple(t.shape)) if t.dim() < R else t
        t = t.expand(*lead_out, heads, t.shape[-2], last)
        return t.reshape(N, heads, t.shape[-2], last)

    q4 = as4(query, H, E)
    # kv heads: one count for key and value that divides H (no copies where they already agree)
    if Hk == Hv and (H % Hk == 0):
        Hkv = Hk
    elif not gqa:
        Hkv = H
    else:
        Hkv = max(Hk, Hv) if max(Hk, Hv) % min(Hk, Hv) == 0 else H

    def kv4(t, h):
        if h != Hkv:
            if t.dim() < 3:
                t = t.unsqueeze(-3)
            t = t.repeat_interleave(Hkv // h, dim=-3) if h > 1 else t.expand(
                *t.shape[:-3], Hkv, *t.shape[-2:])
        return as4(t, Hkv, t.shape[-1])
    k4, v4 = kv4(key, Hk), kv4(value, Hv)

    mask4 = None
    if attn_mask is not None:
        m = attn_mask.reshape((1,) * (len(full) - attn_mask.dim()) + tuple(attn_mask.shape))
        m_lead = tuple(m.shape[:-3])
        if all(d == 1 for d in m_lead):
            mask4 = m.reshape(1, *m.shape[-3:])
        else:
            mask4 = m.expand(*lead_out, *m.shape[-3:]).reshape(N, *m.shape[-3:])
    out = _attention(q4, k4, v4, causal=bool(is_causal), attn_mask=mask4, dropout_p=dropout_p,
                     scale=scale)
    out = out.reshape(*out_batch, L, E)
    if query.dim() == 2 and key.dim() == 2 and value.dim() == 2:
        out = out.reshape(L, E)
    return out
