"""The benchmark harness (fastbig/bench): its correctness gate, timing, work counts, results
files, CLI errors, the O(S) memory claim of attention, and bench/gpu_run.sh's argument handling.
One tiny smoke run of the whole harness; no real benchmark runs here."""
import csv
import importlib
import json
import os
import subprocess

import pytest
import torch

import conftest
import fastbig
from fastbig.bench import cases, harness, report, roof, suite, timing
from fastbig.bench.cases import Case, Goal, Impl, NotAvailable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_RUN = os.path.join(ROOT, "bench", "gpu_run.sh")


# ---- tolerances and work counts -----------------------------------------------------------
def test_flop_counts():
    # attention: 4*B*H*Sq*Sk*D, halved when causal, backward 2.5x the forward
    assert cases.attention_flops(2, 3, 5, 5, 7, False, "fwd") == 4 * 2 * 3 * 5 * 5 * 7
    assert cases.attention_flops(2, 3, 5, 5, 7, True, "fwd") == 2 * 2 * 3 * 5 * 5 * 7
    assert cases.attention_flops(2, 3, 5, 5, 7, True, "fwd+bwd") == 3.5 * 2 * 2 * 3 * 5 * 5 * 7
    # lstm: 8*B*H*(I+H) a step and layer; layer 2 takes H inputs; backward 2x
    T, B, I, H = 3, 2, 5, 7
    one = 8 * B * H * (I + H) * T
    assert cases.lstm_flops(T, B, I, H, 1, "fwd") == one
    assert cases.lstm_flops(T, B, I, H, 2, "fwd") == one + 8 * B * H * (H + H) * T
    assert cases.lstm_flops(T, B, I, H, 1, "fwd+bwd") == 3 * one
    assert cases.lstm_flops(T, B, I, H, 1, "fwd", bidirectional=True) == 2 * one
    # conv: 2*N*K*C*R*S*P*Q / groups
    assert cases.conv_flops(2, 4, 6, 3, 3, 5, 5, 1, "fwd") == 2 * 2 * 6 * 4 * 9 * 25
    assert cases.conv_flops(2, 4, 6, 3, 3, 5, 5, 2, "fwd") == 2 * 6 * 4 * 9 * 25
    assert cases.conv_flops(2, 4, 6, 3, 3, 5, 5, 1, "fwd+bwd") == 3 * 2 * 2 * 6 * 4 * 9 * 25


def test_bytes_moved_follow_the_dtype():
    """BN+act's fused passes move 5 tensors of N*C*H*W elements (read z; write y; read dy, z; write
    dz): bytes at the run's dtype, not elements (the GB/s column was 4x low in float32)."""
    c = cases.bn_act_case(2, 3, 5)
    elems = 2 * 3 * 5 * 5
    assert c.unit == "B"
    assert c.work_for(torch.float32) == 5 * elems * 4
    assert c.work_for(torch.float16) == 5 * elems * 2
    att = cases.attention_case(1, 2, 17, 16, True, "fwd")
    assert att.work_for(torch.float16) == att.work_for(torch.float32) == att.work  # FLOPs: no dtype


def test_issue_shapes_in_the_table():
    names = {c.key for c in cases.get_cases("all", "cpu")}
    assert "attention/fwd+bwd B8 H8 S1024 D64 causal" in names
    assert "attention/fwd B1 H1 S8192 D64 (O(S) memory)" in names
    assert "lstm/train T100 B64 I256 H256 L2" in names
    assert "lstm/LSTMCell loop train T100 B64 I256 H256" in names
    assert "conv_bn_relu/train N32 C64->64 56x56 3x3" in names
    assert "conv_bn_relu/infer N8 C64->64 56x56 1x1" in {c.key for c in cases.get_cases("all", quick=True)}
    quick = cases.get_cases("all", "cpu", quick=True)
    compiled = [c.key for c in quick if c.compile_ok and any(i.compiled for i in c.impls)]
    assert 1 <= len(compiled) <= 2, compiled           # --quick: compile in one or two cases
    for c in quick:
        if not c.compile_ok:
            assert c.compile_skip_reason
    with pytest.raises(ValueError, match="op: expected"):
        cases.get_cases("nope")


