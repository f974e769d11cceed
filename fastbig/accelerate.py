"""``fastbig.accelerate(model)``: swap the torch.nn layers of an existing model for fastbig's fused
ones, keeping the model's state_dict keys (old checkpoints load with strict=True).

What it swaps (``ops`` picks the families):

* ``"lstm"``: every ``nn.LSTM`` / ``nn.LSTMCell`` becomes ``fastbig.nn.LSTM`` / ``LSTMCell``, and
  ``"attention"``: every ``nn.MultiheadAttention`` becomes ``fastbig.nn.MultiheadAttention``. The
  new module is built with the old one's constructor arguments and takes the old one's
  Parameter objects (shared, not copied), so optimizers holding them keep working.
  Hugging Face models (BERT, GPT-2, ...) do not use nn.MultiheadAttention; their attention
  modules dispatch through ``transformers``' AttentionInterface, so there ``"attention"``
  registers a "fastbig" attention function and mask function (fastbig.integrations.transformers:
  every keyword the model passes is implemented or handed back to the model's stock path) and
  points the model's configs at them.
* ``"conv_bn_relu"``: chains Conv2d -> BatchNorm2d -> ReLU / LeakyReLU, Conv2d -> BatchNorm2d,
  and ConvTranspose2d -> BatchNorm2d -> ReLU, found as consecutive children of an nn.Sequential
  and, through torch.fx, in any model whose forward calls them in sequence (torchvision's
  ResNet: conv1 -> bn1 -> relu). A chain is fused only when each intermediate output has no
  other user and each module is called once. The conv's path then holds a module that owns the
  conv's parameters under the same names and runs the fused block (fastbig.nn.ConvBnReLU2d & co,
  made from the same conv and bn modules); the bn's path holds a pass-through that owns the bn's
  parameters and buffers (running statistics are updated in those same tensors); the
  activation's path becomes nn.Identity (when that activation module is also used elsewhere, as
  torchvision's BasicBlock reuses ``relu``, it stays, made out-of-place; ReLU is idempotent).
  An unsupported activation after the BatchNorm (ReLU6, SiLU, ...) leaves the chain alone.
  Where a module containing convs does not trace, its chains outside nn.Sequential are left
  alone, with one warning.

It returns an :class:`AccelerateReport` (swapped and skipped entries: module path, kind, reason),
printable as a table.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

OPS = ("attention", "lstm", "conv_bn_relu")

_SUPPORTED_ACTS = (nn.ReLU, nn.LeakyReLU)
_OTHER_ACTS = (nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.ELU, nn.PReLU, nn.Sigmoid, nn.Tanh,
               nn.Mish, nn.Hardtanh, nn.SELU, nn.CELU, nn.Softplus, nn.Hardsigmoid, nn.RReLU)


class AccelerateWarning(UserWarning):
    """accelerate() left part of a model alone (e.g. it does not trace with torch.fx)."""


@dataclasses.dataclass
class Entry:
    path: str
    kind: str
    reason: str


@dataclasses.dataclass
class AccelerateReport:
    swapped: List[Entry] = dataclasses.field(default_factory=list)
    skipped: List[Entry] = dataclasses.field(default_factory=list)
    model: Optional[nn.Module] = dataclasses.field(default=None, repr=False)

    def table(self) -> str:
        rows = [("swapped", e) for e in self.swapped] + [("skipped", e) for e in self.skipped]
        if not rows:
            return "fastbig.accelerate: nothing to swap"
        w_path = max(len("module"), *(len(e.path or "(root)") for _, e in rows))
        w_kind = max(len("kind"), *(len(e.kind) for _, e in rows))
        lines = [f"{'status':<8} {'module':<{w_path}}  {'kind':<{w_kind}}  reason",
                 f"{'-' * 8} {'-' * w_path}  {'-' * w_kind}  {'-' * 6}"]
        for status, e in rows:
            lines.append(f"{status:<8} {e.path or '(root)':<{w_path}}  {e.kind:<{w_kind}}  {e.reason}")
        lines.append(f"{len(self.swapped)} swapped, {len(self.skipped)} skipped")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# ---------------------------------------------------------------------------------------------
# Conv-bn-act chains: the modules that take the conv's and the bn's places
# ---------------------------------------------------------------------------------------------
class FusedChainHead(nn.Module):
    """Sits at the conv's path. Its parameters ARE the conv's (the same dict of the same Parameter
    objects), so the state_dict keys there are unchanged; forward runs the fused block, which is
    held outside the module tree (no new keys) and follows this module's train()/eval()."""

    def __init__(self, block: nn.Module):
        super().__init__()
        conv = block.conv
        object.__setattr__(self, "_parameters", conv._parameters)
        object.__setattr__(self, "_buffers", conv._buffers)
        object.__setattr__(self, "_non_persistent_buffers_set", conv._non_persistent_buffers_set)
        self.__dict__["_block"] = block
        self.training = block.training

    @property
    def block(self) -> nn.Module:
        return self.__dict__["_block"]

    def forward(self, x):
        return self.__dict__["_block"](x)

    def train(self, mode: bool = True):
        super().train(mode)
        self.__dict__["_block"].train(mode)
        return self

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            block = self.__dict__.get("_block")
            if block is None:
                raise
            return getattr(block.conv, name)  # in_channels, stride, ... of the conv it replaced

    def extra_repr(self) -> str:
        return f"fused: {self.__dict__['_block']!r}".replace("\n", "\n  ")


