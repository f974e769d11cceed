"""fastbig.accelerate on real architectures that tests/test_transformers.py and
tests/test_accelerate.py do not name: tiny random configs (no download), the stock model as the
twin. The rule: a drop-in never changes a model's answer, and what fastbig hands back to the
stock path it says (the report, one warning).

- Hugging Face (a sweep of ~60 architectures found these clean; the cheap ones that cover the
  attention variants stay here): logits, every parameter's gradient (train mode, dropout 0) and
  greedy generation with a KV cache on a left-padded batch, float32 on fastbig's own CPU kernel
  (forced: at these sizes ``auto`` picks SDPA, which would test nothing of fastbig's), and
  float64 on fastbig's reference.
- torch.nn: nn.TransformerEncoderLayer's inference fast path never calls the swapped
  self_attn (issue: the report said "swapped" and nothing ran); nn.MultiheadAttention with
  need_weights=True (torch's default, SigLIP's pooling head) runs torch's implementation (was
  silent); torchvision's VisionTransformer.
- conv_bn_relu: a model with convolutions but no BatchNorm2d (every ViT/CLIP patch embedding)
  has nothing to fuse and is not traced (it warned "does not trace with torch.fx" and listed
  skipped entries).
"""
import contextlib
import copy
import importlib
import warnings

import pytest
import torch
from torch import nn

import fastbig
from conftest import param_grad_errors, rel_err
from fastbig.accelerate import AccelerateWarning
from fastbig.backends import FastbigFallbackWarning

ops_att = importlib.import_module("fastbig.ops.attention")

TOL32 = 1e-5       # float32 logits (tests/conftest.py)
GRAD32 = 1e-4      # float32 gradients through two layers (as tests/test_transformers.py)
TOL64 = 1e-12      # float64: fastbig's reference against the stock path
V = 64


@contextlib.contextmanager
def _spy():
    """Count fastbig.ops attention calls (fastbig.nn and the transformers integration call them
    through the module attribute)."""
    calls = {"attention": 0, "attention_varlen": 0}
    real = {k: getattr(ops_att, k) for k in calls}
    import fastbig.nn.attention as fna
    real_nn = fna._attention

    def wrap(name, f):
        def g(*a, **k):
            calls[name] += 1
            return f(*a, **k)
        return g
    for k in calls:
        setattr(ops_att, k, wrap(k, real[k]))
    fna._attention = wrap("attention", real_nn)
    try:
        yield calls
    finally:
        for k, f in real.items():
            setattr(ops_att, k, f)
        fna._attention = real_nn


def _grad_errors(model, ref):
    """Worst relative gradient error over every parameter (fastbig.testing.param_grad_errors)."""
    return max(param_grad_errors(model, ref).values(), default=0.0)


# ---------------------------------------------------------------------------------------------
# Hugging Face architectures
# ---------------------------------------------------------------------------------------------
def _no_dropout(cfg):
    for k, v in list(vars(cfg).items()):
        if isinstance(v, float) and ("dropout" in k or "pdrop" in k or k == "layerdrop"):
            setattr(cfg, k, 0.0)
        elif hasattr(v, "to_dict") and hasattr(v, "_attn_implementation"):
            _no_dropout(v)
    return cfg


_DEC = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=V, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            max_position_embeddings=64)
_S2S = dict(vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=1, forced_eos_token_id=None)
_TOWER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)


def _hf(cfg_name, model_name, **kw):
    def make():
        T = pytest.importorskip("transformers")
        cfg = _no_dropout(getattr(T, cfg_name)(**kw))
        return getattr(T, model_name)(cfg)
    return make


def _clip_like(prefix):
    def make():
        T = pytest.importorskip("transformers")
        text = dict(_TOWER, vocab_size=V, max_position_embeddings=16, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2)
        vision = dict(_TOWER, image_size=32, patch_size=8)
        cfg = _no_dropout(getattr(T, prefix + "Config")(text_config=text, vision_config=vision))
        return getattr(T, prefix + "Model")(cfg)
    return make