def test_one_module_per_op():
    """fastbig/bench/cases/<op>.py holds the op's three tables; each case carries the op's name,
    once (the harness drops a repeated key)."""
    for op in cases.OPS + cases.EXTRA_OPS:
        mod = importlib.import_module(f"fastbig.bench.cases.{op}")
        assert all(callable(getattr(mod, t, None)) for t in ("cpu_cases", "gpu_cases", "smoke_cases"))
        for device in ("cpu", "cuda"):
            for kw in (dict(quick=True), dict(quick=False), dict(smoke=True)):
                got = [c.key for c in cases.get_cases(op, device, **kw)]
                assert got and all(k.startswith(op + "/") for k in got), (op, device, kw, got)
                assert len(set(got)) == len(got), (op, device, kw, got)
    every = [c.key for c in cases.get_cases("all", "cpu")]
    assert every == [c.key for op in cases.OPS for c in cases.get_cases(op, "cpu")]


def test_suites_share_the_table():
    ids = [p.id for p in suite.params("lstm")]
    want = [f"{c.name}|{i.name}".replace(" ", "_") for c in cases.get_cases("lstm", quick=True)
            for i in c.impls if "cpu" in i.devices]
    assert ids == want and ids


def test_kink_safe_grad_only_zeroes_near_the_kink():
    g = torch.randn(1000, dtype=torch.float64) + 3.0
    u = torch.linspace(-1, 1, 1000, dtype=torch.float64)
    out = cases.kink_safe_grad(g.float(), u, torch.float32)
    near = u.abs() < cases.KINK_MARGIN[torch.float32]
    assert (out[near] == 0).all() and (out[~near] == g.float()[~near]).all()


# ---- timing --------------------------------------------------------------------------------
def test_quantile():
    assert timing.quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert timing.quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.2) == pytest.approx(1.8)
    assert timing.quantile([], 0.5) != timing.quantile([], 0.5)      # nan


def test_time_cpu_alternates_rounds():
    calls = []
    clock = iter(range(10 ** 6)).__next__        # each clock read is 1 s later: no inner loop
    fns = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    res = timing.time_cpu(fns, min_samples=4, max_samples=4, budget_s=0.0, clock=clock,
                          min_sample_ms=0.0)
    timed = calls[3:]                            # after one warm-up call each
    assert timed == list("abc" "bca" "cab" "abc")
    assert all(len(t.samples_ms) == 4 and t.inner == 1 for t in res.values())
    assert timing.round_orders(["a", "b"], 3) == [["a", "b"], ["b", "a"], ["a", "b"]]


def test_time_cpu_drops_an_implementation_that_raises():
    n = {"calls": 0}

    def flaky():
        n["calls"] += 1
        if n["calls"] > 2:
            raise RuntimeError("second call failed")

    res = timing.time_cpu({"ok": lambda: None, "flaky": flaky}, min_samples=3, max_samples=3,
                          budget_s=0.0, min_sample_ms=0.0)
    assert len(res["ok"].samples_ms) == 3 and not res["ok"].error
    assert res["flaky"].error.startswith("RuntimeError") and not res["flaky"].samples_ms


def test_peak_memory_cpu_sees_torch_allocations():
    n = 32 << 20
    peak, how = timing.peak_memory(lambda: torch.empty(n, dtype=torch.uint8).fill_(1), "cpu")
    assert peak is not None, how
    assert n <= peak < 2 * n, peak


# ---- the correctness gate ------------------------------------------------------------------
def _toy_case(impls, goals=()):
    """y = x @ w (+ its gradient), tiny."""
    def make(device, dtype, gen):
        return {"x": cases.randn((5, 3), dtype, device, gen),
                "w": cases.randn((3, 4), dtype, device, gen), "dtype": dtype}

    def oracle(inp):
        return [inp["x"] @ inp["w"]]
    return Case("attention", "toy", "fwd", {}, make, oracle, impls, work=2 * 5 * 3 * 4,
                eager="eager", goals=list(goals), compile_ok=False, compile_skip_reason="toy")


def _impl(name, f, kind="baseline"):
    return Impl(name, kind, lambda inp: (lambda: f(inp)))


def _missing(inp):
    raise NotAvailable("toy: no such backend here")


def _poke(inp):
    inp["x"].add_(1.0)            # writes into the caller's tensor
    return [inp["x"] @ inp["w"]]


def _raise(inp):
    raise RuntimeError("kernel launch failed")


