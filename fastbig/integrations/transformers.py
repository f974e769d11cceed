"""Hugging Face ``transformers`` models, with their attention run by fastbig.

``install(model, report)`` (what ``fastbig.accelerate`` calls) registers a "fastbig" attention
function and a "fastbig" mask function with transformers' ``AttentionInterface`` and
``AttentionMaskInterface`` and points the model's configs at them. The rule everywhere here:
the answer is the one the model's *stock* path gives (what it ran before: ``sdpa`` where the model
supports it, else its module's ``eager_attention_forward``), or the call is handed back to that
stock path. A correct slower answer beats a fast wrong one.

The stock path of each config is remembered in the config itself: its ``_attn_implementation``
becomes :class:`FastbigImpl`, a ``str`` equal to ``"fastbig"`` that also carries ``.stock``
("sdpa" or "eager"); transformers never serializes that attribute, and it survives deepcopy and
pickling of the model.

Masks (:func:`fastbig_mask`). transformers builds a mask from a *mask function* (a closure tree
made of ``causal_mask_function``, ``sliding_window_overlay(w)``, ``and_masks(...)``, packed
sequence ids, ...), offsets (a KV cache) and the 2-D padding mask. The fastbig mask function
returns what the stock mask function would return where that is ``None`` (the stock attention
then runs plain causal / full attention, and so does fastbig); otherwise, when it can decode the
closure tree exactly, a :class:`StructuredMask`: a tensor that *looks like* the stock dense mask
(shape ``[B, 1, Sq, Sk]``, the stock dtype) but holds the structure: causal/window bounds
relative to the diagonal, the KV-cache offset (bottom-right alignment), the key padding, packed
sequence ids. The attention function reads that structure and passes flags, a window and a
``key_padding_mask`` (or ``attention_varlen`` for packed rows) to the kernel; no dense mask is
built. Any torch operation on a StructuredMask (a model that slices or adds to its mask)
materializes the exact stock dense mask first, so such models see what they always saw, and
the attention function then gets a plain tensor, which it decodes as a dense mask. Anything
not recognized (or_masks, chunked or blockwise overlays, tensor offsets of a static cache,
tracing/compiling) is built by the stock mask function: dense, correct, slower.

Keywords (:data:`IMPLEMENTED`, :data:`HANDED_BACK`). The attention function implements every
keyword transformers passes it (dropout, scaling, is_causal, sliding_window, softcap, s_aux
sinks, position_bias, the packed-sequence keywords, ...) or hands the call back to the stock
path, with one warning per reason. A keyword in neither table is handed back too, unless its value is None (and
tests/test_transformers.py fails for it, so a keyword that a new transformers adds is noticed).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import io
import math
import re
import sys
import textwrap
import tokenize
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch

NAME = "fastbig"

# ---------------------------------------------------------------------------------------------
# The keyword tables
# ---------------------------------------------------------------------------------------------
#: Keywords the fastbig attention function implements (keyword -> how).
IMPLEMENTED: Dict[str, str] = {
    "query": "q [B, Hq, Sq, D] (also taken by keyword)",
    "key": "k [B, Hkv, Sk, D] (also taken by keyword)",
    "value": "v [B, Hkv, Sk, Dv] (also taken by keyword); Dv != D (DeepSeek's MLA): the narrower "
             "side padded with zeros, exact",
    "attention_mask": "None, a StructuredMask (decoded to flags/window/padding/varlen), or a dense "
                      "bool / additive float 4-D mask",
    "dropout": "dropout_p (sdpa stock: whenever > 0, as SDPA; eager stock: only in training, "
               "as nn.functional.dropout(training=module.training))",
    "scaling": "scale (None: 1/sqrt(D), as both stock paths)",
    "is_causal": "used when the mask is None, as sdpa_attention_forward (q_len > 1, top-left); "
                 "a mask, when given, decides (as in the stock paths)",
    "sliding_window": "carried by the mask, as in the stock sdpa/eager paths (which read the "
                      "window from the mask, not from this keyword)",
    "softcap": "softcap (tanh capping of the scaled scores before the mask, as the eager path)",
    "s_aux": "sinks (one logit per query head in the softmax denominator, as GPT-OSS's eager)",
    "position_bias": "additive attention mask (may require grad), combined with the mask as "
                     "transformers' sdpa path does (create_position_bias_mask)",
    "position_ids": "the packing they imply is in the mask transformers built from them "
                    "(packed rows -> fastbig.ops.attention_varlen)",
    "cu_seq_lens_q": "packed sequences: fastbig.ops.attention_varlen when they agree with the "
                     "mask's packing (handed back otherwise: the stock path ignores them)",
    "cu_seq_lens_k": "as cu_seq_lens_q",
    "max_length_q": "as cu_seq_lens_q",
    "max_length_k": "as cu_seq_lens_q",
    "output_attentions": "False/None: nothing to do (True is handed back, see HANDED_BACK)",
    "use_cache": "no effect on attention (the cache is updated before the call)",
    "output_hidden_states": "no effect on attention",
    "output_router_logits": "no effect on attention",
    "num_items_in_batch": "no effect on attention (a loss normalizer)",
    "seq_idx": "no effect on attention (the sdpa/eager paths ignore it; packing comes from the mask)",
    "deterministic": "no effect (a flash-attention hint; the sdpa/eager paths ignore it)",
    "encoder_hidden_states": "no effect (BERT-style layers pass it through; k/v were already "
                             "projected from it, and the stock paths ignore it)",
}

#: Keywords (or values of them) that hand the call back to the stock path (keyword -> why).
HANDED_BACK: Dict[str, str] = {
    "output_attentions": "True: the attention weights, which only the stock (eager) path returns",
    "sinks": "per-query sink logits [..., Sq, 1] (inkling2); fastbig's sinks are one per head",
    "indices": "sparse attention over selected keys (dots3_note)",
    "block_indices": "block-sparse attention (minimax_m3_vl)",
    "head_mask": "a per-head multiplier of the attention probabilities",
}

#: Fingerprints of stock ``eager_attention_forward`` functions whose semantics fastbig's
#: implementation has been checked against (tests/test_transformers.py). A model whose stock path
#: is an eager function not listed here is left as it is.
VERIFIED_EAGER: Dict[str, str] = {
    "eedaaa7a051c373e": "llama (mistral, qwen2, ...): scale, mask, softmax, dropout",
    "5dcf5750d119ab90": "gemma2 (gemma3, vaultgemma, t5gemma): + softcap before the mask",
    "4a6da82eae79100a": "gpt_oss (deepseek_v4, hy_v4): + per-head sinks (s_aux)",
    "415c3487cc52e8ac": "bart (bert, pegasus_x, nllb_moe, ...): no GQA",
}

_STOCK_KINDS = ("sdpa", "eager")


class FastbigImpl(str):
    """``"fastbig"``, remembering the stock attention implementation (``.stock``) it replaced."""

    def __new__(cls, stock: str = "sdpa"):
        s = super().__new__(cls, NAME)
        s.stock = stock
        return s

    def __reduce__(self):
        return (FastbigImpl, (self.stock,))

    def __deepcopy__(self, memo):
        return FastbigImpl(self.stock)

    def __copy__(self):
        return FastbigImpl(self.stock)


def _stock_of(config) -> str:
    impl = getattr(config, "_attn_implementation", None) if config is not None else None
    return getattr(impl, "stock", "sdpa")


# ---------------------------------------------------------------------------------------------
# Warnings: once per reason
# ---------------------------------------------------------------------------------------------
class FastbigHandBackWarning(UserWarning):
    """A transformers attention call ran the model's stock path instead of fastbig's kernel."""


_warned = set()
_warned_lock = threading.Lock()


def _warn_once(reason: str) -> None:
    with _warned_lock:
        if reason in _warned:
            return
        _warned.add(reason)
    warnings.warn(f"fastbig attention (transformers): {reason}; this call ran the model's stock "
                  f"attention path (same result, not fastbig's kernel). Warned once.",
                  FastbigHandBackWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------
# What fastbig.ops can do (the feature kwargs land in ops one by one)
# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# Eager functions: which one is the stock, and is it verified
# ---------------------------------------------------------------------------------------------
def fingerprint(fn) -> Optional[str]:
    """A hash of a function's tokens (comments, blank lines and docstring left out); None if the
    source is not available."""
    try:
        src = textwrap.dedent(inspect.getsource(fn))
        node = ast.parse(src).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return None
    skip = set()
    body = getattr(node, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        skip = set(range(body[0].lineno, body[0].end_lineno + 1))
    toks = []
    for t in tokenize.generate_tokens(io.StringIO(src).readline):
        if t.type in (tokenize.COMMENT, tokenize.NL) or t.start[0] in skip:
            continue
        toks.append({tokenize.INDENT: "{", tokenize.DEDENT: "}", tokenize.NEWLINE: ";"}
                    .get(t.type, t.string))
    return hashlib.sha256(" ".join(toks).encode()).hexdigest()[:16]


def stock_eager(module) -> Optional[Any]:
    """The eager attention function the module's own code falls back to (the default of its
    ``ALL_ATTENTION_FUNCTIONS.get_interface(..., default)`` call), or None if not found."""
    mod = sys.modules.get(type(module).__module__)
    if mod is None:
        return None
    name = "eager_attention_forward"
    try:
        src = inspect.getsource(type(module).forward)
        m = re.search(r"get_interface\(\s*[^,]+,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)", src)
        if m:
            name = m.group(1)
    except (OSError, TypeError):
        pass
    fn = getattr(mod, name, None)
    return fn if callable(fn) else None


# ---------------------------------------------------------------------------------------------
# The mask function and the structured mask
# ---------------------------------------------------------------------------------------------
@dataclass
class MaskInfo:
    """What a StructuredMask stands for. Allowed (query i, key j) of the [Sq, Sk] block:
    lo <= j - (i + diag) <= hi (None = unbounded), key j not padded, and (packed) query and key
    in the same segment."""
    stock: str                        # "sdpa" | "eager"
    kwargs: dict                      # the mask function's arguments (to build the stock mask)
    q_length: int
    kv_length: int
    diag: int                         # q_offset - kv_offset
    lo: Optional[int]
    hi: Optional[int]
    padding: Optional[torch.Tensor]   # bool [B, Sk], True = attend (None: no padding)
    packed: Optional[torch.Tensor]    # int [B, S] segment ids (None: not packed)
    _dense: Any = field(default=None, repr=False)
    _empty: Any = field(default=None, repr=False)     # (empty_rows(),) once computed

    def dense(self):
        """The exact mask the stock mask function gives for these arguments."""
        if self._dense is None:
            self._dense = _stock_mask_fn(self.stock)(**self.kwargs)
        return self._dense

    def empty_rows(self) -> Optional[torch.Tensor]:
        """The query rows that may attend no key at all, bool [B|1, Sq], or None when there are
        none: O(B*(Sq+Sk)), with prefix counts of the attendable keys. Computed once per mask
        (every layer that shares the mask shares the answer)."""
        if self._empty is None:
            self._empty = (_empty_rows(self),)
        return self._empty[0]


_META = None


def _meta_funcs():
    global _META
    if _META is None:
        T = torch.Tensor
        _META = {T.shape.__get__, T.dtype.__get__, T.device.__get__, T.ndim.__get__,
                 T.is_cuda.__get__, T.requires_grad.__get__, T.layout.__get__, T.dim, T.size,
                 T.is_floating_point, T.__len__, T.numel, T.element_size, T.is_sparse.__get__,
                 T.is_nested.__get__, T.is_meta.__get__, T.grad_fn.__get__, T.is_leaf.__get__}
    return _META


class StructuredMask(torch.Tensor):
    """A stand-in for the stock [B, 1, Sq, Sk] mask that carries its structure (``.fastbig``).
    Metadata (shape, dtype, device) reads as the stock mask's; any other torch operation first
    materializes the stock dense mask and runs on it."""

    @staticmethod
    def __new__(cls, info: MaskInfo, shape, dtype, device):
        stand_in = torch.empty((), dtype=dtype, device=device).expand(*shape)
        t = torch.Tensor._make_subclass(cls, stand_in, False)
        t.fastbig = info
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _meta_funcs():
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)

        def dense(x):
            return x.fastbig.dense() if isinstance(x, StructuredMask) else x
        args = torch.utils._pytree.tree_map(dense, args)
        kwargs = torch.utils._pytree.tree_map(dense, kwargs)
        return func(*args, **kwargs)

    def __repr__(self, *a, **k):
        return f"StructuredMask({self.fastbig.dense()!r})"

    def __reduce_ex__(self, proto):  # pickles / deep-copies as the plain stock mask
        return self.fastbig.dense().__reduce_ex__(proto)

    def __deepcopy__(self, memo):
        d = self.fastbig.dense()
        return d.clone() if d is not None else None


def _stock_mask_fn(stock: str):
    from transformers import masking_utils as mu
    return mu.eager_mask if stock == "eager" else mu.sdpa_mask


@functools.lru_cache(maxsize=None)
def _mask_codes():
    """Code objects of transformers' mask-function closures, to recognize them exactly."""
    from transformers import masking_utils as mu
    codes = {}
    z = torch.zeros(1, 1, dtype=torch.long)
    makers = {
        "and": lambda: mu.and_masks(mu.causal_mask_function),
        "sliding": lambda: mu.sliding_window_overlay(1),
        "sliding_bidir": lambda: mu.sliding_window_bidirectional_overlay(1),
        "packed": lambda: mu.packed_sequence_mask_function(z),
        "remap": lambda: mu.remap_positions_for_packed_sequence(mu.causal_mask_function, z),
    }
    for k, mk in makers.items():
        try:
            codes[k] = mk().__code__
        except Exception:  # not in this transformers: that closure is simply not recognized
            pass
    codes["causal"] = getattr(mu, "causal_mask_function", None)
    codes["bidir"] = getattr(mu, "bidirectional_mask_function", None)
    return codes


