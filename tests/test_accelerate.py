"""fastbig.accelerate(model): swaps layers of existing models, keeps state_dict keys (old
checkpoints load strict), and leaves outputs, gradients and running statistics within tolerance of
the untouched model computed in float64, in train and eval mode."""
import copy
import warnings

import pytest
import torch
from torch import nn

import fastbig
import fastbig.nn as fnn
from fastbig.accelerate import AccelerateReport, AccelerateWarning, FusedChainHead, FusedChainTail
from conftest import TOL, assert_close, randn


def _randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand_like(m.weight) + 0.5)
                m.bias.copy_(torch.randn_like(m.bias) * 0.2)
                m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.1)
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)


def _compare(model, ref, args, dtype, *, modes=(True, False), out_fn=lambda o: o, label="",
             backward=True):
    """model (accelerated, in ``dtype``) vs ref (the original, float64): outputs, gradients of
    every parameter and all buffers, train then eval. Degenerate gradients (zero in exact
    arithmetic, e.g. an attention key bias) are held to TOL times the total gradient norm."""
    for mode in modes:
        model.train(mode)
        ref.train(mode)
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        out_r = out_fn(ref(*[a.double() if a.is_floating_point() else a for a in args]))
        torch.manual_seed(5)
        out_m = out_fn(model(*[a.to(dtype) if a.is_floating_point() else a for a in args]))
        tag = f"{label} {'train' if mode else 'eval'}"
        assert out_m.dtype == dtype
        assert_close(out_m, out_r, dtype, name=f"{tag} output")
        if not backward:
            continue
        g = randn(*out_r.shape)
        out_r.backward(g.double())
        out_m.backward(g.to(dtype))
        rp = dict(ref.named_parameters())
        total = torch.sqrt(sum((p.grad ** 2).sum() for p in rp.values() if p.grad is not None)).item()
        for name, p in model.named_parameters():
            r = rp[name].grad
            if r is None:
                assert p.grad is None, f"{tag}: {name} has a gradient, the original has none"
                continue
            assert p.grad is not None, f"{tag}: no gradient for {name}"
            if r.norm().item() < 1e-6 * total:
                err = (p.grad.double() - r).norm().item()
                assert err <= TOL[dtype] * total, f"{tag} grad {name}: {err:.3e} vs total {total:.3e}"
            else:
                assert_close(p.grad, r, dtype, name=f"{tag} grad {name}")
        rb = dict(ref.named_buffers())
        for name, b in model.named_buffers():
            if b.is_floating_point():
                assert_close(b, rb[name], dtype, name=f"{tag} buffer {name}")
            else:
                assert torch.equal(b, rb[name]), f"{tag} buffer {name}"


