"""Hugging Face transformers models through fastbig.accelerate: tiny random configs of real
architectures (no download), float32. Logits, every parameter's gradient and greedy generation
with a KV cache must match the model's stock attention path (sdpa, or eager where the model has
no sdpa path), as relative errors; on the CPU path (default backend) and on the Triton kernels
under the interpreter. Every call must run fastbig's kernel (no hand-back to the stock path), so a
feature that is handed back fails here instead of passing on the stock path's answer.

Also: every keyword transformers' own attention functions take (and its model code passes) is
either implemented or explicitly handed back by fastbig (IMPLEMENTED / HANDED_BACK), so a keyword
that a future transformers adds fails a test instead of being ignored.
"""
import ast
import contextlib
import copy
import importlib
import inspect
import pathlib
import re
import warnings

import pytest
import torch

import fastbig
from conftest import param_grad_errors, rel_err

transformers = pytest.importorskip("transformers")
fit = importlib.import_module("fastbig.integrations.transformers")
ops_att = importlib.import_module("fastbig.ops.attention")

LOGIT_TOL = 1e-5      # float32, the tolerance of tests/conftest.py
GRAD_TOL = 1e-4       # through two layers of a model, float32
ERRORS = {}           # label -> {what: relative error}, printed at the end (pytest -s)


# ---------------------------------------------------------------------------------------------
# machinery
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _spy():
    """Count fastbig.ops attention calls; make any hand-back to the stock path an error."""
    calls = {"attention": 0, "attention_varlen": 0}
    real = {k: getattr(ops_att, k) for k in calls}

    def wrap(name):
        def f(*a, **k):
            calls[name] += 1
            return real[name](*a, **k)
        return f
    for k in calls:
        setattr(ops_att, k, wrap(k))
    fit._warned.clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", fit.FastbigHandBackWarning)
            yield calls
    finally:
        for k, f in real.items():
            setattr(ops_att, k, f)


def _backend(name):
    return fastbig.backends.use(name) if name else contextlib.nullcontext()


def _record(label, what, err):
    ERRORS.setdefault(label, {})[what] = err


def _check_model(make, inputs, *, label, keep=None, backend=None, generate=True, gen_inputs=None,
                 varlen=False, grads=True):
    torch.manual_seed(0)
    ref = make().float().eval()
    model = copy.deepcopy(ref)
    report = fastbig.accelerate(model)
    assert any(e.kind == "attention" for e in report.swapped), report.table()
    assert not [e for e in report.skipped if e.kind == "attention"], report.table()
    tag = f"{label}[{backend or 'cpu'}]"

    def logits(m):
        out = m(**inputs)
        lg = out.logits if hasattr(out, "logits") else out.last_hidden_state
        return lg[keep] if keep is not None else lg

    with _backend(backend), _spy() as calls:
        out = logits(model)
    ref_out = logits(ref)
    assert calls["attention"] + calls["attention_varlen"] > 0, f"{tag}: fastbig never ran"
    if varlen:
        assert calls["attention_varlen"] > 0, f"{tag}: packed rows did not run attention_varlen"
    err = rel_err(out, ref_out)
    _record(tag, "logits", err)
    assert err <= LOGIT_TOL, f"{tag}: logits relative error {err:.2e}"

    if grads:
        g = torch.randn(out.shape)
        with _backend(backend), _spy():
            out.backward(g)
        ref_out.backward(g)
        worst = 0.0
        for name, e in param_grad_errors(model, ref).items():
            worst = max(worst, e)
            assert e <= GRAD_TOL, f"{tag}: gradient of {name}: relative error {e:.2e}"
        _record(tag, "grads (worst param)", worst)

    if generate:
        gi = gen_inputs or inputs
        kw = dict(max_new_tokens=4, do_sample=False, output_scores=True,
                  return_dict_in_generate=True, pad_token_id=0)
        with torch.no_grad():
            with _backend(backend), _spy() as calls:
                g1 = model.generate(**gi, **kw)
            g0 = ref.generate(**gi, **kw)
        assert calls["attention"] > 0
        assert torch.equal(g1.sequences, g0.sequences), f"{tag}: generated tokens differ"
        e = max(rel_err(a, b) for a, b in zip(g1.scores, g0.scores))
        _record(tag, "generate scores", e)
        assert e <= LOGIT_TOL, f"{tag}: generation scores relative error {e:.2e}"
    return model