def _closure(fn) -> dict:
    cells = fn.__closure__ or ()
    return {n: c.cell_contents for n, c in zip(fn.__code__.co_freevars, cells)}


class _Unknown(Exception):
    pass


def _decode_fn(fn, atoms: list, in_remap: bool = False) -> None:
    """Append the atoms of an and-tree of known mask functions; raise _Unknown otherwise."""
    codes = _mask_codes()
    if fn is codes.get("causal"):
        atoms.append(("causal",))
        return
    if fn is codes.get("bidir"):
        return  # q_idx >= 0: always true
    code = getattr(fn, "__code__", None)
    if code is None or not hasattr(fn, "__closure__"):
        raise _Unknown
    if code is codes.get("and"):
        for f in _closure(fn).get("mask_functions", ()):
            _decode_fn(f, atoms, in_remap)
        return
    for kind in ("sliding", "sliding_bidir"):
        if code is codes.get(kind):
            w = _closure(fn).get("sliding_window")
            if not isinstance(w, int) or isinstance(w, bool):
                raise _Unknown
            atoms.append((kind, w))
            return
    if code is codes.get("packed") and not in_remap:
        atoms.append(("packed", _closure(fn).get("packed_sequence_mask")))
        return
    if code is codes.get("remap") and not in_remap:
        cv = _closure(fn)
        inner = []
        _decode_fn(cv.get("mask_function"), inner, in_remap=True)
        atoms.append(("remap", cv.get("position_ids"), inner))
        return
    raise _Unknown