class Mixed(nn.Module):
    """Every kind accelerate swaps: Sequential conv chains (ReLU, LeakyReLU, ConvTranspose+ReLU,
    conv-bn alone), LSTM, LSTMCell, MultiheadAttention."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(inplace=True),
            nn.Conv2d(5, 6, 3, bias=False), nn.BatchNorm2d(6), nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(6, 4, 2, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3),
            nn.MaxPool2d(2),
        )
        self.lstm = nn.LSTM(3, 8, num_layers=2, batch_first=True)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.cell = nn.LSTMCell(8, 5)

    def forward(self, x):
        h = self.features(x)                     # [B, 3, 6, 6]
        seq = h.flatten(2).transpose(1, 2)       # [B, 36, 3]
        s, _ = self.lstm(seq)
        a, _ = self.attn(s, s, s, need_weights=False)
        hx, cx = self.cell(a[:, -1])
        return hx + cx


def test_mixed_model_swaps_everything_keys_and_numbers():
    torch.manual_seed(0)
    model = Mixed()
    _randomize_bn(model)
    ref = copy.deepcopy(model).double()
    old_sd = copy.deepcopy(model.state_dict())
    keys = list(model.state_dict().keys())
    lstm_w = model.lstm.weight_ih_l0
    mha_w = model.attn.in_proj_weight
    report = fastbig.accelerate(model)
    assert isinstance(report, AccelerateReport) and report.model is model
    kinds = sorted(e.kind for e in report.swapped)
    assert kinds == ["attention", "conv_bn", "conv_bn_leaky_relu", "conv_bn_relu",
                     "conv_transpose_bn_relu", "lstm", "lstm"], report.table()
    assert report.skipped == []
    assert type(model.lstm) is fnn.LSTM and type(model.cell) is fnn.LSTMCell
    assert type(model.attn) is fnn.MultiheadAttention
    assert model.lstm.weight_ih_l0 is lstm_w and model.attn.in_proj_weight is mha_w  # shared
    assert isinstance(model.features[0], FusedChainHead) and isinstance(model.features[1], FusedChainTail)
    assert isinstance(model.features[2], nn.Identity)
    assert list(model.state_dict().keys()) == keys
    model.load_state_dict(old_sd, strict=True)  # old checkpoints load
    assert "swapped" in str(report) and "features.0" in report.table()
    _compare(model, ref, (randn(3, 3, 6, 6),), torch.float32, label="mixed")


def test_accelerated_model_moves_with_dtype_and_deepcopies():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    _randomize_bn(model)
    ref = copy.deepcopy(model).double()
    fastbig.accelerate(model)
    model.double()  # .to() reaches the fused block's conv and bn (shared parameter dicts)
    assert model[0].block.conv.weight.dtype == torch.float64
    assert model[0].block.bn.running_mean.dtype == torch.float64
    _compare(model, ref, (randn(2, 2, 7, 5),), torch.float64, label="double")
    clone = copy.deepcopy(model)
    x = randn(2, 2, 7, 5, dtype=torch.float64)
    model.eval()
    clone.eval()
    assert torch.equal(clone(x), model(x))
    assert clone[0].weight is clone[0].block.conv.weight  # sharing survives the copy
    assert clone[0].weight is not model[0].weight


def test_inplace_false_leaves_the_original_alone():
    model = Mixed()
    report = fastbig.accelerate(model, ops=("lstm",), inplace=False)
    assert type(model.lstm) is nn.LSTM
    assert type(report.model.lstm) is fnn.LSTM and type(report.model.attn) is nn.MultiheadAttention
    assert isinstance(report.model.features[0], nn.Conv2d)  # conv_bn_relu not requested


def test_torchvision_resnet18():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(weights=None, num_classes=7)
    _randomize_bn(model)
    ref = copy.deepcopy(model).double()
    keys = list(model.state_dict().keys())
    report = fastbig.accelerate(model)
    swapped = {e.path: e.kind for e in report.swapped}
    assert swapped["conv1"] == "conv_bn_relu"                 # stem: conv1 -> bn1 -> relu
    assert swapped["layer1.0.conv1"] == "conv_bn_relu"        # BasicBlock: conv1 -> bn1 -> relu
    assert swapped["layer1.0.conv2"] == "conv_bn"             # conv2 -> bn2 -> (+ identity)
    assert swapped["layer2.0.downsample.0"] == "conv_bn"
    assert len(swapped) == 20 and report.skipped == []
    assert isinstance(model.relu, nn.Identity)                # used once: folded into the block
    assert isinstance(model.layer1[0].relu, nn.ReLU) and not model.layer1[0].relu.inplace  # shared
    assert list(model.state_dict().keys()) == keys
    model.load_state_dict(ref.state_dict(), strict=True)
    model.double()  # deep BN stacks on a small batch are ill-conditioned in float32 (see test_models)
    _compare(model, ref, (randn(2, 3, 40, 40),), torch.float64, label="resnet18")  # layer4: 2x2


def test_torchvision_mobilenet_v2_relu6_skipped():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.mobilenet_v2(weights=None, num_classes=5, width_mult=0.25)
    _randomize_bn(model)
    ref = copy.deepcopy(model).double()
    keys = list(model.state_dict().keys())
    report = fastbig.accelerate(model)
    relu6 = [e for e in report.skipped if "ReLU6" in e.reason]
    assert len(relu6) == 35 and all("not supported" in e.reason for e in relu6)
    assert "features.0.0" in {e.path for e in relu6}
    assert {e.kind for e in report.swapped} == {"conv_bn"} and len(report.swapped) == 17
    assert list(model.state_dict().keys()) == keys
    model.double()
    # eval-mode outputs only: mobilenet_v2 ends at 1x1 on a 32x32 input, where train-mode
    # BatchNorm over a batch of 2 is too ill-conditioned to compare, and torch's float64 depthwise
    # conv backward on CPU takes ~30 s (resnet18 and the mixed model cover train mode and grads)
    with torch.no_grad():
        _compare(model, ref, (randn(2, 3, 32, 32),), torch.float64, modes=(False,), backward=False,
                 label="mobilenet_v2")


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        h = self.block(x)
        if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            h = h * 2
        return self.bn(self.conv(h))


def test_untraceable_model_warns_once_and_keeps_sequential_chains():
    model = Untraceable()
    _randomize_bn(model)
    ref = copy.deepcopy(model).double()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        report = fastbig.accelerate(model)
    ours = [x for x in w if issubclass(x.category, AccelerateWarning)]
    assert len(ours) == 1 and "trace" in str(ours[0].message)
    assert [e.path for e in report.swapped] == ["block.0"]
    assert any(e.path == "(root)" and "trace" in e.reason for e in report.skipped)
    assert type(model.conv) is nn.Conv2d and type(model.bn) is nn.BatchNorm2d  # left alone
    _compare(model, ref, (randn(2, 2, 5, 5),), torch.float32, label="untraceable")


def test_shared_or_hooked_modules_are_skipped_with_reason():
    conv = nn.Conv2d(2, 2, 1)
    model = nn.Sequential(conv, nn.BatchNorm2d(2), nn.ReLU(), conv, nn.BatchNorm2d(2))
    report = fastbig.accelerate(model)
    assert not report.swapped
    assert report.skipped and all("more than" in e.reason for e in report.skipped)
    m2 = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    m2[0].register_forward_hook(lambda *a: None)
    r2 = fastbig.accelerate(m2)
    assert not r2.swapped and "hooks" in r2.skipped[0].reason


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fastbig.accelerate("resnet")
    with pytest.raises(ValueError, match="ops must be drawn from"):
        fastbig.accelerate(nn.Linear(2, 2), ops=("attention", "softmax"))


class _Kw(nn.Module):
    """Calls a Hugging Face model with keyword arguments (GPT-2's second positional is the cache)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask)


def _hf_check(model, ref, ids, mask, label):
    """The accelerated model (float32) against the original (float64): outputs and every gradient;
    fastbig's attention op must have run (the integration calls fastbig.ops.attention)."""
    import importlib
    ops_att = importlib.import_module("fastbig.ops.attention")
    calls = []
    real = ops_att.attention

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    keep = mask.bool()
    ops_att.attention = counting
    try:
        _compare(_Kw(model), _Kw(ref), (ids, mask), torch.float32, label=label,
                 out_fn=lambda o: o.last_hidden_state[keep])
    finally:
        ops_att.attention = real
    assert calls, f"{label}: fastbig attention was never called"


def test_hf_bert_attention_through_fastbig():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=37, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, max_position_embeddings=32)
    model = transformers.BertModel(cfg)
    ref = copy.deepcopy(model).double()
    keys = list(model.state_dict().keys())
    report = fastbig.accelerate(model)
    assert [e.path for e in report.swapped] == ["encoder.layer.0.attention.self",
                                                "encoder.layer.1.attention.self"]
    assert model.config._attn_implementation == "fastbig"
    assert list(model.state_dict().keys()) == keys
    ids = torch.randint(0, 50, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    _hf_check(model, ref, ids, mask, "bert")


def test_hf_gpt2_attention_through_fastbig():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2Model(cfg)
    ref = copy.deepcopy(model).double()
    report = fastbig.accelerate(model)
    assert [e.path for e in report.swapped] == ["h.0.attn", "h.1.attn"]
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    _hf_check(model, ref, ids, mask, "gpt2")
    # causal with no mask at all
    _hf_check(model, ref, ids, torch.ones(2, 7, dtype=torch.long), "gpt2-causal")


def test_bn_path_stands_for_the_bn():
    """After accelerate, the bn's path still acts as the bn: eval() on it freezes the statistics
    (the fused block follows the bn's own mode), its settings read and write through; it survives
    deepcopy; a LeakyReLU slope the kernels cannot take leaves the chain alone, results unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.LeakyReLU(0.0))
    _randomize_bn(model)
    acc = copy.deepcopy(model)
    report = fastbig.accelerate(acc)
    assert [e.path for e in report.swapped] == ["0"]
    assert [e.path for e in report.skipped] == ["3"] and "negative_slope" in report.skipped[0].reason
    x = randn(2, 3, 8, 8)
    for m in (model, acc):
        m.train()
        m[1].eval()
        m[1].momentum = 0.5
    assert acc[1].momentum == 0.5 and acc[0].block.bn.momentum == 0.5 and not acc[0].block.bn.training
    rm = acc[1].running_mean.clone()
    assert_close(acc(x), model.double()(x.double()), torch.float32, name="frozen bn")
    assert torch.equal(acc[1].running_mean, rm)
    for m in (model, acc):
        m.train()
    assert_close(acc(x), model(x.double()), torch.float32, name="train")
    assert_close(acc[1].running_mean, model[1].running_mean, torch.float32, name="momentum 0.5")
    twin = copy.deepcopy(acc)
    twin[1].eval()
    assert not twin[0].block.bn.training and acc[0].block.bn.training


def test_hf_unverified_eager_model_is_left_as_is(monkeypatch):
    """A model whose stock path is an eager function fastbig has not verified keeps it: a skipped
    entry with the reason and one AccelerateWarning, its config untouched."""
    transformers = pytest.importorskip("transformers")
    import importlib
    fit = importlib.import_module("fastbig.integrations.transformers")
    cfg = transformers.Gemma2Config(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                    vocab_size=50)
    model = transformers.Gemma2ForCausalLM(cfg)
    assert model.config._attn_implementation == "eager"
    monkeypatch.setattr(fit, "VERIFIED_EAGER", {})
    with pytest.warns(AccelerateWarning, match="not verified"):
        report = fastbig.accelerate(model)
    assert not [e for e in report.swapped if e.kind == "attention"]
    assert [e for e in report.skipped if e.kind == "attention" and "eager" in e.reason]
    assert model.config._attn_implementation == "eager"


def test_hf_other_attention_implementation_is_left_as_is():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                   num_attention_heads=2, vocab_size=50)
    model = transformers.LlamaForCausalLM(cfg)
    model.config._attn_implementation_internal = "flex_attention"
    with pytest.warns(AccelerateWarning, match="flex_attention"):
        report = fastbig.accelerate(model)
    assert any("flex_attention" in e.reason for e in report.skipped)
    assert model.config._attn_implementation == "flex_attention"


def test_hf_model_code_that_branches_on_the_implementation_name_is_left_as_is():
    """Falcon's code tests `_attn_implementation == "sdpa"`: under 'fastbig' it would run other
    code than its stock sdpa path, so its attention is left alone, with the reason."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.FalconConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                    vocab_size=50)
    model = transformers.FalconForCausalLM(cfg)
    with pytest.warns(AccelerateWarning, match="branches on the attention implementation"):
        report = fastbig.accelerate(model)
    assert not [e for e in report.swapped if e.kind == "attention"]
    assert model.config._attn_implementation == "sdpa"