# name -> (kind, make): what each adds to test_transformers.py's Llama/Mistral/Qwen2/Gemma-2/
# GPT-OSS/GPT-2/BERT/T5/BART
HF = {
    # RoBERTa position ids from the padding; DistilBERT's own attention module
    "roberta": ("encoder", _hf("RobertaConfig", "RobertaModel", **dict(_TOWER, vocab_size=V,
                                                                       max_position_embeddings=40))),
    "distilbert": ("encoder", _hf("DistilBertConfig", "DistilBertModel", vocab_size=V, dim=32,
                                  hidden_dim=37, n_layers=2, n_heads=4)),
    # ModernBERT: local (sliding, bidirectional) and global layers
    "modernbert": ("encoder", _hf("ModernBertConfig", "ModernBertModel",
                                  **dict(_TOWER, num_hidden_layers=3, vocab_size=V, pad_token_id=0,
                                         global_attn_every_n_layers=2, local_attention=4,
                                         cls_token_id=1, sep_token_id=2, bos_token_id=1,
                                         eos_token_id=2))),
    # GPT-NeoX: partial rotary; Phi-3: fused qkv; Qwen3: q/k norm, head_dim != hidden/heads
    "gpt_neox": ("causal", _hf("GPTNeoXConfig", "GPTNeoXForCausalLM", rotary_pct=0.5, **_DEC)),
    "phi3": ("causal", _hf("Phi3Config", "Phi3ForCausalLM", num_key_value_heads=2, **_DEC)),
    "qwen3": ("causal", _hf("Qwen3Config", "Qwen3ForCausalLM", num_key_value_heads=2, head_dim=8,
                            **_DEC)),
    # Mixtral: MoE + sliding window; Gemma-3: sliding and global layers, eager stock path
    "mixtral": ("causal", _hf("MixtralConfig", "MixtralForCausalLM", num_key_value_heads=2,
                              num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                              experts_implementation="eager", **_DEC)),
    "gemma3": ("causal", _hf("Gemma3TextConfig", "Gemma3ForCausalLM", num_key_value_heads=2,
                             head_dim=8, sliding_window=3, query_pre_attn_scalar=8,
                             layer_types=["sliding_attention", "full_attention"],
                             final_logit_softcapping=30.0, **_DEC)),
    # OPT: its own attention module and learned positions with an offset
    "opt": ("causal", _hf("OPTConfig", "OPTForCausalLM", ffn_dim=37, word_embed_proj_dim=32,
                          **_DEC)),
    # mBART: encoder-decoder, cross attention; Whisper: audio encoder-decoder
    "mbart": ("seq2seq", _hf("MBartConfig", "MBartForConditionalGeneration", **_S2S)),
    "whisper": ("whisper", _hf("WhisperConfig", "WhisperForConditionalGeneration",
                               **dict(_S2S, num_mel_bins=8, max_source_positions=8,
                                      max_target_positions=32, suppress_tokens=None,
                                      begin_suppress_tokens=None))),
    # DeepSeek-V3: multi-head latent attention, value head dim (8) != q/k head dim (12); it was
    # handed back to the stock path on every call ("fastbig needs one head dim")
    "deepseek_v3": ("causal", _hf("DeepseekV3Config", "DeepseekV3ForCausalLM", num_key_value_heads=4,
                                  q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
                                  qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                                  num_experts_per_tok=2, moe_intermediate_size=16,
                                  first_k_dense_replace=1, n_group=1, topk_group=1,
                                  experts_implementation="eager", **_DEC)),
    # CLIP: causal text tower with padding + vision tower; SigLIP: + nn.MultiheadAttention
    # pooling head (called with need_weights=True: torch's implementation, one warning)
    "clip": ("clip", _clip_like("CLIP")),
    "siglip": ("clip", _clip_like("Siglip")),
}


def _ids(B, S, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (B, S), generator=g)