def _fallback(inp):
    import warnings

    import fastbig
    warnings.warn("fastbig.toy: no fast path for these inputs (test)",
                  fastbig.backends.FastbigFallbackWarning)
    return [inp["x"] @ inp["w"]]


@pytest.mark.filterwarnings("ignore::fastbig.backends.FastbigFallbackWarning")
def test_gate_wrong_results_post_no_time():
    impls = [
        _impl("fallback", _fallback, kind="fastbig"),
        _impl("eager", lambda i: [i["x"] @ i["w"]]),
        _impl("fastbig", lambda i: [(i["x"] @ i["w"]) * (1 + 1e-6)], kind="fastbig"),
        _impl("off", lambda i: [(i["x"] @ i["w"]) + 1e-3], kind="fastbig"),
        _impl("nan", lambda i: [(i["x"] @ i["w"]).fill_(float("nan"))], kind="fastbig"),
        _impl("shape", lambda i: [(i["x"] @ i["w"])[:2]], kind="fastbig"),
        _impl("poke", _poke, kind="fastbig"),
        Impl("missing", "fastbig", _missing),
        Impl("attr", "fastbig", lambda inp: torch.no_such_thing),
        _impl("boom", _raise, kind="fastbig"),
        _impl("compiled", lambda i: [i["x"] @ i["w"]]),
    ]
    impls[-1].compiled = True
    c = _toy_case(impls, goals=[Goal("fastbig", "eager", 0.0), Goal("off", "eager", 1.0)])
    rec = harness.run_case(c, "cpu", torch.float32, seed=1, quick=True, smoke=True)
    report.derive(rec, {"flops": 1e9, "bytes_per_s": 1e9})
    by = {r["impl"]: r for r in rec["impls"]}
    assert by["eager"]["status"] == "ok" and by["eager"]["err"] < 1e-6
    assert by["fallback"]["status"] == "ok" and "no fast path" in by["fallback"]["notes"][0]
    assert "FELL BACK" in report.status_text(by["fallback"])
    assert by["fastbig"]["status"] == "ok" and by["fastbig"]["median_ms"] > 0
    assert by["off"]["status"] == "WRONG" and by["off"]["err"] > conftest.TOL[torch.float32]
    assert by["nan"]["status"] == "WRONG" and by["nan"]["err"] == float("inf")
    assert by["shape"]["status"] == "WRONG" and "shape" in by["shape"]["reason"]
    assert by["poke"]["status"] == "WRONG" and "inputs" in by["poke"]["reason"]
    assert by["missing"]["status"] == "not available" and "no such backend" in by["missing"]["reason"]
    assert by["attr"]["status"] == "not available" and "AttributeError" in by["attr"]["reason"]
    assert by["boom"]["status"] == "ERROR" and "kernel launch failed" in by["boom"]["reason"]
    assert by["compiled"]["status"] == "skipped" and by["compiled"]["reason"] == "toy"
    for n in ("off", "nan", "shape", "poke", "missing", "attr", "boom", "compiled"):
        assert "median_ms" not in by[n], n                  # no time for them
        assert by[n]["speedup_vs_eager"] is None
    assert by["eager"]["speedup_vs_eager"] == 1.0
    assert by["fastbig"]["speedup_vs_best"] == pytest.approx(
        by["eager"]["median_ms"] / by["fastbig"]["median_ms"])
    assert by["fastbig"]["achieved_per_s"] == pytest.approx(120 / (by["fastbig"]["median_ms"] / 1e3))
    g_ok, g_off = rec["goals"]
    assert g_ok["met"] is True and g_ok["value"] > 0
    assert g_off["met"] is None and "WRONG" in g_off["why"]
    text = report.table({"device": "cpu", "device_name": "x", "threads": 1, "torch": "t",
                         "roof": {"flops": 1e9, "bytes_per_s": 1e9, "source": "s"},
                         "timer": "t", "memory_method": "m"}, [rec])
    assert "WRONG: err=" in text and "not available" in text and ">=0x eager" in text