def _ids(B, S, vocab=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (B, S), generator=g)


def _padded(B=2, S=7, left=True):
    ids = _ids(B, S)
    am = torch.ones(B, S, dtype=torch.long)
    if left:
        am[0, :3] = 0
    else:
        am[0, S - 3:] = 0
    ids = ids.masked_fill(am == 0, 0)
    return dict(input_ids=ids, attention_mask=am), am.bool()


# ---------------------------------------------------------------------------------------------
# configs (tiny, random)
# ---------------------------------------------------------------------------------------------
def llama(**kw):
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                   pad_token_id=0, **kw)
    return transformers.LlamaForCausalLM(cfg)


def mistral():
    cfg = transformers.MistralConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                     sliding_window=3, pad_token_id=0)
    return transformers.MistralForCausalLM(cfg)


def qwen2():
    cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, vocab_size=64,
                                   use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                   layer_types=["full_attention", "sliding_attention"], pad_token_id=0)
    return transformers.Qwen2ForCausalLM(cfg)


def gemma2():
    cfg = transformers.Gemma2Config(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    vocab_size=64, sliding_window=3, attn_logit_softcapping=2.0,
                                    final_logit_softcapping=30.0, query_pre_attn_scalar=8,
                                    pad_token_id=0)
    return transformers.Gemma2ForCausalLM(cfg)


def gpt_oss():
    cfg = transformers.GptOssConfig(hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    vocab_size=64, sliding_window=3, num_local_experts=2,
                                    num_experts_per_tok=1, pad_token_id=0)
    m = transformers.GptOssForCausalLM(cfg)
    with torch.no_grad():
        for mod in m.modules():
            if hasattr(mod, "sinks"):
                mod.sinks.normal_()   # zeros at init; random sinks make them matter
    return m


def bert(**kw):
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=37,
                                  max_position_embeddings=32, **kw)
    return transformers.BertModel(cfg)


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def t5():
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=1,
                                num_decoder_layers=1, num_heads=4, relative_attention_num_buckets=8,
                                relative_attention_max_distance=16, decoder_start_token_id=0,
                                pad_token_id=0, eos_token_id=1)
    return transformers.T5ForConditionalGeneration(cfg)


def bart(**kw):
    cfg = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2,
                                  encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=32,
                                  pad_token_id=0, bos_token_id=2, eos_token_id=1,
                                  decoder_start_token_id=2, forced_eos_token_id=None, **kw)
    return transformers.BartForConditionalGeneration(cfg)


def _eager(make, **kw):
    def f():
        m = make(**kw)
        m.set_attn_implementation("eager")
        return m
    return f


BACKENDS = [None, "triton"]


def _params(triton=True):
    """cpu, and the Triton kernels under the interpreter where ``triton`` (the interpreter is slow:
    the Triton runs cover GQA + padding + generation, sliding windows, packed rows, the position
    bias, softcap and sinks; the other architectures run on the CPU path only)."""
    return [pytest.param(b, id=b or "cpu") for b in (BACKENDS if triton else [None])]


# ---------------------------------------------------------------------------------------------
# decoder-only
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,left", [(b.values[0], True) for b in _params()] +
                         [(None, False)], ids=["left-pad-cpu", "left-pad-triton", "right-pad-cpu"])
def test_llama_gqa_padding(backend, left):
    inputs, keep = _padded(left=left)
    _check_model(llama, inputs, keep=keep, label=f"llama {'left' if left else 'right'}-pad",
                 backend=backend, generate=left)


@pytest.mark.parametrize("backend", _params())
def test_mistral_sliding_window(backend):
    inputs, keep = _padded(S=9)
    _check_model(mistral, inputs, keep=keep, label="mistral sliding", backend=backend)


@pytest.mark.parametrize("backend", _params(triton=False))
def test_qwen2_mqa_mixed_layers(backend):
    inputs, keep = _padded(S=9)
    _check_model(qwen2, inputs, keep=keep, label="qwen2 mqa+sliding", backend=backend)


@pytest.mark.parametrize("backend", _params())
def test_gemma2_softcap_sliding(backend):
    inputs, keep = _padded(S=9)
    # under the interpreter, generation (the decode path) is checked on Llama and Mistral only
    _check_model(gemma2, inputs, keep=keep, label="gemma2 softcap+sliding", backend=backend,
                 generate=backend is None)