class FusedChainTail(nn.Module):
    """Sits at the bn's path: owns the bn's parameters and buffers (the same dicts), so the keys
    and the running statistics stay where they were; forward passes its input through (the head
    has already applied the batch norm). It stands for the bn: ``train()``/``eval()`` here set the
    bn's mode, which the fused block follows (``model.bn1.eval()`` freezes the statistics as it
    did), and the bn's settings read and write through (``model.bn1.momentum = 0.01``)."""

    _BN_SETTINGS = ("num_features", "eps", "momentum", "affine", "track_running_stats")

    def __init__(self, bn: nn.Module):
        super().__init__()
        object.__setattr__(self, "_parameters", bn._parameters)
        object.__setattr__(self, "_buffers", bn._buffers)
        object.__setattr__(self, "_non_persistent_buffers_set", bn._non_persistent_buffers_set)
        self._version = getattr(type(bn), "_version", 1)  # state_dict metadata, as the bn's
        self.__dict__["_bn"] = bn
        self.training = bn.training

    def forward(self, x):
        return x

    def train(self, mode: bool = True):
        super().train(mode)
        bn = self.__dict__.get("_bn")
        if bn is not None:
            bn.train(mode)
        return self

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            bn = self.__dict__.get("_bn")
            if bn is None or name not in self._BN_SETTINGS:
                raise
            return getattr(bn, name)

    def __setattr__(self, name, value):
        bn = self.__dict__.get("_bn")
        if bn is not None and name in self._BN_SETTINGS:
            setattr(bn, name, value)
        else:
            super().__setattr__(name, value)

    def extra_repr(self) -> str:
        bn = self.__dict__.get("_bn")
        return f"{bn!r} (applied by the fused block before)" if bn is not None else \
            f"{self.__dict__.get('_bn_repr', 'BatchNorm2d')} (applied by the fused block before)"


def _fnn():
    from . import nn as fnn
    return fnn


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)  # also works for nn.Sequential / nn.ModuleList indices (names)


def _chain_block(conv, bn, act):
    """The fastbig block for (conv, bn, act-or-None): (block, kind) or raises with the reason."""
    fnn = _fnn()
    if type(conv) is nn.ConvTranspose2d:
        if not isinstance(act, nn.ReLU):
            raise ValueError("fastbig has ConvTranspose2d->BatchNorm2d only with ReLU")
        cls, kind, fresh = fnn.ConvTransposeBnReLU2d, "conv_transpose_bn_relu", nn.ReLU()
    elif act is None:
        cls, kind, fresh = fnn.ConvBn2d, "conv_bn", None
    elif type(act) is nn.LeakyReLU:
        cls, kind, fresh = fnn.ConvBnLeakyReLU2d, "conv_bn_leaky_relu", nn.LeakyReLU(act.negative_slope)
    else:
        cls, kind, fresh = fnn.ConvBnReLU2d, "conv_bn_relu", nn.ReLU()
    block = cls.from_modules(conv, bn, fresh, copy=False) if fresh is not None else \
        cls.from_modules(conv, bn, copy=False)
    block.train(bn.training)
    return block, kind


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