# ---- the whole harness, tiny ---------------------------------------------------------------
def test_smoke_run_writes_results(tmp_path, capsys):
    threads = torch.get_num_threads()
    rc = harness.main(["--smoke", "--op", "all", "--out", str(tmp_path), "--seed", "3",
                       "--threads", "1"])
    assert torch.get_num_threads() == threads              # restored
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    assert "== attention" in out and "== lstm" in out and "== conv_bn_relu" in out
    assert "vs eager" in out and "roof:" in out
    assert "[" in err and "/" in err                             # the progress bar
    js = list(tmp_path.glob("cpu-*-smoke.json"))
    assert len(js) == 1
    data = json.loads(js[0].read_text())
    meta = data["meta"]
    for k in ("device", "device_name", "torch", "triton", "git_commit", "threads", "roof", "date"):
        assert k in meta, k
    assert meta["roof"]["flops"] > 0 and meta["roof"]["bytes_per_s"] > 0
    ops = {c["op"] for c in data["cases"]}
    assert ops == {"attention", "lstm", "conv_bn_relu", "models"}
    statuses = {r["status"] for c in data["cases"] for r in c["impls"]}
    assert statuses <= {"ok", "WRONG", "ERROR", "not available", "skipped"}
    timed = [r for c in data["cases"] for r in c["impls"] if r["status"] == "ok"]
    assert timed and all(r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
                         and r["err"] <= c_tol for r, c_tol in
                         ((r, conftest.TOL[torch.float32]) for r in timed))
    baseline_ok = {(c["case"], r["impl"]) for c in data["cases"] for r in c["impls"]
                   if r["kind"] == "baseline" and r["status"] == "ok"}
    assert any(i == "sdpa" for _, i in baseline_ok) and any(i == "torch.nn" for _, i in baseline_ok)
    with open(js[0].with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    assert rows and {"op", "case", "impl", "status", "metric", "value"} <= set(rows[0])
    assert any(r["metric"] == "median_ms" and r["value"] for r in rows)
    if "skipped: matplotlib" not in out:
        assert list(tmp_path.glob("*-attention.png"))


@pytest.mark.parametrize("argv,msg", [
    (["--op", "bogus"], "--op: expected"),
    (["--dtype", "int8"], "--dtype: expected"),
    (["--device", "tpu"], "--device: expected"),
    (["--threads", "0"], "--threads: expected a positive integer"),  # was silently ignored
    (["--threads", "-1"], "--threads: expected a positive integer"),  # was a traceback
])
def test_bad_arguments(argv, msg, capsys, tmp_path):
    assert harness.main(argv + ["--out", str(tmp_path)]) == 2
    assert msg in capsys.readouterr().err


def test_help_and_unknown_options_return_codes(capsys):
    assert harness.main(["--help"]) == 0
    assert "usage: fastbig bench" in capsys.readouterr().out
    assert harness.main(["--no-such-option"]) == 2
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu_is_a_clear_error(capsys, tmp_path):
    assert harness.main(["--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_thread_choice():
    assert harness.choose_threads(3, 2, 9.0, 2) == (3, "")            # --threads wins
    assert harness.choose_threads(None, 2, 0.5, 2) == (2, "")         # an idle machine
    n, why = harness.choose_threads(None, 2, 9.0, 2)                  # oversubscribed
    assert n == 1 and "load average is 9.0 on 2 CPUs" in why and "--threads 2" in why
    assert harness.choose_threads(None, 1, 9.0, 2) == (1, "")
    assert harness.choose_threads(None, 2, None, 2) == (2, "")


def test_results_names_and_datasheet():
    assert report.results_stem({"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3",
                                "date": "2026-11-23"}) == "cuda-h100-80gb-hbm3-2026-11-23"
    assert report.results_stem({"device": "cpu", "device_name": "AMD EPYC", "date": "2026-11-23",
                                "quick": True}) == "cpu-2026-11-23-quick"
    assert roof.datasheet_peak("NVIDIA H100 80GB HBM3") == (989.0, 3.35)
    assert roof.datasheet_peak("NVIDIA H200") == (989.0, 4.8)
    assert roof.datasheet_peak("NVIDIA A100-SXM4-80GB") == (312.0, 2.0)
    assert roof.datasheet_peak("NVIDIA H100 PCIe") is None
    assert roof.fmt_rate(1.5e12, "FLOP/s") == "1.5 TFLOP/s"


# ---- attention stays O(S) in memory ---------------------------------------------------------
def test_attention_s8192_memory_is_o_s():
    att = fastbig.ops.attention
    q, k, v = (conftest.randn(1, 1, 8192, 64) for _ in range(3))
    with fastbig.backends.use("auto"):
        peak, how = timing.peak_memory(lambda: att(q, k, v), "cpu")
    assert peak is not None, how
    # S x S fp32 scores would be 8192**2 * 4 bytes = 256 MiB; the output alone is 2 MiB
    assert peak < 32 << 20, f"peak extra memory {peak / 2**20:.1f} MiB"
    out = att(q[:, :, :64], k, v)
    ref = cases.attention_eager(q[:, :, :64].double(), k.double(), v.double())
    conftest.assert_close(out, ref, torch.float32)


# ---- bench/gpu_run.sh ------------------------------------------------------------------------
def _gpu_run(*args, env=None):
    e = dict(os.environ)
    e.pop("OUT", None)
    e.update(env or {})
    return subprocess.run(["bash", GPU_RUN, *args], capture_output=True, text=True, env=e,
                          cwd=ROOT, timeout=120)


def test_gpu_run_script_syntax():
    assert subprocess.run(["bash", "-n", GPU_RUN]).returncode == 0


def test_gpu_run_dry_run_plans_every_step(tmp_path):
    r = _gpu_run("--dry-run", env={"OUT": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    o = r.stdout
    assert "no prebuilt _C in" in o and "build (TORCH_CUDA_ARCH_LIST=" in o and "MAX_JOBS=16" in o
    assert "pytest tests -m cuda --ignore=tests/test_attention.py -v" in o
    assert "pytest tests/test_attention.py -v" in o
    # bf16 by default; attention vs SDPA flash and cuDNN only (=NAME: not fastbig-ref)
    assert "-m fastbig.bench --device cuda --dtype bfloat16 --no-plot --budget" in o
    assert "--impl =fastbig --impl =sdpa[flash] --impl =sdpa[cudnn]" in o
    assert "--op lstm --case H256 --case H1024" in o and "--op conv_bn_relu" in o
    assert not list(tmp_path.iterdir())                   # a dry run writes nothing
    r = _gpu_run("--dry-run", "--quick", "--op", "attention", "--dtype", "float16",
                 "--out", str(tmp_path / "x"), "--skip-tests")
    assert r.returncode == 0, r.stderr
    assert "--dtype float16" in r.stdout and "--quick --op attention" in r.stdout
    assert "-m pytest" not in r.stdout and "--op lstm" not in r.stdout
    r = _gpu_run("--dry-run", "--cpu", "--skip-build")
    assert r.returncode == 0 and "--device cpu" in r.stdout and "build" not in r.stdout.split("root=")[0]


def test_gpu_run_uses_a_prebuilt_extension_only_when_its_stamp_matches(tmp_path):
    import sys
    pre = tmp_path / "pre"
    pre.mkdir()
    (pre / "_C.cpython-312-x86_64-linux-gnu.so").write_bytes(b"")
    stamp = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "prebuilt_stamp.py"), "--archs", "9.0"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert stamp.startswith("python=cp%d%d torch=%s archs=9.0 sources=" % (sys.version_info[:2] + (torch.__version__,)))
    (pre / "STAMP").write_text(stamp + "\n")
    env = {"PYTHON": sys.executable}
    r = _gpu_run("--dry-run", "--prebuilt", str(pre), "--skip-tests", "--skip-bench", env=env)
    assert r.returncode == 0, r.stderr
    assert "prebuilt _C matches" in r.stdout and "build (prebuilt)" in r.stdout and "MAX_JOBS" not in r.stdout
    (pre / "STAMP").write_text(stamp.replace("sources=", "sources=0") + "\n")   # other sources: stale
    r = _gpu_run("--dry-run", "--prebuilt", str(pre), "--skip-tests", "--skip-bench", env=env)
    assert "stale or foreign" in r.stdout and "build (TORCH_CUDA_ARCH_LIST=9.0" in r.stdout


def test_gpu_run_cpu_run_packs_at_most_8_files(tmp_path):
    """The whole script for real on the CPU (C++ build skipped, a two-test file, the lstm smoke
    bench): logs, a summary with every step's exit code, the bench JSON in one archive."""
    import sys
    import tarfile
    (tmp_path / "test_two.py").write_text("def test_a():\n    pass\ndef test_b():\n    pass\n")
    out = tmp_path / "out"
    r = _gpu_run("--cpu", "--skip-build", "--op", "lstm", "--budget", "200", "--out", str(out),
                 env={"PYTHON": sys.executable, "FASTBIG_GPU_RUN_TESTS": str(tmp_path / "test_two.py")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench-results.tar.gz", "bench.log", "env.txt", "summary.txt", "tests.log"]
    summary = (out / "summary.txt").read_text()
    assert "tests " in summary and "bench lstm" in summary and "2 passed" in summary
    with tarfile.open(out / "bench-results.tar.gz") as tf:
        names = tf.getnames()
    assert any(n.startswith("results/lstm/") and n.endswith("-smoke.json") for n in names), names


def test_gpu_run_budget_spent_skips_steps_and_still_packs(tmp_path):
    import sys
    out = tmp_path / "out"
    r = _gpu_run("--cpu", "--skip-build", "--op", "lstm", "--budget", "10", "--out", str(out),
                 env={"PYTHON": sys.executable})
    assert r.returncode == 124, r.stdout[-2000:]                # a step cut by the budget fails
    summary = (out / "summary.txt").read_text()
    assert "not run, no time left" in (out / "tests.log").read_text()
    assert "tests " in summary and "exit 124" in summary
    assert len(list(out.iterdir())) <= 8


def test_gpu_pytest_alarm_fails_a_test_that_runs_too_long(tmp_path):
    import sys
    (tmp_path / "test_slow.py").write_text(
        "import time\n"
        "def test_slow():\n    time.sleep(30)\n"
        "def test_fast():\n    pass\n")
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "bench"))
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "gpu_pytest_alarm", "--alarm-timeout", "1", "-v",
                        "-p", "no:cacheprovider", str(tmp_path)], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=60)
    assert "test_slow FAILED" in r.stdout and "test_fast PASSED" in r.stdout, r.stdout[-2000:]
    assert "still running after 1 s (--alarm-timeout)" in r.stdout


def test_harness_budget_and_exact_impl_filter(tmp_path):
    assert harness.impl_selected("fastbig", ["=fastbig"]) and not harness.impl_selected("fastbig-ref", ["=fastbig"])
    assert harness.impl_selected("fastbig-ref", ["fastbig"]) and harness.impl_selected("sdpa[flash]", ["=sdpa[flash]"])
    rc = harness.main(["--smoke", "--device", "cpu", "--op", "lstm", "--dtype", "float32", "--out", str(tmp_path),
                       "--no-plot", "--budget", "0", "--impl", "=fastbig"])
    assert rc == 0
    data = json.loads(next(tmp_path.glob("cpu-*.json")).read_text())
    assert data["cases"] and all(c["note"].startswith("not run: --budget 0 s") and not c["impls"]
                                 for c in data["cases"])


@pytest.mark.parametrize("args,msg", [
    (["--bogus"], "unknown argument: --bogus"),
    (["--out"], "--out needs a value"),
    (["--op", "nope", "--dry-run"], "--op: expected"),
    (["--budget", "9m", "--dry-run"], "--budget: expected a whole number"),
])
def test_gpu_run_bad_arguments(args, msg):
    r = _gpu_run(*args)
    assert r.returncode == 2 and msg in r.stderr


def test_gpu_run_help_and_no_gpu():
    r = _gpu_run("--help")
    assert r.returncode == 0 and "usage: bash bench/gpu_run.sh" in r.stdout
    if not torch.cuda.is_available():
        r = _gpu_run()
        assert r.returncode == 2 and "no CUDA GPU" in r.stderr


# ---- on a GPU --------------------------------------------------------------------------------
@pytest.mark.cuda
def test_cuda_smoke_run(tmp_path, capsys):
    rc = harness.main(["--smoke", "--device", "cuda", "--op", "attention,lstm,conv_bn_relu",
                       "--dtype", "float16", "--out", str(tmp_path), "--no-plot"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    data = json.loads(next(tmp_path.glob("cuda-*.json")).read_text())
    timed = [r for c in data["cases"] for r in c["impls"] if r["status"] == "ok"]
    assert timed and all(r["median_ms"] > 0 and r["peak_mem_bytes"] is not None for r in timed)
    assert "do_bench" in timed[0]["timer"] or "CUDA events" in timed[0]["timer"]


@pytest.mark.cuda
def test_cuda_timer_fallback_matches_do_bench():
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    own = timing._cuda_events_all(lambda: x @ x, 5, 30)
    tri = timing._do_bench_all(lambda: x @ x, 5, 30)
    assert own and min(own) > 0
    if tri is not None:
        assert 0.3 < timing.quantile(own, 0.5) / timing.quantile(tri, 0.5) < 3.0