def _segments(position_ids: torch.Tensor) -> torch.Tensor:
    """transformers' find_packed_sequence_indices, without its 'not packed' shortcut."""
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


def _structure(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
               attention_mask, stock, kwargs) -> Optional[MaskInfo]:
    """MaskInfo for the arguments, or None when they are not decoded exactly."""
    from transformers import masking_utils as mu
    if not all(isinstance(x, int) and not isinstance(x, bool)
               for x in (batch_size, q_length, kv_length, q_offset, kv_offset)):
        return None  # e.g. a static cache's tensor offset
    atoms = []
    try:
        _decode_fn(mask_function, atoms)
    except _Unknown:
        return None
    lo = hi = None
    packed = None
    remaps = []

    def apply(a):
        nonlocal lo, hi
        if a[0] == "causal":
            hi = 0 if hi is None else min(hi, 0)
        elif a[0] == "sliding":       # kv > q - w  ->  j - (i + d) >= 1 - w
            lo = 1 - a[1] if lo is None else max(lo, 1 - a[1])
        elif a[0] == "sliding_bidir":  # |q - kv| <= w
            lo = -a[1] if lo is None else max(lo, -a[1])
            hi = a[1] if hi is None else min(hi, a[1])
        else:
            raise _Unknown
    try:
        for a in atoms:
            if a[0] == "packed":
                if packed is not None:
                    return None
                packed = a[1]
            elif a[0] == "remap":
                remaps.append(a)
                for inner in a[2]:
                    apply(inner)
            else:
                apply(a)
    except _Unknown:
        return None
    if remaps or packed is not None:
        # positions remapped within packed segments: exact iff the segments are those of the
        # position ids (there, position differences equal index differences), without offsets
        if packed is None or len(remaps) != 1 or q_offset or kv_offset or q_length != kv_length:
            return None
        pos = remaps[0][1]
        if not isinstance(pos, torch.Tensor) or not isinstance(packed, torch.Tensor) or \
                pos.dim() != 2 or tuple(packed.shape) != (batch_size, q_length):
            return None
        pos = pos.expand(batch_size, -1)
        if pos.shape[1] != q_length or not torch.equal(_segments(pos), packed.to(pos.device)):
            return None
    padding = None
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or \
                attention_mask.dtype != torch.bool:
            return None
        pm = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        pm = pm[:, kv_offset:kv_offset + kv_length]
        if pm.shape != (batch_size, kv_length):
            return None
        if not bool(pm.all()):
            padding = pm
    if packed is not None and padding is not None:
        return None
    return MaskInfo(stock, kwargs, q_length, kv_length, q_offset - kv_offset, lo, hi, padding, packed)