@dataclasses.dataclass
class _Chain:
    conv: str
    bn: str
    act: Optional[str]       # path of the activation module, None when not fused
    act_shared: bool = False  # the activation module is used elsewhere too: keep it (out-of-place)
    note: str = ""


def _chain_checks(root, chain: _Chain, counts) -> Optional[str]:
    """Why the chain cannot be fused, or None."""
    conv, bn = root.get_submodule(chain.conv), root.get_submodule(chain.bn)
    for path, m in ((chain.conv, conv), (chain.bn, bn)):
        if counts.get(id(m), 0) > 1:
            return f"{path} is registered at more than one path"
        if _has_hooks(m):
            return f"{path} has hooks"
    if conv.out_channels != bn.num_features:
        return f"bn.num_features {bn.num_features} != conv.out_channels {conv.out_channels}"
    if type(conv) is nn.ConvTranspose2d and chain.act is None:
        return "ConvTranspose2d->BatchNorm2d without ReLU has no fused block"
    return None


def _apply_chain(root, chain: _Chain) -> str:
    conv, bn = root.get_submodule(chain.conv), root.get_submodule(chain.bn)
    act = root.get_submodule(chain.act) if chain.act else None
    fuse_act = act
    if act is not None and chain.act_shared and type(act) is nn.LeakyReLU:
        fuse_act = None  # not idempotent: fuse conv+bn only, the shared activation runs after
    block, kind = _chain_block(conv, bn, fuse_act)
    _set_submodule(root, chain.conv, FusedChainHead(block))
    _set_submodule(root, chain.bn, FusedChainTail(bn))
    if act is not None:
        if chain.act_shared:
            if getattr(act, "inplace", False):  # its input may be saved by the fused backward
                act.inplace = False
        else:
            _set_submodule(root, chain.act, nn.Identity())
    return kind


def _sequential_chains(seq: nn.Sequential, prefix: str, skipped: list) -> List[_Chain]:
    """Conv -> BN (-> act) among consecutive children of a plain nn.Sequential."""
    names = list(seq._modules.keys())
    mods = list(seq._modules.values())
    chains, i = [], 0
    while i < len(mods) - 1:
        c, b = mods[i], mods[i + 1]
        if type(c) in (nn.Conv2d, nn.ConvTranspose2d) and type(b) is nn.BatchNorm2d:
            p = lambda j: f"{prefix}.{names[j]}" if prefix else names[j]  # noqa: E731
            nxt = mods[i + 2] if i + 2 < len(mods) else None
            if isinstance(nxt, _OTHER_ACTS) or (nxt is not None and isinstance(nxt, _SUPPORTED_ACTS)
                                                and type(nxt) not in _SUPPORTED_ACTS):
                skipped.append(Entry(p(i), "conv_bn_relu",
                                     f"activation {type(nxt).__name__} after {p(i + 1)} is not "
                                     f"supported (ReLU, LeakyReLU)"))
                i += 3
                continue
            if type(nxt) in _SUPPORTED_ACTS:
                chains.append(_Chain(p(i), p(i + 1), p(i + 2)))
                i += 3
            else:
                chains.append(_Chain(p(i), p(i + 1), None))
                i += 2
            continue
        i += 1
    return chains