@pytest.mark.parametrize("backend", _params())
def test_gpt_oss_sinks(backend):
    inputs, keep = _padded(S=9)
    m = gpt_oss()
    n_params = sum(p.numel() for p in m.parameters())
    assert n_params < 20_000, n_params   # the MoE config is tiny
    _check_model(gpt_oss, inputs, keep=keep, label="gpt-oss sinks", backend=backend,
                 generate=backend is None)


@pytest.mark.parametrize("backend", _params(triton=False))
def test_gpt2(backend):
    inputs, keep = _padded()
    _check_model(gpt2, inputs, keep=keep, label="gpt2", backend=backend)


@pytest.mark.parametrize("backend", _params())
def test_packed_sequences_position_ids(backend):
    """Several sequences in one row (DataCollatorWithFlattening): position_ids restart, no
    attention_mask; the stock sdpa path builds a block-diagonal causal mask, fastbig runs
    attention_varlen. Also with the flash-attention keywords cu_seq_lens_* / max_length_*."""
    lens = [3, 5, 2]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    ids = _ids(1, sum(lens))
    # use_cache=False (training): with a cache, transformers does not look for packing at all
    if backend is None:  # under the interpreter: the run with the keywords below covers it
        _check_model(llama, dict(input_ids=ids, position_ids=pos, use_cache=False),
                     label="llama packed", backend=backend, generate=False, varlen=True)
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    _check_model(llama, dict(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                             max_length_q=5, max_length_k=5, use_cache=False),
                 label="llama packed+cu_seq_lens", backend=backend, generate=False, varlen=True)


def test_packed_keywords_that_disagree_are_handed_back():
    """cu_seq_lens that contradict the mask: the stock path follows the mask; so does fastbig (by
    handing the call back, with one warning)."""
    torch.manual_seed(0)
    ref = llama().eval()
    model = copy.deepcopy(ref)
    fastbig.accelerate(model)
    ids = _ids(1, 10)
    pos = torch.cat([torch.arange(3), torch.arange(7)])[None]
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    fit._warned.clear()
    with pytest.warns(fit.FastbigHandBackWarning, match="disagree"):
        out = model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                    max_length_q=5, max_length_k=5, use_cache=False).logits
    assert rel_err(out, ref(input_ids=ids, position_ids=pos, use_cache=False).logits) == 0.0


# ---------------------------------------------------------------------------------------------
# encoders, encoder-decoders
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", _params(triton=False))
def test_bert_encoder_padding(backend):
    inputs, keep = _padded()
    _check_model(bert, inputs, keep=keep, label="bert", backend=backend, generate=False)


@pytest.mark.parametrize("backend", _params())
def test_t5_position_bias_cross_attention(backend):
    inputs, keep = _padded(left=False)
    dec = _ids(2, 4, seed=3)
    # generation under the interpreter is slow: checked on the CPU path
    _check_model(t5, dict(inputs, decoder_input_ids=dec), label="t5", backend=backend,
                 gen_inputs=inputs, generate=backend is None)


@pytest.mark.parametrize("backend", _params(triton=False))
def test_bart_cross_attention(backend):
    inputs, keep = _padded(left=False)
    dec = _ids(2, 4, seed=3)
    _check_model(bart, dict(inputs, decoder_input_ids=dec), label="bart", backend=backend,
                 gen_inputs=inputs)


@pytest.mark.parametrize("make,label", [(_eager(llama), "llama eager"), (_eager(bert), "bert eager")])
def test_eager_stock_models(make, label):
    """Models loaded with attn_implementation='eager' (and the eager-only families the
    fingerprints cover) match their eager path."""
    inputs, keep = _padded()
    _check_model(make, inputs, keep=keep, label=label, generate=False)


# ---------------------------------------------------------------------------------------------
# the rules
# ---------------------------------------------------------------------------------------------
def test_gemma2_and_gpt_oss_never_wrong():
    """issue 15: Gemma-2 raised (softcap handed to transformers' sdpa), GPT-OSS was 41% off
    (sinks dropped). Whatever fastbig.ops has, their answers equal the stock eager path's."""
    for make in (gemma2, gpt_oss):
        torch.manual_seed(0)
        ref = make().eval()
        model = copy.deepcopy(ref)
        fastbig.accelerate(model)
        inputs, keep = _padded(S=9)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fit.FastbigHandBackWarning)
            out = model(**inputs).logits[keep]
        assert rel_err(out, ref(**inputs).logits[keep]) <= LOGIT_TOL