def _hf_inputs(kind, model):
    """(inputs, rows-to-keep mask or None, generate inputs or None)"""
    g = torch.Generator().manual_seed(2)
    ids = _ids(2, 9)
    am = torch.ones(2, 9, dtype=torch.long)
    if kind in ("encoder", "causal"):
        am[0, :3] = 0   # left padding
        inputs = dict(input_ids=ids.masked_fill(am == 0, 0), attention_mask=am)
        return inputs, am.bool(), (inputs if kind == "causal" else None)
    am[0, 6:] = 0       # right padding
    padded = dict(input_ids=ids.masked_fill(am == 0, 0), attention_mask=am)
    if kind == "seq2seq":
        return dict(padded, decoder_input_ids=_ids(2, 4, seed=3)), None, padded
    if kind == "whisper":
        feats = torch.randn(2, 8, 16, generator=g)
        dec = torch.cat([torch.ones(2, 1, dtype=torch.long), _ids(2, 3, seed=3)], 1)
        return dict(input_features=feats, decoder_input_ids=dec), None, dict(input_features=feats)
    if "Siglip" in type(model).__name__:   # SigLIP's text tower takes no mask (max-length padding)
        padded = dict(input_ids=padded["input_ids"])
    return dict(padded, pixel_values=torch.randn(2, 3, 32, 32, generator=g)), None, None


def _outputs(out):
    names = ("logits", "last_hidden_state", "logits_per_image", "text_embeds", "image_embeds",
             "encoder_last_hidden_state")
    return [getattr(out, k) for k in names if isinstance(getattr(out, k, None), torch.Tensor)]


def _fast_backend():
    """fastbig's own CPU kernel where the extension is built, else auto (SDPA or the reference)."""
    return "cpu" if fastbig.build_info()["loaded"] else "auto"


def _hf_run(model, ref, inputs, keep, backend):
    """Outputs (eval) and every parameter's gradient (train): worst relative errors."""
    def first(outs):
        return [o[keep] if keep is not None and o.shape[:2] == keep.shape else o for o in outs]
    model.eval(), ref.eval()
    with fastbig.backends.use(backend), _spy() as calls, torch.no_grad():
        out = first(_outputs(model(**inputs)))
    with torch.no_grad():
        exp = first(_outputs(ref(**inputs)))
    assert calls["attention"] + calls["attention_varlen"] > 0, "fastbig never ran"
    fwd = max(rel_err(a, b) for a, b in zip(out, exp))
    model.train(), ref.train()
    with fastbig.backends.use(backend), _spy():
        o = _outputs(model(**inputs))[0]
    r = _outputs(ref(**inputs))[0]
    g = torch.randn(r.shape, generator=torch.Generator().manual_seed(7), dtype=r.dtype)
    if keep is not None and r.shape[:2] == keep.shape:
        g = g * keep.reshape(*keep.shape, *([1] * (r.dim() - 2)))
    (o * g).sum().backward()
    (r * g).sum().backward()
    model.eval(), ref.eval()
    return fwd, _grad_errors(model, ref)


@pytest.mark.parametrize("name", list(HF))
def test_hf_architecture(name):
    pytest.importorskip("transformers")
    kind, make = HF[name]
    torch.manual_seed(0)
    base = make().float().eval()
    model, ref = copy.deepcopy(base), copy.deepcopy(base)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        report = fastbig.accelerate(model)
    assert any(e.kind == "attention" for e in report.swapped), report.table()
    assert not report.skipped, report.table()
    assert not [x for x in w if issubclass(x.category, AccelerateWarning)], [str(x.message) for x in w]
    inputs, keep, gen = _hf_inputs(kind, base)
    fit = importlib.import_module("fastbig.integrations.transformers")

    # float32, fastbig's own kernel; no transformers call may be handed back
    fit._warned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fit.FastbigHandBackWarning)
        warnings.simplefilter("ignore", FastbigFallbackWarning)  # SigLIP's head: see the test below
        fwd, grad = _hf_run(model, ref, inputs, keep, _fast_backend())
        assert fwd <= TOL32, f"{name}: float32 outputs, relative error {fwd:.2e}"
        assert grad <= GRAD32, f"{name}: float32 gradients, relative error {grad:.2e}"
        if gen is not None:
            kw = dict(max_new_tokens=4, do_sample=False, output_scores=True,
                      return_dict_in_generate=True, pad_token_id=0)
            with torch.no_grad(), fastbig.backends.use(_fast_backend()), _spy() as calls:
                g1 = model.generate(**gen, **kw)
            with torch.no_grad():
                g0 = ref.generate(**gen, **kw)
            assert calls["attention"] > 0
            assert torch.equal(g1.sequences, g0.sequences), f"{name}: generated tokens differ"
            e = max(rel_err(a, b) for a, b in zip(g1.scores, g0.scores))
            assert e <= TOL32, f"{name}: generation scores, relative error {e:.2e}"

        # float64, fastbig's reference (its mask decoding and math) against the stock float64 path
        model.double(), ref.double()
        inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
        model.zero_grad(set_to_none=True), ref.zero_grad(set_to_none=True)
        fwd, grad = _hf_run(model, ref, inputs, keep, "reference")
    assert fwd <= TOL64, f"{name}: float64 outputs, relative error {fwd:.2e}"
    assert grad <= TOL64 * 100, f"{name}: float64 gradients, relative error {grad:.2e}"