_MASK_PARAMS = None


def fastbig_mask(*args, **kwargs):
    """transformers' mask-interface function for "fastbig": None where the stock mask function
    gives None, a StructuredMask where the arguments decode exactly, else the stock dense mask."""
    global _MASK_PARAMS
    from transformers import masking_utils as mu
    if _MASK_PARAMS is None:
        _MASK_PARAMS = inspect.signature(mu.sdpa_mask)
    stock = _stock_of(kwargs.get("config"))
    stock_fn = _stock_mask_fn(stock)
    try:
        bound = _MASK_PARAMS.bind(*args, **kwargs)
    except TypeError:
        return stock_fn(*args, **kwargs)
    bound.apply_defaults()
    a = dict(bound.arguments)
    extra = a.pop("kwargs", {})
    a.update(extra)
    call_kwargs = dict(kwargs)
    if args:  # keep the stock call exact: everything by name
        call_kwargs = {k: v for k, v in a.items()}
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or a.get("use_vmap"):
        return stock_fn(**call_kwargs)
    q_length, kv_length = a["q_length"], a["kv_length"]
    q_offset, kv_offset = a["q_offset"], a["kv_offset"]
    attention_mask = a["attention_mask"]
    # Where the stock mask function gives None, so does this one (the attention function then
    # runs exactly what the stock attention does with no mask).
    try:
        padding_mask = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        if stock == "sdpa" and a.get("allow_is_causal_skip", True) and mu._ignore_causal_mask_sdpa(
                padding_mask, q_length, kv_length, q_offset, kv_offset, a.get("local_size")):
            return None
        if a.get("allow_is_bidirectional_skip", False) and mu._ignore_bidirectional_mask_sdpa(
                padding_mask, kv_length, a.get("local_size")):
            return None
    except AttributeError:  # transformers moved its helpers: build the stock mask
        return stock_fn(**call_kwargs)
    info = _structure(a["batch_size"], q_length, kv_length, q_offset, kv_offset,
                      a["mask_function"], attention_mask, stock, call_kwargs)
    if info is None:
        return stock_fn(**call_kwargs)
    dtype = a.get("dtype", torch.float32) if stock == "eager" else torch.bool
    return StructuredMask(info, (a["batch_size"], 1, q_length, kv_length), dtype,
                          torch.device(a.get("device", "cpu")))