def _is_plain_sequential(m) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _contains_conv(m: nn.Module) -> bool:
    """m holds a conv AND a BatchNorm2d (every chain has both): only then is it worth tracing."""
    mods = list(m.modules())
    return any(type(x) in (nn.Conv2d, nn.ConvTranspose2d) for x in mods) and \
        any(type(x) is nn.BatchNorm2d for x in mods)


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, with fastbig's modules (and accelerate's) as leaves."""

    def is_leaf_module(self, m, qualname):
        if isinstance(m, (FusedChainHead, FusedChainTail)):
            return True
        if type(m).__module__.startswith("fastbig."):
            return True
        return super().is_leaf_module(m, qualname)


def _fx_chains(module: nn.Module, prefix: str, skipped: list) -> List[_Chain]:
    """Chains in a traced module's graph. Raises when the module does not trace."""
    graph = _Tracer().trace(module)
    calls = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1

    def full(t):
        return f"{prefix}.{t}" if prefix else t

    chains = []
    for n in graph.nodes:
        if n.op != "call_module":
            continue
        conv = module.get_submodule(n.target)
        if type(conv) not in (nn.Conv2d, nn.ConvTranspose2d):
            continue
        users = list(n.users)
        if len(users) != 1 or users[0].op != "call_module" or \
                type(module.get_submodule(users[0].target)) is not nn.BatchNorm2d:
            continue  # not followed by a BatchNorm2d: nothing to fuse
        bn_node = users[0]
        if len(bn_node.args) != 1 or bn_node.kwargs or bn_node.args[0] is not n:
            continue
        if calls[n.target] > 1 or calls[bn_node.target] > 1:
            skipped.append(Entry(full(n.target), "conv_bn_relu",
                                 "conv or bn module is called more than once in forward"))
            continue
        act_path, shared = None, False
        bn_users = list(bn_node.users)
        if len(bn_users) == 1 and bn_users[0].op == "call_module":
            act_node = bn_users[0]
            act = module.get_submodule(act_node.target)
            if isinstance(act, _OTHER_ACTS) or (isinstance(act, _SUPPORTED_ACTS)
                                                and type(act) not in _SUPPORTED_ACTS):
                skipped.append(Entry(full(n.target), "conv_bn_relu",
                                     f"activation {type(act).__name__} after {full(bn_node.target)} "
                                     f"is not supported (ReLU, LeakyReLU)"))
                continue
            if type(act) in _SUPPORTED_ACTS and len(act_node.args) == 1 and not act_node.kwargs:
                act_path, shared = act_node.target, calls[act_node.target] > 1
        chains.append(_Chain(full(n.target), full(bn_node.target),
                             full(act_path) if act_path else None, shared))
    return chains


def _find_chains(root: nn.Module, skipped: list) -> Tuple[List[_Chain], List[Tuple[str, str]]]:
    chains, untraced = [], []

    def visit(m: nn.Module, prefix: str):
        if not _contains_conv(m) or type(m) in (nn.Conv2d, nn.ConvTranspose2d):
            return
        if type(m).__module__.startswith("fastbig."):
            return
        try:
            found = _fx_chains(m, prefix, skipped)
        except Exception as e:  # does not trace: plain Sequentials are still safe, then children
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            if _is_plain_sequential(m):
                chains.extend(_sequential_chains(m, prefix, skipped))
            else:
                untraced.append((prefix or "(root)", f"{type(e).__name__}: {msg}"[:160]))
            for name, child in m.named_children():
                visit(child, f"{prefix}.{name}" if prefix else name)
            return
        chains.extend(found)

    visit(root, "")
    return chains, untraced


# ---------------------------------------------------------------------------------------------
# Module swaps: LSTM, LSTMCell, MultiheadAttention
# ---------------------------------------------------------------------------------------------
def _ctor_args(m: nn.Module):
    if type(m) is nn.LSTM:
        return dict(input_size=m.input_size, hidden_size=m.hidden_size, num_layers=m.num_layers,
                    bias=m.bias, batch_first=m.batch_first, dropout=float(m.dropout),
                    bidirectional=m.bidirectional, proj_size=m.proj_size)
    if type(m) is nn.LSTMCell:
        return dict(input_size=m.input_size, hidden_size=m.hidden_size, bias=m.bias)
    if type(m) is nn.MultiheadAttention:
        return dict(embed_dim=m.embed_dim, num_heads=m.num_heads, dropout=float(m.dropout),
                    bias=m.out_proj.bias is not None, add_bias_kv=m.bias_k is not None, add_zero_attn=m.add_zero_attn,
                    kdim=m.kdim, vdim=m.vdim, batch_first=m.batch_first)
    raise AssertionError(type(m))