@pytest.mark.parametrize("dv", [5, 12])
@pytest.mark.parametrize("mask", ["causal", "dense", "padded"])
def test_hf_value_head_dim_differs(dv, mask):
    """q/k head dim 8, v head dim 5 or 12 (MLA): fastbig runs (no hand-back), outputs and q/k/v
    gradients equal the stock sdpa path's, float64 on the reference and float32 on the kernel."""
    T = pytest.importorskip("transformers")
    fit = importlib.import_module("fastbig.integrations.transformers")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import causal_mask_function
    model = T.LlamaForCausalLM(T.LlamaConfig(**dict(_DEC, num_key_value_heads=2)))
    fastbig.accelerate(model)
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(4)
    B, S = 2, 6
    am = None
    if mask == "dense":
        am = torch.rand(B, 1, S, S, generator=g) > 0.3
        am[..., 0] = True
    elif mask == "padded":   # the structured mask transformers' model code builds, left padding
        pad = torch.ones(B, S, dtype=torch.bool)
        pad[0, :2] = False
        am = fit.fastbig_mask(batch_size=B, q_length=S, kv_length=S, q_offset=0, kv_offset=0,
                              mask_function=causal_mask_function, attention_mask=pad,
                              config=model.config)
        assert isinstance(am, fit.StructuredMask)
    for dtype, backend in ((torch.float64, "reference"), (torch.float32, _fast_backend())):
        q = torch.randn(B, 4, S, 8, generator=g, dtype=dtype).requires_grad_()
        k = torch.randn(B, 2, S, 8, generator=g, dtype=dtype).requires_grad_()
        v = torch.randn(B, 2, S, dv, generator=g, dtype=dtype).requires_grad_()
        kw = dict(scaling=0.3, dropout=0.0)
        fit._warned.clear()
        with warnings.catch_warnings(), fastbig.backends.use(backend), _spy() as calls:
            warnings.simplefilter("error", fit.FastbigHandBackWarning)
            out, _ = fit.fastbig_attention(attn, q, k, v, am, **kw)
        assert calls["attention"] == 1
        dense = am.fastbig.dense() if isinstance(am, fit.StructuredMask) else am
        exp, _ = sdpa_attention_forward(attn, q, k, v, dense, **kw)
        assert out.shape == exp.shape == (B, S, 4, dv)
        keep = slice(None) if mask != "padded" else (slice(1, None),)  # row 0's padded queries
        tol = TOL64 if dtype == torch.float64 else TOL32
        assert rel_err(out[keep], exp[keep]) <= tol
        go = torch.randn(out.shape, generator=g, dtype=dtype)
        if mask == "padded":
            go[0] = 0
        got = torch.autograd.grad(out, (q, k, v), go)
        want = torch.autograd.grad(exp, (q, k, v), go)
        for name, a, b in zip("qkv", got, want):
            assert rel_err(a, b) <= tol * 10, name


def test_hf_vision_model_with_conv_patches_is_not_traced():
    """ViT's patch embedding is a Conv2d with no BatchNorm2d: nothing to fuse. accelerate traced it
    anyway, failed, warned "do not trace with torch.fx" and listed the model and its embeddings
    as skipped conv_bn_relu entries."""
    T = pytest.importorskip("transformers")
    model = T.ViTModel(T.ViTConfig(**_TOWER, image_size=32, patch_size=8))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        report = fastbig.accelerate(model)
    assert not [x for x in w if issubclass(x.category, AccelerateWarning)], [str(x.message) for x in w]
    assert not report.skipped, report.table()
    assert [e.kind for e in report.swapped] == ["attention", "attention"]