# ---------------------------------------------------------------------------------------------
# The attention function
# ---------------------------------------------------------------------------------------------
class _HandBack(Exception):
    pass


def _stock_call(stock, module, query, key, value, attention_mask, kwargs):
    if isinstance(attention_mask, StructuredMask):
        attention_mask = attention_mask.fastbig.dense()
    if stock == "eager":
        fn = stock_eager(module)
        if fn is None:
            raise RuntimeError(f"fastbig attention: {type(module).__name__}'s stock eager attention "
                               f"function was not found")
    else:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward as fn
    return fn(module, query, key, value, attention_mask, **kwargs)


def _window_for(info_lo, info_hi, diag, Sq, Sk):
    """(causal, window, bottom_right) for fastbig with allowed lo <= j - (i + diag) <= hi."""
    offs = [0]
    if Sk - Sq != 0:
        offs = [Sk - Sq, 0] if diag == Sk - Sq else [0, Sk - Sq]
    for off in offs:
        left = None if info_lo is None else off - diag - info_lo
        right = None if info_hi is None else diag + info_hi - off
        if (left is not None and left < 0) or (right is not None and right < 0):
            continue
        # drop bounds that bind no (i, j) of the block
        if right is not None and off + right >= Sk - 1:
            right = None
        if left is not None and Sq - 1 + off - left <= 0:
            left = None
        if left is None and right is None:
            return False, None, False
        if left is None and right == 0:
            return True, None, off != 0
        return False, (-1 if left is None else left, -1 if right is None else right), off != 0
    raise _HandBack("the mask's diagonal offset fits neither top-left nor bottom-right "
                    "alignment in fastbig.ops.attention")


def _cu_from_segments(packed: torch.Tensor) -> Tuple[torch.Tensor, int]:
    B, S = packed.shape
    starts = torch.ones(B, S, dtype=torch.bool, device=packed.device)
    starts[:, 1:] = packed[:, 1:] != packed[:, :-1]
    idx = torch.nonzero(starts.reshape(-1), as_tuple=False).flatten()
    cu = torch.cat([idx, idx.new_tensor([B * S])]).to(torch.int32)
    return cu, int(cu.diff().max())


def fastbig_attention(module, query, key, value, attention_mask=None, **kwargs):
    """transformers' attention-function signature: q/k/v [B, H, S, D], attention_mask (see the
    module doc) -> (out [B, Sq, Hq, D], None). Runs fastbig, or the stock path (see above)."""
    stock = _stock_of(getattr(module, "config", None))
    try:
        out = _fastbig_call(stock, module, query, key, value, attention_mask, kwargs)
    except _HandBack as e:
        _warn_once(str(e))
        return _stock_call(stock, module, query, key, value, attention_mask, kwargs)
    return out.transpose(1, 2).contiguous(), None


_OPS = None