def _attention_keywords():
    """Keywords that reach an attention function: those of transformers' own attention functions,
    of every model's eager_attention_forward, those passed at every attention_interface(...)
    call in the model code, and the kwargs typed dicts that flow through **kwargs."""
    from transformers.integrations.flash_attention import flash_attention_forward
    from transformers.integrations.flex_attention import flex_attention_forward
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_flash_attention_utils import FlashAttentionKwargs
    from transformers.utils.generic import TransformersKwargs
    found = {}

    def add(names, where):
        for n in names:
            found.setdefault(n, where)

    def params(fn):
        ps = list(inspect.signature(fn).parameters.values())[1:]  # drop `module`
        return [p.name for p in ps if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    for fn in (sdpa_attention_forward, flash_attention_forward, flex_attention_forward):
        add(params(fn), fn.__name__)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    for name in ALL_ATTENTION_FUNCTIONS.valid_keys():
        if name != fit.NAME:
            add(params(ALL_ATTENTION_FUNCTIONS[name]), f"AttentionInterface[{name!r}]")
    add(TransformersKwargs.__annotations__, "TransformersKwargs")
    add(FlashAttentionKwargs.__annotations__, "FlashAttentionKwargs")

    def balanced(src, i):
        depth = 0
        for j in range(i, len(src)):
            if src[j] == "(":
                depth += 1
            elif src[j] == ")":
                depth -= 1
                if depth == 0:
                    return src[i:j + 1]
        return None
    root = pathlib.Path(transformers.__file__).parent / "models"
    n_eager = n_calls = 0
    for f in sorted(root.glob("*/modeling_*.py")):
        src = f.read_text()
        for m in re.finditer(r"def eager_attention_forward\s*\(", src):
            fn = ast.parse("def f" + balanced(src, m.end() - 1) + ": pass").body[0]
            a = fn.args
            add([x.arg for x in (a.args + a.kwonlyargs)[1:]], f"{f.parent.name} eager_attention_forward")
            n_eager += 1
        for m in re.finditer(r"\battention_interface\s*\(", src):
            call = ast.parse("f" + balanced(src, m.end() - 1), mode="eval").body
            add([k.arg for k in call.keywords if k.arg], f"{f.parent.name} attention_interface call")
            n_calls += 1
    assert n_eager > 100 and n_calls > 100, (n_eager, n_calls)  # the scan found the model code
    return found


def test_every_transformers_attention_keyword_is_implemented_or_handed_back():
    found = _attention_keywords()
    for must in ("dropout", "scaling", "softcap", "s_aux", "position_bias", "sliding_window",
                 "cu_seq_lens_q", "is_causal"):
        assert must in found
    missing = {k: w for k, w in found.items() if k not in fit.IMPLEMENTED and k not in fit.HANDED_BACK}
    assert not missing, ("keywords transformers passes to attention functions that fastbig neither "
                         f"implements nor hands back (add them to IMPLEMENTED or HANDED_BACK): {missing}")


def test_unknown_keyword_is_handed_back_once():
    torch.manual_seed(0)
    ref = llama().eval()
    model = copy.deepcopy(ref)
    fastbig.accelerate(model)
    attn = model.model.layers[0].self_attn
    q = torch.randn(2, 4, 5, 8)
    k = torch.randn(2, 2, 5, 8)
    v = torch.randn(2, 2, 5, 8)
    fit._warned.clear()
    with pytest.warns(fit.FastbigHandBackWarning, match="some_future_keyword"):
        out, _ = fit.fastbig_attention(attn, q, k, v, None, scaling=0.3, some_future_keyword=1)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    exp, _ = sdpa_attention_forward(attn, q, k, v, None, scaling=0.3, some_future_keyword=1)
    assert torch.equal(out, exp)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fit.FastbigHandBackWarning)   # once, not per call
        fit.fastbig_attention(attn, q, k, v, None, scaling=0.3, some_future_keyword=1)


def test_output_attentions_hands_back_to_eager_weights():
    torch.manual_seed(0)
    ref = gemma2().eval()
    model = copy.deepcopy(ref)
    fastbig.accelerate(model)
    inputs, _ = _padded()
    fit._warned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fit.FastbigHandBackWarning)
        out = model(**inputs, output_attentions=True)
    exp = ref(**inputs, output_attentions=True)
    assert out.attentions is not None and len(out.attentions) == 2
    for a, b in zip(out.attentions, exp.attentions):
        assert torch.equal(a, b)


