"""Benchmark cases for Hugging Face transformers models through fastbig.accelerate
(``fastbig bench --op transformers``; not part of ``--op all``, transformers is optional).

A small Llama (hidden 512, 8 heads, 2 layers) in eval mode, no_grad, side by side:
``fastbig`` (the model after fastbig.accelerate: the "fastbig" attention and mask functions),
``sdpa`` (the stock model, attn_implementation="sdpa"), ``eager``. Two cases:

* prefill of a left-padded batch (the mask is causal + key padding);
* a 64-token decode against a 4k KV cache (teacher-forced: the next tokens are given, so every
  implementation runs the same steps; the cache is prefilled when the case is built, and each
  run crops it back to the prompt at its end, a slice).

The oracle is the stock model in float64 on the same inputs; the outputs checked are the logits
of the real (unpadded) positions, and of every decode step.
"""
from __future__ import annotations

import inspect
from typing import List

import torch

from ._base import Case, Goal, Impl, NotAvailable, _fastbig

VOCAB = 1024


def _transformers():
    try:
        import transformers
    except Exception as e:  # optional dependency
        raise NotAvailable(f"transformers is not installed ({type(e).__name__})") from None
    return transformers


def _llama(seed, dtype, device, attn, *, hidden, heads, layers):
    tf = _transformers()
    cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=VOCAB,
                         max_position_embeddings=8192, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = tf.LlamaForCausalLM(cfg)
    m = m.to(device=device, dtype=dtype).eval()
    if attn == "fastbig":
        m.set_attn_implementation("sdpa")
        _fastbig().accelerate(m)
    else:
        m.set_attn_implementation(attn)
    return m


def _left_padded(B, S, pad, device, gen):
    ids = torch.randint(1, VOCAB, (B, S), generator=gen).to(device)
    am = torch.ones(B, S, dtype=torch.long, device=device)
    for b in range(B):
        am[b, :pad * b] = 0
    return ids.masked_fill(am == 0, 0), am


def prefill_case(B=4, S=512, pad=64, *, hidden=512, heads=8, layers=2, goals=None, name=None) -> Case:
    def make(device, dtype, gen):
        ids, am = _left_padded(B, S, pad, device, gen)
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=gen))
        return {"ids": ids, "am": am, "seed": seed, "dtype": dtype, "device": device}

    def run(model, inp):
        keep = inp["am"].bool()
        with torch.no_grad():
            return [model(input_ids=inp["ids"], attention_mask=inp["am"]).logits[keep]]

    def build(attn):
        def b(inp):
            m = _llama(inp["seed"], inp["dtype"], inp["device"], attn, hidden=hidden, heads=heads,
                       layers=layers)
            return lambda: run(m, inp)
        return b

    def oracle(inp):
        return run(_llama(inp["seed"], torch.float64, inp["device"], "sdpa", hidden=hidden,
                          heads=heads, layers=layers), inp)

    impls = [Impl("fastbig", "fastbig", build("fastbig"), note="fastbig.accelerate(model)"),
             Impl("sdpa", "baseline", build("sdpa"), note='attn_implementation="sdpa" (stock)'),
             Impl("eager", "baseline", build("eager"), note='attn_implementation="eager"')]
    name = name or f"Llama prefill B{B} S{S} left-padded (h{hidden} H{heads} L{layers})"
    return Case("transformers", name, "infer", dict(B=B, S=S, hidden=hidden, heads=heads,
                                                    layers=layers), make, oracle, impls, 0.0, "",
                eager="eager", goals=goals or [], size=B * S, compile_ok=False,
                compile_skip_reason="a transformers model: torch.compile is not part of this case",
                note="no_grad prefill; checked: logits of the real positions")


def decode_case(B=2, cache=4096, steps=64, pad=256, *, hidden=512, heads=8, layers=2, goals=None,
                name=None) -> Case:
    def make(device, dtype, gen):
        ids, am = _left_padded(B, cache, pad, device, gen)
        nxt = torch.randint(1, VOCAB, (B, steps), generator=gen).to(device)
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=gen))
        return {"ids": ids, "am": am, "next": nxt, "seed": seed, "dtype": dtype, "device": device}

    def prepared(attn, inp, dtype):
        tf = _transformers()
        m = _llama(inp["seed"], dtype, inp["device"], attn, hidden=hidden, heads=heads, layers=layers)
        kv = tf.DynamicCache(config=m.config)
        # transformers 5.x renames past_key_values to cache
        ck = "cache" if "cache" in inspect.signature(m.forward).parameters else "past_key_values"
        with torch.no_grad():
            m(input_ids=inp["ids"], attention_mask=inp["am"], use_cache=True, **{ck: kv})

        def run():
            am = inp["am"]
            pos = am.sum(-1, keepdim=True) - 1
            outs = []
            with torch.no_grad():
                for t in range(steps):
                    am = torch.cat([am, am.new_ones(B, 1)], dim=1)
                    pos = pos + 1
                    out = m(input_ids=inp["next"][:, t:t + 1], attention_mask=am, position_ids=pos,
                            use_cache=True, **{ck: kv})
                    outs.append(out.logits[:, -1])
            kv.crop(-steps)
            return [torch.stack(outs, dim=1)]
        return run

    def build(attn):
        return lambda inp: prepared(attn, inp, inp["dtype"])

    def oracle(inp):
        return prepared("sdpa", inp, torch.float64)()

    impls = [Impl("fastbig", "fastbig", build("fastbig"), note="fastbig.accelerate(model)"),
             Impl("sdpa", "baseline", build("sdpa"), note='attn_implementation="sdpa" (stock)'),
             Impl("eager", "baseline", build("eager"), note='attn_implementation="eager"')]
    name = name or (f"Llama decode {steps} tokens, {cache // 1024 if cache >= 1024 else cache}"
                    f"{'k' if cache >= 1024 else ''} cache B{B} left-padded (h{hidden} H{heads} L{layers})")
    return Case("transformers", name, "infer", dict(B=B, cache=cache, steps=steps, hidden=hidden,
                                                    heads=heads, layers=layers), make, oracle, impls,
                0.0, "", eager="eager", goals=goals or [], size=cache, compile_ok=False,
                compile_skip_reason="a transformers model: torch.compile is not part of this case",
                note="teacher-forced decode with a DynamicCache; checked: the logits of every step")


# ---- the tables (the same on CPU and GPU) --------------------------------------------------
def cpu_cases(quick: bool) -> List[Case]:
    g = [Goal("fastbig", "sdpa", 0.97)]
    return [prefill_case(4, 256 if quick else 512, 64, goals=g),
            decode_case(2, 4096, 16 if quick else 64, 256, goals=g)]


gpu_cases = cpu_cases


def smoke_cases() -> List[Case]:
    g = [Goal("fastbig", "sdpa", 0.97)]
    return [prefill_case(2, 9, 3, hidden=32, heads=2, layers=1, goals=g),
            decode_case(2, 16, 3, 4, hidden=32, heads=2, layers=1, goals=g)]


def hf_cases(device: str, *, quick: bool = False, smoke: bool = False) -> List[Case]:
    """This op's cases, by the registry's rule (``get_cases("transformers", ...)``)."""
    return smoke_cases() if smoke else (gpu_cases if device == "cuda" else cpu_cases)(quick)