def _swap_module(old: nn.Module, new_cls) -> nn.Module:
    """A ``new_cls`` made with old's constructor arguments, holding old's Parameter objects."""
    args = _ctor_args(old)
    try:
        new = new_cls(**args, device="meta")
    except TypeError:
        new = new_cls(**args)
    for name, p in old.named_parameters(remove_duplicate=False):
        owner_path, _, leaf = name.rpartition(".")
        setattr(new.get_submodule(owner_path) if owner_path else new, leaf, p)
    for name, b in old.named_buffers(remove_duplicate=False):
        owner_path, _, leaf = name.rpartition(".")
        (new.get_submodule(owner_path) if owner_path else new)._buffers[leaf] = b
    old_p = dict(old.named_parameters(remove_duplicate=False))
    new_p = dict(new.named_parameters(remove_duplicate=False))
    if old_p.keys() != new_p.keys() or any(new_p[k] is not old_p[k] for k in old_p) or \
            old.state_dict().keys() != new.state_dict().keys():
        raise ValueError(f"{new_cls.__name__} does not hold {type(old).__name__}'s parameters under "
                         f"the same names")
    if any(t.is_meta for t in new.parameters()) or any(t.is_meta for t in new.buffers()):
        raise ValueError(f"{new_cls.__name__} has state that {type(old).__name__} does not")
    new.train(old.training)
    for k in ("_forward_hooks", "_forward_pre_hooks"):
        getattr(new, k).update(getattr(old, k))
    return new