def test_structured_mask_materializes_on_any_op():
    """A model that touches its mask gets the stock dense mask; metadata reads as the stock's."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask
    am = torch.ones(2, 6, dtype=torch.bool)
    am[0, :2] = False
    cfg = transformers.LlamaConfig()
    cfg._attn_implementation_internal = fit.FastbigImpl("sdpa")
    kw = dict(batch_size=2, q_length=6, kv_length=6, q_offset=0, kv_offset=0,
              mask_function=causal_mask_function, attention_mask=am, config=cfg,
              allow_is_causal_skip=True, device=torch.device("cpu"))
    m = fit.fastbig_mask(**kw)
    kw.pop("config")
    exp = sdpa_mask(**kw)
    assert isinstance(m, fit.StructuredMask)
    assert m.shape == exp.shape and m.dtype == exp.dtype and m.dim() == 4
    assert m.fastbig.padding is not None and m.fastbig.hi == 0 and m.fastbig.lo is None
    sliced = m[:, :, :, :4]
    assert type(sliced) is torch.Tensor and torch.equal(sliced, exp[:, :, :, :4])
    assert torch.equal(torch.where(m, 1.0, 0.0), torch.where(exp, 1.0, 0.0))
    assert torch.equal(copy.deepcopy(m), exp)


def test_accelerate_report_and_config_survive_copy():
    model = gemma2()
    report = fastbig.accelerate(model)
    rows = [e for e in report.swapped if e.kind == "attention"]
    assert [e.path for e in rows] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert "'eager' -> 'fastbig'" in rows[0].reason and "softcap" in rows[0].reason
    assert model.config._attn_implementation == "fastbig"
    assert model.config._attn_implementation.stock == "eager"
    clone = copy.deepcopy(model)
    assert clone.config._attn_implementation.stock == "eager"
    assert "_attn_implementation_internal" not in model.config.to_dict()


@pytest.fixture(scope="module", autouse=True)
def _print_errors():
    """Prints the relative errors the tests measured (pytest -s)."""
    yield
    for label, errs in sorted(ERRORS.items()):
        print(f"{label:40s} " + "  ".join(f"{k}={v:.1e}" for k, v in errs.items()))


# ---------------------------------------------------------------------------------------------
# the drop-ins: every argument of torch's SDPA and MultiheadAttention is implemented or handed
# back; the SDPA drop-in takes SDPA's shape rules
# ---------------------------------------------------------------------------------------------
def test_sdpa_and_mha_arguments_are_all_covered():
    from fastbig.nn.attention import MHA_FORWARD_ARGUMENTS
    from fastbig.nn.functional import SDPA_PARAMETERS
    schema = torch.ops.aten.scaled_dot_product_attention.default._schema
    assert {a.name for a in schema.arguments} == set(SDPA_PARAMETERS)
    torch_mha = set(inspect.signature(torch.nn.MultiheadAttention.forward).parameters) - {"self"}
    assert torch_mha == set(MHA_FORWARD_ARGUMENTS)
    ours = set(inspect.signature(fastbig.nn.MultiheadAttention.forward).parameters) - {"self"}
    assert ours == torch_mha


SDPA_SHAPES = [  # (q, k, v, enable_gqa): batch dims broadcast as in torch's SDPA
    ((4, 5, 8), (2, 4, 6, 8), (2, 4, 6, 8), False),       # rank-3 query, rank-4 key/value
    ((2, 4, 5, 8), (4, 6, 8), (4, 6, 8), False),
    ((5, 8), (2, 4, 6, 8), (2, 4, 6, 8), False),          # rank-2 query
    ((2, 4, 5, 8), (6, 8), (6, 8), False),
    ((1, 4, 5, 8), (2, 4, 6, 8), (2, 4, 6, 8), False),    # batch 1 against 2
    ((2, 4, 5, 8), (2, 4, 6, 8), (1, 4, 6, 8), False),    # key and value batches differ
    ((3, 2, 4, 5, 8), (2, 4, 6, 8), (2, 4, 6, 8), False),
    ((2, 4, 5, 8), (2, 1, 6, 8), (2, 4, 6, 8), False),    # one key head broadcasts
    ((2, 1, 5, 8), (2, 4, 6, 8), (2, 4, 6, 8), False),    # one query head broadcasts
    ((4, 5, 8), (2, 2, 6, 8), (2, 2, 6, 8), True),        # GQA, rank-3 query
    ((2, 4, 5, 8), (2, 1, 6, 8), (2, 2, 6, 8), True),     # GQA, key and value heads differ
    ((2, 4, 5, 8), (2, 3, 6, 8), (2, 3, 6, 8), True),     # 3 does not divide 4: an error
    ((2, 4, 5, 8), (2, 2, 6, 8), (2, 2, 6, 8), False),    # heads differ without GQA: an error
]


@pytest.mark.parametrize("mask", [None, (4, 5, 6), (2, 1, 5, 6), "causal"])
@pytest.mark.parametrize("shapes", SDPA_SHAPES, ids=lambda s: "x".join(map(str, s[0])) + "-" +
                         "x".join(map(str, s[1])) + "-" + "x".join(map(str, s[2])) + ("-gqa" if s[3] else ""))
def test_sdpa_drop_in_shape_rules(shapes, mask):
    qs, ks, vs, gqa = shapes
    torch.manual_seed(0)
    q, k, v = (torch.randn(*s, dtype=torch.float64) for s in (qs, ks, vs))
    kw = dict(enable_gqa=gqa, is_causal=mask == "causal")
    if isinstance(mask, tuple):
        kw["attn_mask"] = torch.rand(*mask) > 0.3
    try:
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)
    except (RuntimeError, IndexError):
        with pytest.raises(RuntimeError):
            fastbig.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw)
        return
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    out = fastbig.nn.functional.scaled_dot_product_attention(qf, kf, vf, **kw)
    assert out.shape == ref.shape
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), fin)
    assert rel_err(out[fin], ref[fin]) <= LOGIT_TOL
    g = torch.randn(ref.shape, dtype=torch.float64)
    rq, rk, rv = (t.clone().requires_grad_() for t in (q, k, v))
    rg = torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(rq, rk, rv, **kw),
                             (rq, rk, rv), g)
    og = torch.autograd.grad(out, (qf, kf, vf), g.float())
    for name, a, b in zip("qkv", og, rg):
        assert a.shape == b.shape
        assert rel_err(a, b) <= LOGIT_TOL, name


def test_static_cache_generation_uses_the_dense_path():
    """A static cache gives tensor offsets: not decoded, the stock dense mask is used (correct)."""
    inputs, _ = _padded()
    torch.manual_seed(0)
    ref = llama().eval()
    model = copy.deepcopy(ref)
    fastbig.accelerate(model)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, cache_implementation="static",
              output_scores=True, return_dict_in_generate=True)
    with torch.no_grad(), _spy() as calls:
        g1 = model.generate(**inputs, **kw)
    g0 = ref.generate(**inputs, **kw)
    assert calls["attention"] > 0
    assert torch.equal(g1.sequences, g0.sequences)
    assert max(rel_err(a, b) for a, b in zip(g1.scores, g0.scores)) <= LOGIT_TOL


def test_dropout_is_applied_in_training():
    torch.manual_seed(0)
    model = llama(attention_dropout=0.5).train()
    fastbig.accelerate(model)
    seen = []
    real = ops_att.attention

    def spy(*a, **k):
        seen.append(k.get("dropout_p"))
        return real(*a, **k)
    ops_att.attention = spy
    try:
        ids = _ids(2, 6)
        torch.manual_seed(1)
        a = model(input_ids=ids).logits
        torch.manual_seed(1)
        b = model(input_ids=ids).logits
        c = model(input_ids=ids).logits
        model.eval()
        d = model(input_ids=ids).logits
    finally:
        ops_att.attention = real
    assert seen[:2] == [0.5, 0.5] and seen[-1] == 0.0
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


def test_bench_cases_smoke():
    """The bench cases (tiny): fastbig and stock sdpa both pass the float64 check."""
    from fastbig.bench import harness
    from fastbig.bench.cases.transformers import hf_cases
    for case in hf_cases("cpu", smoke=True):
        inp = case.make("cpu", torch.float32, torch.Generator().manual_seed(1))
        ref = case.oracle(inp)
        for impl in case.impls[:2]:
            res = harness.check_impl(impl.build(inp), ref, inp, LOGIT_TOL)
            assert res["status"] == "ok", (case.name, impl.name, res)