class _ConvNoBn(nn.Module):
    """Convolutions, no BatchNorm2d, and a forward torch.fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())

    def forward(self, x):
        h = self.conv(x)
        if h.sum() > 0:    # data-dependent control flow
            h = -h
        return self.block(h)


def test_convolutions_without_batchnorm_are_left_alone_silently():
    model = _ConvNoBn()
    ref = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        report = fastbig.accelerate(model)
    assert not [x for x in w if issubclass(x.category, AccelerateWarning)]
    assert report.swapped == [] and report.skipped == []
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(model(x), ref(x))
    # with a BatchNorm2d somewhere the untraceable module is reported, as before
    model.block.append(nn.BatchNorm2d(4))
    with pytest.warns(AccelerateWarning, match="trace"):
        report = fastbig.accelerate(model)
    assert any("trace" in e.reason for e in report.skipped)


# ---------------------------------------------------------------------------------------------
# torch.nn attention inside models
# ---------------------------------------------------------------------------------------------
def _encoder(batch_first, layers=2):
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_fast_path_is_reported(batch_first):
    """nn.TransformerEncoderLayer (batch_first) in inference (eval, no grad) runs
    torch._transformer_encoder_layer_fwd with its self_attn's weights and never calls self_attn:
    the swapped fastbig MultiheadAttention never ran there, and the report said "swapped" with no
    word of it. Now the report says so and accelerate warns once. The answers stay the stock ones:
    in inference torch's kernel; in training (and with grad) fastbig's, against float64."""
    torch.manual_seed(0)
    model = _encoder(batch_first)
    ref = copy.deepcopy(model).double()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        report = fastbig.accelerate(model)
    ours = [x for x in w if issubclass(x.category, AccelerateWarning)]
    rows = [e for e in report.swapped if e.kind == "attention"]
    assert [e.path for e in rows] == ["layers.0.self_attn", "layers.1.self_attn"]
    assert type(model.layers[0].self_attn) is fastbig.nn.MultiheadAttention
    if batch_first:
        assert len(ours) == 1 and "TransformerEncoderLayer" in str(ours[0].message), ours
        assert all("torch._transformer_encoder_layer_fwd" in e.reason for e in rows), report.table()
    else:  # no fast path without batch_first: fastbig runs, nothing to say
        assert not ours and not any("fused layer kernel" in e.reason for e in rows)
    B, S = 3, 7
    x = torch.randn((B, S, 16) if batch_first else (S, B, 16), dtype=torch.float64)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, 4:] = True
    for mode in ("eval", "train"):
        model.train(mode == "train"), ref.train(mode == "train")
        with torch.set_grad_enabled(mode == "train"), _spy() as calls:
            out = model(x.float(), src_key_padding_mask=kpm)
        exp = ref(x, src_key_padding_mask=kpm)
        keep = ~kpm if batch_first else ~kpm.T
        assert rel_err(out[keep], exp[keep]) <= TOL32, mode
        ran = calls["attention"] > 0
        assert ran == (mode == "train" or not batch_first), (mode, calls)
    g = torch.randn(exp.shape, dtype=torch.float64) * keep[..., None]
    out.backward(g.float())
    exp.backward(g)
    assert _grad_errors(model, ref) <= GRAD32


def test_transformer_seq2seq_matches_stock():
    """nn.Transformer (encoder, decoder self- and cross-attention with masks), seq-first."""
    torch.manual_seed(0)
    model = nn.Transformer(16, 2, 1, 1, 32, dropout=0.0)
    ref = copy.deepcopy(model).double()
    report = fastbig.accelerate(model)
    assert len([e for e in report.swapped if e.kind == "attention"]) == 3
    src, tgt = torch.randn(7, 3, 16, dtype=torch.float64), torch.randn(5, 3, 16, dtype=torch.float64)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    kw = dict(tgt_mask=mask, src_key_padding_mask=kpm, memory_key_padding_mask=kpm, tgt_is_causal=True)
    model.train(), ref.train()
    with _spy() as calls:
        out = model(src.float(), tgt.float(), **kw)
    exp = ref(src, tgt, **{k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                           for k, v in kw.items()})
    assert calls["attention"] == 3
    assert rel_err(out, exp) <= TOL32
    g = torch.randn(exp.shape, dtype=torch.float64)
    out.backward(g.float())
    exp.backward(g)
    assert _grad_errors(model, ref) <= GRAD32


class _PoolingHead(nn.Module):
    """SigLIP's multihead attention pooling: nn.MultiheadAttention called with need_weights left at
    torch's default (True)."""

    def __init__(self):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, 16))
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        return self.attention(self.probe.expand(x.shape[0], -1, -1), x, x)[0]