def _fastbig_call(stock, module, query, key, value, attention_mask, kwargs):
    global _OPS
    if _OPS is None:
        import importlib
        _OPS = importlib.import_module("fastbig.ops.attention")
    attention, attention_varlen = _OPS.attention, _OPS.attention_varlen
    # a keyword given as None is not given (transformers threads optional inputs through **kwargs)
    unknown = sorted(k for k, v in kwargs.items() if k not in IMPLEMENTED and v is not None)
    if unknown:
        known = [k for k in unknown if k in HANDED_BACK]
        raise _HandBack(f"keyword(s) {unknown}: " + ("; ".join(HANDED_BACK[k] for k in known)
                                                     if known else "not implemented by fastbig"))
    if kwargs.get("output_attentions"):
        raise _HandBack("output_attentions=True: " + HANDED_BACK["output_attentions"])
    if stock == "eager" and stock_eager(module) is None:
        raise RuntimeError(f"fastbig attention: {type(module).__name__}'s stock eager function "
                           f"was not found")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise _HandBack(f"{name} is not a 4-D tensor")
    B, Hq, Sq, D = query.shape
    if key.shape[:3] != value.shape[:3] or key.shape[0] != B or key.shape[3] != D or \
            key.shape[1] == 0 or Hq % key.shape[1]:
        raise _HandBack(f"shapes q {tuple(query.shape)}, k {tuple(key.shape)}, v {tuple(value.shape)} "
                        f"(fastbig needs one batch, one q/k head dim, Hq % Hkv == 0)")
    if not (query.dtype == key.dtype == value.dtype):
        raise _HandBack("q, k and v have different dtypes")
    Dv = value.shape[3]
    if Dv != D and min(D, Dv) > 0:
        # a value head dim of its own (DeepSeek-V2/V3's MLA: q/k 192, v 128): fastbig's kernels
        # take one head dim, so the narrower side is padded with zeros, which is exact (zero
        # columns of v give zero output columns, sliced off; zero columns of q and k add nothing
        # to the scores, and the scale stays the one of the q/k head dim)
        kwargs = dict(kwargs)
        if kwargs.get("scaling") is None:
            kwargs["scaling"] = 1.0 / math.sqrt(D)
        if Dv < D:
            value = torch.nn.functional.pad(value, (0, D - Dv))
        else:
            query = torch.nn.functional.pad(query, (0, Dv - D))
            key = torch.nn.functional.pad(key, (0, Dv - D))
        return _fastbig_call(stock, module, query, key, value, attention_mask, kwargs)[..., :Dv]
    Sk = key.shape[2]

    dropout = float(kwargs.get("dropout", 0.0) or 0.0)
    if stock == "eager" and not module.training:
        dropout = 0.0
    scale = kwargs.get("scaling", None)
    scale = None if scale is None else float(scale)
    feats = {}
    softcap = kwargs.get("softcap", None)
    if softcap is not None and float(softcap) != 0.0:
        feats["softcap"] = float(softcap)
    sinks = kwargs.get("s_aux", None)
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or sinks.dim() != 1 or sinks.shape[0] != Hq:
            raise _HandBack(f"s_aux of shape {tuple(getattr(sinks, 'shape', ()))} (fastbig's sinks "
                            f"are one logit per query head, [{Hq}])")
        feats["sinks"] = sinks
    position_bias = kwargs.get("position_bias", None)
    common = dict(dropout_p=dropout, scale=scale, **feats)

    cu_kw = [kwargs.get(k) for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")]
    has_cu = any(x is not None for x in cu_kw)

    # ---- masks -------------------------------------------------------------------------------
    if position_bias is not None:
        if not isinstance(position_bias, torch.Tensor):
            raise _HandBack("position_bias is not a tensor")
        if has_cu:
            raise _HandBack("cu_seq_lens_* with a position bias (the stock path ignores them)")
        mask = attention_mask.fastbig.dense() if isinstance(attention_mask, StructuredMask) \
            else attention_mask
        if stock == "sdpa":
            causal = Sq > 1 and mask is None and _is_causal(module, kwargs)
            pb = position_bias
            if mask is None:
                if causal:
                    allowed = torch.ones(Sq, Sk, dtype=torch.bool, device=query.device).tril()
                    add = torch.where(allowed, pb, torch.finfo(key.dtype).min)
                else:
                    add = pb
            elif mask.dtype == torch.bool:
                add = torch.where(mask, pb, torch.finfo(key.dtype).min)
            else:
                add = pb + mask
        else:
            if mask is not None and mask.dtype == torch.bool:
                raise _HandBack("a bool mask on an eager model (eager adds it as numbers)")
            add = position_bias if mask is None else position_bias + mask
        add = _check_dense(add, B, Hq, Sq, Sk)
        return attention(query, key, value, attn_mask=add.to(query.dtype), **common)

    if attention_mask is None:
        if has_cu:
            raise _HandBack("cu_seq_lens_* without a packed mask (the stock path ignores them)")
        causal = stock == "sdpa" and Sq > 1 and _is_causal(module, kwargs)
        return attention(query, key, value, causal=causal, **common)

    if isinstance(attention_mask, StructuredMask):
        info = attention_mask.fastbig
        if info.q_length != Sq or info.kv_length != Sk or \
                (info.padding is not None and info.padding.shape[0] != B):
            raise _HandBack("a structured mask whose sizes differ from q/k")
        if info.packed is not None:
            return _packed(query, key, value, info, cu_kw, common, attention_varlen)
        if has_cu:
            raise _HandBack("cu_seq_lens_* without a packed mask (the stock path ignores them)")
        empty = info.empty_rows() if stock == "eager" and "sinks" not in feats else None
        if empty is not None and dropout > 0:
            raise _HandBack("query rows that see no key (padding) on an eager model with dropout")
        causal, window, bottom_right = _window_for(info.lo, info.hi, info.diag, Sq, Sk)
        kpm = None if info.padding is None else ~info.padding.to(query.device)
        extra = {"bottom_right": True} if bottom_right else {}
        out = attention(query, key, value, causal=causal, window=window, key_padding_mask=kpm,
                        **extra, **common)
        if empty is not None:
            out = _eager_empty_rows(out, query, key, value, empty, scale, feats.get("softcap"))
        return out

    # a dense mask (a model's own, or one it changed)
    if has_cu:
        raise _HandBack("cu_seq_lens_* with a dense mask (the stock path ignores them)")
    if not isinstance(attention_mask, torch.Tensor):
        raise _HandBack(f"an attention mask of type {type(attention_mask).__name__}")
    if attention_mask.dtype == torch.bool:
        if stock == "eager":
            raise _HandBack("a bool mask on an eager model (eager adds it as numbers)")
        mask = attention_mask
    elif attention_mask.is_floating_point():
        mask = attention_mask.to(query.dtype)
    else:
        raise _HandBack(f"an attention mask of dtype {attention_mask.dtype}")
    mask = _check_dense(mask, B, Hq, Sq, Sk)
    return attention(query, key, value, attn_mask=mask, **common)


def _is_causal(module, kwargs) -> bool:
    c = kwargs.get("is_causal", None)
    return bool(c if c is not None else getattr(module, "is_causal", True))


def _empty_rows(info: "MaskInfo") -> Optional[torch.Tensor]:
    """MaskInfo.empty_rows, uncached."""
    if info.padding is None and info.lo is None and info.hi is None:
        return None
    Sq, Sk = info.q_length, info.kv_length
    dev = info.padding.device if info.padding is not None else torch.device("cpu")
    keys = info.padding.long() if info.padding is not None else \
        torch.ones(1, Sk, dtype=torch.long, device=dev)
    count = torch.nn.functional.pad(keys.cumsum(1), (1, 0))       # count[:, t]: keys in [0, t)
    i = torch.arange(Sq, device=dev) + info.diag
    first = (i + info.lo).clamp(0, Sk) if info.lo is not None else torch.zeros_like(i)
    last = (i + info.hi).clamp(-1, Sk - 1) if info.hi is not None else torch.full_like(i, Sk - 1)
    n = count[:, (last + 1).clamp(min=0)] - count[:, first]
    empty = (n <= 0) | (last < first)
    return empty if bool(empty.any()) else None


def _eager_empty_rows(out, query, key, value, empty, scale, softcap):
    """out with the rows that see no key replaced by what the eager path gives them. It adds
    finfo.min to every score of such a row: all equal, the softmax is uniform over all keys (the
    output is the mean of v), and autograd still carries that uniform softmax's gradient to the
    scores, so q and k get one (fastbig's masked kernel gives these rows 0 and no gradient).
    softmax(s - s.detach()) has those values and that gradient; computed for these rows only."""
    B, Hq, Sq, D = query.shape
    groups = Hq // key.shape[1]
    b, i = torch.nonzero(empty.expand(B, Sq).to(query.device), as_tuple=True)
    k = key[b].repeat_interleave(groups, 1)                      # [n, Hq, Sk, D]
    v = value[b].repeat_interleave(groups, 1)
    q = query[b, :, i]                                           # [n, Hq, D]
    s = torch.einsum("nhd,nhkd->nhk", q, k) * (1.0 / math.sqrt(D) if scale is None else scale)
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    p = torch.softmax(s - s.detach(), dim=-1, dtype=torch.float32).to(query.dtype)
    rows = torch.einsum("nhk,nhkd->nhd", p, v)
    out = out.clone()
    out[b, :, i] = rows.to(out.dtype)
    return out


def _check_dense(mask, B, Hq, Sq, Sk):
    full = (B, Hq, Sq, Sk)
    if mask.dim() != 4 or any(m not in (1, f) for m, f in zip(mask.shape, full)):
        raise _HandBack(f"a dense mask of shape {tuple(mask.shape)} for scores {list(full)}")
    return mask


def _packed(query, key, value, info, cu_kw, common, attention_varlen):
    B, Hq, S, D = query.shape
    cu, max_len = _cu_from_segments(info.packed.to(query.device))
    cuq, cuk, mq, mk = cu_kw
    if any(x is not None for x in cu_kw):
        ok = all(isinstance(c, torch.Tensor) and c.dim() == 1 and c.numel() == cu.numel()
                 and torch.equal(c.to(cu.device, torch.int64), cu.to(torch.int64)) for c in (cuq, cuk))
        if not ok or any(m is not None and int(m) < max_len for m in (mq, mk)):
            raise _HandBack("cu_seq_lens_* that disagree with the packing in the mask (from "
                            "position_ids); the stock path follows the mask")
    causal, window, _ = _window_for(info.lo, info.hi, 0, max_len, max_len)
    q = query.transpose(1, 2).reshape(B * S, Hq, D)
    k = key.transpose(1, 2).reshape(B * S, key.shape[1], D)
    v = value.transpose(1, 2).reshape(B * S, value.shape[1], D)
    common = dict(common)
    out = attention_varlen(q, k, v, cu, cu, max_len, max_len, causal=causal, window=window, **common)
    return out.reshape(B, S, Hq, D).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# install: what fastbig.accelerate calls
# ---------------------------------------------------------------------------------------------
_BRANCH = re.compile(r"_attn_implementation\s*(==|!=)\s*[\"']([^\"']+)[\"']"
                     r"|_attn_implementation\s+(?:not\s+)?in\s*[\(\[\{]([^\)\]\}]*)[\)\]\}]"
                     r"|[\"']([^\"']+)[\"']\s+(?:not\s+)?in\s+[\w\.]*_attn_implementation")


def _branches_on(source: str, stock: str) -> Optional[str]:
    """A test in the model's code on the attention implementation's name whose result under
    "fastbig" differs from its result under the stock name, or None."""
    for m in _BRANCH.finditer(source):
        if m.group(2) is not None:
            lits = [m.group(2)]
            if stock in lits:
                return m.group(0)
        elif m.group(3) is not None:
            lits = re.findall(r"[\"']([^\"']+)[\"']", m.group(3))
            if stock in lits or NAME in lits:
                return m.group(0)
        elif m.group(4) is not None:
            if (m.group(4) in stock) != (m.group(4) in NAME):
                return m.group(0)
    return None


def _interface_keywords(cls) -> set:
    """Keywords the class's forward passes to ``attention_interface(...)``."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return set()
    kws = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id == "attention_interface":
            kws.update(k.arg for k in node.keywords if k.arg)
    return kws


def _uses_interface(cls) -> bool:
    try:
        return "get_interface(" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def register() -> None:
    """Register "fastbig" with transformers' attention and mask interfaces."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(NAME, fastbig_attention)
    AttentionMaskInterface.register(NAME, fastbig_mask)


def is_transformers_model(model) -> bool:
    cfg = getattr(model, "config", None)
    return cfg is not None and hasattr(cfg, "_attn_implementation") and \
        type(model).__module__.startswith("transformers.")


def install(model, report) -> bool:
    """Route a transformers model's attention through fastbig; add report entries. Returns False
    when the model is not a transformers model (nothing done)."""
    if not is_transformers_model(model):
        return False
    from ..accelerate import AccelerateWarning, Entry
    try:
        from transformers import PreTrainedModel
        register()
    except Exception as e:
        report.skipped.append(Entry("(root)", "attention", f"transformers model, but its attention "
                                    f"interface is unavailable ({type(e).__name__}: {e})"))
        return True

    def skip(why):
        report.skipped.append(Entry("(root)", "attention", why))
        warnings.warn(f"fastbig.accelerate: attention left as is: {why}", AccelerateWarning,
                      stacklevel=3)
        return True

    # the configs and their stock implementations
    configs = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and id(cfg) not in configs:
            configs[id(cfg)] = cfg

    def add_sub(cfg):
        for key in getattr(cfg, "sub_configs", {}) or {}:
            sub = getattr(cfg, key, None)
            if sub is not None and hasattr(sub, "_attn_implementation") and id(sub) not in configs:
                configs[id(sub)] = sub
                add_sub(sub)
    for cfg in list(configs.values()):
        add_sub(cfg)
    stocks = {}
    for cid, cfg in configs.items():
        impl = cfg._attn_implementation
        stock = getattr(impl, "stock", None) or ("sdpa" if impl in (None, "sdpa") else impl)
        if stock not in _STOCK_KINDS:
            return skip(f"model uses attn_implementation={impl!r}; left as is")
        stocks[cid] = stock

    # the attention modules, their stock paths, and the model code's own branches
    attn_modules = [(p, m) for p, m in model.named_modules()
                    if id(getattr(m, "config", None)) in configs
                    and not isinstance(m, PreTrainedModel) and _uses_interface(type(m))]
    seen_src = set()
    for p, m in list(attn_modules) + [(p, m) for p, m in model.named_modules()
                                      if isinstance(m, PreTrainedModel)]:
        modname = type(m).__module__
        stock = stocks.get(id(getattr(m, "config", None)), "sdpa")
        if (modname, stock) in seen_src:
            continue
        seen_src.add((modname, stock))
        try:
            src = inspect.getsource(sys.modules[modname])
        except (OSError, TypeError, KeyError):
            continue
        br = _branches_on(src, stock)
        if br:
            return skip(f"{modname} branches on the attention implementation's name ({br!r}); "
                        f"under 'fastbig' it would run other code than under {stock!r}")
    notes = {}
    handed = set()
    for p, m in attn_modules:
        stock = stocks.get(id(m.config), "sdpa")
        cls = type(m)
        if stock == "eager":
            fn = stock_eager(m)
            fp = fingerprint(fn) if fn is not None else None
            if fp not in VERIFIED_EAGER:
                return skip(f"{cls.__name__}'s stock path is eager "
                            f"({getattr(fn, '__module__', '?')}.{getattr(fn, '__name__', '?')}, "
                            f"fingerprint {fp}), whose semantics fastbig has not verified")
        kws = _interface_keywords(cls)
        back = sorted(k for k in kws if k not in IMPLEMENTED or
                      (k in HANDED_BACK and k != "output_attentions"))
        if back:
            handed.update(back)
        notes[p] = (stock, sorted(kws & {"softcap", "s_aux", "sliding_window", "position_bias",
                                         "is_causal"}), back)
    if not attn_modules:
        return skip("no attention module that dispatches through transformers' AttentionInterface")

    # switch
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if can_set is not None and not can_set():
        return skip(f"{type(model).__name__} cannot set its attention implementation")
    try:
        model.set_attn_implementation(NAME)
    except Exception as e:
        return skip(f"set_attn_implementation('fastbig') failed: {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}")
    for cid, cfg in configs.items():
        cfg._attn_implementation_internal = FastbigImpl(stocks[cid])
    not_set = [p for p, m in attn_modules if m.config._attn_implementation != NAME]
    if not_set:
        for cid, cfg in configs.items():  # undo
            cfg._attn_implementation_internal = stocks[cid]
        return skip(f"attention implementation not set on {not_set[:3]}")
    for p, m in attn_modules:
        stock, feats, back = notes[p]
        why = f"{type(m).__name__}: attn_implementation {stock!r} -> 'fastbig'"
        if feats:
            why += f" ({', '.join(feats)})"
        if back:
            why += f"; hands back to {stock} for: {', '.join(back)}"
        report.swapped.append(Entry(p, "attention", why))
    if handed:
        warnings.warn(f"fastbig.accelerate: the model's attention passes {sorted(handed)}, which "
                      f"fastbig hands back to the model's stock attention path", AccelerateWarning,
                      stacklevel=3)
    return True