def _encoder_fast_path(root: nn.Module, path: str, mha: nn.Module) -> Optional[str]:
    """Why torch may never call the swapped ``mha`` in inference, or None.

    nn.TransformerEncoderLayer's inference fast path (eval, no grad or no parameter needing one,
    batch_first, ...) calls torch._transformer_encoder_layer_fwd with its self_attn's weights and
    never calls self_attn itself: there the stock fused layer kernel keeps running, whatever
    module sits at self_attn. These are the conditions torch checks once, at construction (the
    ones that hold per call, eval and no grad, are left to the call)."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if not isinstance(parent, nn.TransformerEncoderLayer) or name != "self_attn":
        return None
    if not (mha.batch_first and mha.in_proj_bias is not None and mha._qkv_same_embed_dim
            and getattr(parent, "activation_relu_or_gelu", 0) and parent.norm1.eps == parent.norm2.eps
            and mha.num_heads % 2 == 0):
        return None
    return (f"in inference (eval, no grad, no hooks) {parent_path or '(root)'}, an "
            f"nn.TransformerEncoderLayer, runs torch's fused layer kernel "
            f"(torch._transformer_encoder_layer_fwd) and never calls self_attn: those calls stay "
            f"torch's; fastbig runs in training or with grad")


def _hf_attention(model: nn.Module, report: AccelerateReport) -> bool:
    """Hugging Face models: route their attention through fastbig (fastbig.integrations.transformers).
    True if the model is one."""
    from .integrations.transformers import install
    return install(model, report)


# ---------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------
def accelerate(model: nn.Module, ops: Sequence[str] = OPS, inplace: bool = True) -> AccelerateReport:
    """Swap ``model``'s torch.nn layers for fastbig's fused ones; state_dict keys are unchanged.

    ops: any of "attention", "lstm", "conv_bn_relu". inplace=False works on a deep copy.
    Returns an AccelerateReport; ``report.model`` is the accelerated model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(ops, str):
        ops = (ops,)
    ops = tuple(ops)
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise ValueError(f"accelerate: ops must be drawn from {OPS}, got {bad}")
    if not inplace:
        model = copy.deepcopy(model)
    fnn = _fnn()
    report = AccelerateReport(model=model)
    keys_before = list(model.state_dict().keys())

    if "conv_bn_relu" in ops:
        chains, untraced = _find_chains(model, report.skipped)
        counts = {}
        for _, m in model.named_modules(remove_duplicate=False):
            counts[id(m)] = counts.get(id(m), 0) + 1
        for ch in chains:
            why = _chain_checks(model, ch, counts)
            if why:
                report.skipped.append(Entry(ch.conv, "conv_bn_relu", why))
                continue
            try:
                kind = _apply_chain(model, ch)
            except Exception as e:
                report.skipped.append(Entry(ch.conv, "conv_bn_relu", f"{type(e).__name__}: {e}"))
                continue
            parts = " -> ".join(p for p in (ch.conv, ch.bn, ch.act) if p)
            note = " (activation shared: kept, out-of-place)" if ch.act_shared else ""
            report.swapped.append(Entry(ch.conv, kind, f"{parts}{note}"))
        for path, why in untraced:
            report.skipped.append(Entry(path, "conv_bn_relu",
                                        f"does not trace with torch.fx; chains outside nn.Sequential "
                                        f"left alone ({why})"))
        if untraced:
            warnings.warn(f"fastbig.accelerate: {len(untraced)} module(s) with convolutions do not "
                          f"trace with torch.fx ({', '.join(p for p, _ in untraced[:5])}"
                          f"{', ...' if len(untraced) > 5 else ''}); their conv-bn chains outside "
                          f"nn.Sequential are left alone", AccelerateWarning, stacklevel=2)

    swaps = []
    if "lstm" in ops:
        swaps += [(nn.LSTM, "LSTM", "lstm"), (nn.LSTMCell, "LSTMCell", "lstm")]
    if "attention" in ops:
        swaps += [(nn.MultiheadAttention, "MultiheadAttention", "attention")]
    by_type = {t: (name, kind) for t, name, kind in swaps}
    if by_type:
        counts = {}
        for _, m in model.named_modules(remove_duplicate=False):
            counts[id(m)] = counts.get(id(m), 0) + 1
        targets = [(p, m) for p, m in model.named_modules() if type(m) in by_type]
        bypassed = []
        for path, m in targets:
            name, kind = by_type[type(m)]
            if not path:
                report.skipped.append(Entry("(root)", kind, "the model itself is the layer; use "
                                            f"fastbig.nn.{name} directly"))
                continue
            if counts[id(m)] > 1:
                report.skipped.append(Entry(path, kind, "registered at more than one path"))
                continue
            try:
                new = _swap_module(m, getattr(fnn, name))
            except Exception as e:
                report.skipped.append(Entry(path, kind, f"{type(e).__name__}: {e}"))
                continue
            note = _encoder_fast_path(model, path, m) if kind == "attention" else None
            _set_submodule(model, path, new)
            report.swapped.append(Entry(path, kind, f"nn.{name} -> fastbig.nn.{name} (parameters shared)"
                                        + (f"; {note}" if note else "")))
            if note:
                bypassed.append(path)
        if bypassed:
            warnings.warn(f"fastbig.accelerate: {len(bypassed)} swapped MultiheadAttention(s) sit in "
                          f"nn.TransformerEncoderLayer(s) ({', '.join(bypassed[:3])}"
                          f"{', ...' if len(bypassed) > 3 else ''}) whose inference fast path (eval, "
                          f"no grad) runs torch's fused layer kernel without calling them: there "
                          f"torch's kernel keeps running (same answer); fastbig runs in training or "
                          f"with grad", AccelerateWarning, stacklevel=2)
    if "attention" in ops:
        _hf_attention(model, report)

    keys_after = list(model.state_dict().keys())
    if keys_after != keys_before:  # never expected: the swaps above are built to keep keys
        raise RuntimeError("fastbig.accelerate changed the model's state_dict keys: "
                           f"{sorted(set(keys_before) ^ set(keys_after))[:5]}")
    return report