def test_multihead_attention_need_weights_default_hands_back_with_one_warning():
    """need_weights=True returns torch's weights, which only torch's implementation computes: the
    call runs torch's nn.MultiheadAttention (exactly the stock answer). It did so silently; now
    with one FastbigFallbackWarning (once, not per call)."""
    torch.manual_seed(0)
    model = _PoolingHead()
    ref = copy.deepcopy(model)
    fastbig.accelerate(model)
    assert type(model.attention) is fastbig.nn.MultiheadAttention
    x = torch.randn(2, 5, 16)
    fastbig.backends._reset_warnings()
    with pytest.warns(FastbigFallbackWarning, match="need_weights=True"), _spy() as calls:
        out = model(x)
    assert calls["attention"] == 0 and torch.equal(out, ref(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastbigFallbackWarning)
        assert torch.equal(model(x), ref(x))    # once, not per call
        # need_weights=False: fastbig's kernel, silently
        with _spy() as calls:
            a = model.attention(x, x, x, need_weights=False)[0]
        assert calls["attention"] == 1
        assert rel_err(a, ref.attention(x, x, x, need_weights=False)[0]) <= TOL32


def test_torchvision_vision_transformer():
    """torchvision's ViT: nn.MultiheadAttention (batch_first, need_weights=False) in each encoder
    block; eval and train, outputs and every gradient against the float64 stock model."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                        hidden_dim=32, mlp_dim=64, num_classes=5)
    ref = copy.deepcopy(model).double()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        report = fastbig.accelerate(model)
    assert not [x for x in w if issubclass(x.category, AccelerateWarning)]
    assert [e.path for e in report.swapped] == [f"encoder.layers.encoder_layer_{i}.self_attention"
                                                for i in range(2)] and not report.skipped
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for mode in (False, True):
        model.train(mode), ref.train(mode)
        with _spy() as calls:
            out = model(x.float())
        exp = ref(x)
        assert calls["attention"] == 2
        assert rel_err(out, exp) <= TOL32
    g = torch.randn(exp.shape, dtype=torch.float64)
    out.backward(g.float())
    exp.backward(g)
    assert _grad_errors(model, ref) <= GRAD32


# name -> (constructor kwargs, swapped kinds with counts, skipped entries): from the sweep
TV_CNN = {
    "densenet121": (dict(), {"conv_bn_relu": 59}, 0),          # BN -> ReLU -> conv: conv -> BN -> ReLU
    "mnasnet0_5": (dict(), {"conv_bn_relu": 35, "conv_bn": 17}, 0),
    "shufflenet_v2_x0_5": (dict(), {"conv_bn_relu": 37, "conv_bn": 19}, 0),
    "googlenet": (dict(aux_logits=False, init_weights=True), {"conv_bn": 57}, 0),  # F.relu: not a module
    "mobilenet_v3_small": (dict(), {"conv_bn_relu": 5, "conv_bn": 11}, 18),      # Hardswish: skipped
}


@pytest.mark.parametrize("name", list(TV_CNN))
def test_torchvision_cnn_eval(name):
    """torchvision CNNs: what is fused and what is skipped (with the activation named), and the
    eval outputs (float32) against the stock model in float64. (Train mode is covered by resnet18 in
    tests/test_accelerate.py: at 32 px these networks end in 1x1 maps where batch statistics over
    2 samples are so ill-conditioned that a 1e-14 change of the input moves the stock model's own
    gradients by 1e-4 to 1e-1.)"""
    tv = pytest.importorskip("torchvision")
    kw, kinds, n_skipped = TV_CNN[name]
    torch.manual_seed(0)
    model = getattr(tv.models, name)(num_classes=5, **kw)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    ref = copy.deepcopy(model).double().eval()
    keys = list(model.state_dict().keys())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        report = fastbig.accelerate(model)
    assert not [x for x in w if issubclass(x.category, AccelerateWarning)]
    got = {}
    for e in report.swapped:
        got[e.kind] = got.get(e.kind, 0) + 1
    assert got == kinds, report.table()
    assert len(report.skipped) == n_skipped, report.table()
    assert all("is not supported (ReLU, LeakyReLU)" in e.reason for e in report.skipped)
    assert list(model.state_dict().keys()) == keys
    model.eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(model(x.float()), ref(x)) <= TOL32


# ---------------------------------------------------------------------------------------------
# LSTMs the way user models call them
# ---------------------------------------------------------------------------------------------
class _Tagger(nn.Module):
    """Embedding -> pack_padded_sequence(enforce_sorted=False) -> flatten_parameters() ->
    2-layer bidirectional LSTM with projections -> pad_packed_sequence -> Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 12)
        self.lstm = nn.LSTM(12, 16, num_layers=2, bidirectional=True, batch_first=True, proj_size=8)
        self.out = nn.Linear(16, 5)

    def forward(self, x, lens):
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
        p = pack_padded_sequence(self.emb(x), lens, batch_first=True, enforce_sorted=False)
        self.lstm.flatten_parameters()
        o, (h, c) = self.lstm(p)
        o, _ = pad_packed_sequence(o, batch_first=True, total_length=x.shape[1])
        return self.out(o), h, c


