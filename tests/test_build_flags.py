"""The CUDA build's nvcc flags: no --use_fast_math, and no approximate tanh or division in the
float32 kernels' PTX for sm_90 (tanh.approx.f32 is ~5e-4 relative: the CUDA LSTM could not meet
the float32 bound). Compiles with nvcc, no GPU needed; skipped where nvcc is absent.

The PTX comes from a reduced translation unit of each .cu file (its kernels and device helpers
without torch's headers, tools/nvcc_flags.kernels_only_tu): a few seconds instead of ~1-2 min a
file. tools/ptxas_report.py compiles the whole files and checks that their float32 kernels' PTX
is the same as the reduced unit's.
"""
import importlib.util
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = ["csrc/lstm/lstm_cuda.cu", "csrc/conv_bn_relu/conv_bn_relu_cuda.cu"]
APPROX = ("tanh.approx.f32", "div.approx")  # ex2.approx is part of the accurate expf: no signal


if not os.path.exists(os.path.join(ROOT, "setup.py")) or not os.path.isdir(os.path.join(ROOT, "csrc")):
    pytest.skip("needs the source checkout (setup.py, csrc/, tools/): .ci/run's installed-wheel pass has "
                "only tests/", allow_module_level=True)


def _nvcc_flags():
    spec = importlib.util.spec_from_file_location("_fastbig_nvcc_flags", os.path.join(ROOT, "tools", "nvcc_flags.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


nf = _nvcc_flags()


def test_setup_py_imports_without_building_and_has_no_fast_math():
    setup = nf.load_setup()  # runs setup.py's top level; main() must not run (it would call setup())
    assert isinstance(setup.NVCC_FLAGS, list) and "-O3" in setup.NVCC_FLAGS
    assert not any("fast_math" in f or "fast-math" in f for f in setup.NVCC_FLAGS), setup.NVCC_FLAGS
    assert not any(f.startswith(("--ftz", "-ftz", "--prec-div", "-prec-div")) for f in setup.NVCC_FLAGS)


def test_setup_main_passes_its_nvcc_flags_to_the_cuda_extension(monkeypatch, tmp_path):
    """main() as pip runs it, with a CUDA torch and a toolkit 'found': the nvcc flags it hands to
    CUDAExtension are NVCC_FLAGS (what the PTX test below compiles with), nothing else."""
    import torch
    from torch.utils import cpp_extension

    setup = nf.load_setup()
    captured = {}

    def fake_ext(name, sources, **kw):
        captured.update(name=name, sources=sources, **kw)
        return ("ext", name)

    monkeypatch.setattr(cpp_extension, "CUDAExtension", fake_ext)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
    monkeypatch.setattr(setup, "_find_cuda_home", lambda: str(tmp_path))
    monkeypatch.setattr(setup, "setup", lambda **kw: captured.setdefault("setup", kw))
    for var in ("FASTBIG_CPU_ONLY", "CUDA_HOME", "TORCH_CUDA_ARCH_LIST", "MAX_JOBS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(ROOT)
    setup.main()
    assert captured["name"] == "fastbig._C"
    assert captured["extra_compile_args"]["nvcc"] == setup.NVCC_FLAGS
    assert any(s.endswith(".cu") for s in captured["sources"])
    assert captured["setup"]["ext_modules"] == [("ext", "fastbig._C")]


@pytest.mark.parametrize("src", CU_FILES)
def test_fp32_kernels_ptx_sm90_has_no_approximate_tanh_or_division(src, tmp_path):
    nvcc = nf.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA_HOME, /usr/local/cuda, PATH): cannot compile to PTX")
    text, n_kernels = nf.kernels_only_tu(os.path.join(ROOT, src), dtype="float")
    tu = tmp_path / (os.path.basename(src)[:-3] + "_kernels.cu")
    tu.write_text(text)

    def ptx(extra, name):
        out = tmp_path / name
        r = subprocess.run(nf.nvcc_command(str(tu), "90", str(out), "ptx", extra),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, "nvcc failed on the reduced unit of %s:\n%s" % (src, r.stderr[-4000:])
        return out.read_text()

    code = ptx([], "plain.ptx")
    assert code.count(".entry ") == n_kernels  # every float kernel of the file was compiled
    found = {a: code.count(a) for a in APPROX}
    assert not any(found.values()), "%s: approximate instructions in the fp32 PTX: %s" % (src, found)
    # The control: the same unit with --use_fast_math does show them, so the check above can fail.
    fast = ptx(["--use_fast_math"], "fast.ptx")
    assert fast.count("div.approx") > 0
    if "lstm" in src:
        assert fast.count("tanh.approx.f32") > 0