class _Decoder(nn.Module):
    """LSTM encoder, LSTMCell decoder loop attending to the encoder states through
    nn.MultiheadAttention with need_weights=False."""

    def __init__(self):
        super().__init__()
        self.enc = nn.LSTM(6, 10, batch_first=True)
        self.cell = nn.LSTMCell(6, 10)
        self.att = nn.MultiheadAttention(10, 2, batch_first=True)
        self.out = nn.Linear(10, 6)

    def forward(self, src, tgt):
        mem, (h, c) = self.enc(src)
        h, c = h[0], c[0]
        outs = []
        for t in range(tgt.shape[1]):
            h, c = self.cell(tgt[:, t], (h, c))
            a, _ = self.att(h[:, None], mem, mem, need_weights=False)
            outs.append(self.out(a[:, 0]))
        return (torch.stack(outs, 1),)


@pytest.mark.parametrize("make", [_Tagger, _Decoder], ids=["packed-tagger", "lstmcell-decoder"])
def test_lstm_user_models(make):
    torch.manual_seed(0)
    model = make()
    ref = copy.deepcopy(model).double()
    report = fastbig.accelerate(model)
    assert not report.skipped and {e.kind for e in report.swapped} <= {"lstm", "attention"}
    assert len(report.swapped) == (1 if make is _Tagger else 3), report.table()
    if make is _Tagger:
        args = (torch.randint(0, 30, (4, 9)), torch.tensor([9, 3, 7, 1]))
    else:
        args = (torch.randn(3, 7, 6, dtype=torch.float64), torch.randn(3, 4, 6, dtype=torch.float64))
    model.train(), ref.train()
    out = model(*[a.float() if a.is_floating_point() else a for a in args])
    exp = ref(*args)
    for a, b in zip(out, exp):
        assert rel_err(a, b) <= TOL32
    gs = [torch.randn(b.shape, dtype=torch.float64) for b in exp]
    sum((a * g.float()).sum() for a, g in zip(out, gs)).backward()
    sum((b * g).sum() for b, g in zip(exp, gs)).backward()
    assert _grad_errors(model, ref) <= GRAD32


# ---------------------------------------------------------------------------------------------
# eager stock paths: the query rows that see no key
# ---------------------------------------------------------------------------------------------
def _gemma2():
    T = pytest.importorskip("transformers")
    return T.Gemma2ForCausalLM(T.Gemma2Config(**dict(_DEC, num_key_value_heads=2, head_dim=8,
                                                     sliding_window=3, attn_logit_softcapping=2.0,
                                                     query_pre_attn_scalar=8)))


def _llama_eager():
    T = pytest.importorskip("transformers")
    m = T.LlamaForCausalLM(T.LlamaConfig(**dict(_DEC, num_key_value_heads=2)))
    m.set_attn_implementation("eager")
    return m


def _bert_eager():
    T = pytest.importorskip("transformers")
    m = T.BertModel(T.BertConfig(**dict(_TOWER, vocab_size=V, max_position_embeddings=32,
                                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)))
    m.set_attn_implementation("eager")
    return m


@pytest.mark.parametrize("make", [_gemma2, _llama_eager, _bert_eager],
                         ids=["gemma2", "llama-eager", "bert-eager"])
def test_eager_models_padded_positions(make):
    """The eager path adds finfo.min to every score of a query row that may attend no key (the
    pad positions of a left-padded decoder batch; a fully padded encoder row): its softmax is
    uniform, its output the mean of v, and q/k still get that softmax's gradient. fastbig gave
    those rows 0: Gemma-2's logits at the pad positions were 100% off (0.42 over the whole
    output), and every gradient moved once the loss saw them. Now every position, and every
    gradient under an upstream gradient on every position, is the stock one."""
    torch.manual_seed(0)
    ref = make().float().train()
    model = copy.deepcopy(ref)
    fastbig.accelerate(model)
    ids = _ids(2, 9)
    am = torch.ones(2, 9, dtype=torch.long)
    if make is _bert_eager:
        am[1] = 0          # a row of padding only
        am[0, 6:] = 0
    else:
        am[0, :3] = 0      # left padding: query rows 0-2 of batch 0 see no key
    inputs = dict(input_ids=ids.masked_fill(am == 0, 0), attention_mask=am)
    # float32 on fastbig's kernel and on its reference (float64 has no stock twin here:
    # transformers' own float64 eager path turns a left-padded batch's row into NaN)
    for dtype, backend in ((torch.float32, _fast_backend()), (torch.float32, "reference")):
        model.zero_grad(set_to_none=True), ref.zero_grad(set_to_none=True)
        with fastbig.backends.use(backend), _spy() as calls:
            out = _outputs(model(**inputs))[0]
        exp = _outputs(ref(**inputs))[0]
        assert calls["attention"] > 0
        assert torch.isfinite(out).all()
        g = torch.randn(exp.shape, generator=torch.Generator().manual_seed(7), dtype=dtype)
        assert rel_err(out, exp) <= TOL32, backend
        (out * g).sum().backward()
        (exp * g).sum().backward()
        assert _grad_errors(model, ref) <= GRAD32, backend


def test_attention_additive_mask_row_at_the_floor_gets_the_math_gradient():
    """fastbig.ops.attention with an additive mask whose row is finfo.min on every key (what an
    eager model's mask gives a query that sees no key): the forward is the uniform softmax of the
    math, but the CPU kernel's backward (and SDPA's) recomputes P = exp(s - lse) with log(Sk) lost
    beside finfo.min, so that row's gradient came out Sk times too large (q, k, v relative errors
    1.7, 1.4, 1.3 at Sk 5). With a gradient needed, auto now takes the reference (one warning) and
    a forced fast backend refuses, naming why; without one the fast path still runs."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        q, k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=dtype).requires_grad_()
                   for n in (4, 5, 5))
        mask = torch.zeros(1, 1, 4, 5, dtype=dtype)
        mask[..., 0, :] = torch.finfo(dtype).min
        go = torch.randn(1, 2, 4, 8, generator=g, dtype=dtype)
        s = q @ k.transpose(-1, -2) / 8 ** 0.5 + mask
        want = torch.autograd.grad(torch.softmax(s, -1) @ v, (q, k, v), go)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FastbigFallbackWarning)
            out = ops_att.attention(q, k, v, attn_mask=mask)
        got = torch.autograd.grad(out, (q, k, v), go)
        tol = TOL32 if dtype == torch.float32 else TOL64
        for name, a, b in zip("qkv", got, want):
            assert rel_err(a, b) <= tol, (dtype, name)
    if fastbig.build_info()["loaded"]:
        q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
        mask = torch.zeros(1, 1, 4, 5)
        mask[..., 0, :] = torch.finfo(torch.float32).min
        with fastbig.backends.use("cpu"):
            with pytest.raises(RuntimeError, match="log-sum-exp"):
                ops_att.attention(q, k, v, attn_mask=mask)
            with torch.no_grad():  # no gradient: the kernel's forward is the math's
                out = ops_att.attention(q, k, v, attn_mask=mask)
        exp = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5 + mask, -1) @ v
        assert rel_err(out, exp) <= TOL32
