"""The nvcc command line that setup.py's CUDA build uses for one .cu file of csrc/, for checks
that compile one file without building the extension (tools/nvcc_check.sh, tools/ptxas_report.py,
tests/test_build_flags.py).

setup.py's own NVCC_FLAGS list is imported from setup.py (not copied), and the flags that
torch's cpp_extension adds to every nvcc call (COMMON_NVCC_FLAGS, -std=c++20, -fPIC, the
extension defines) are taken from torch, so a flag removed from setup.py is removed here too.

    python tools/nvcc_flags.py csrc/lstm/lstm_cuda.cu --arch 90 --ptx /tmp/lstm.ptx  # runs nvcc
    python tools/nvcc_flags.py csrc/lstm/lstm_cuda.cu --print                         # prints it
"""
import argparse
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_setup():
    """setup.py as a module, without building: its main() runs only as __main__."""
    spec = importlib.util.spec_from_file_location("_fastbig_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def find_nvcc():
    """Path of nvcc as setup.py finds the toolkit, or None."""
    home = load_setup()._find_cuda_home()
    return os.path.join(home, "bin", "nvcc") if home else None


def nvcc_command(src, arch="90", out=None, mode="ptx", extra=()):
    """The argv of nvcc compiling SRC for sm_ARCH: mode "ptx" (--ptx), "obj" (-c) or "cubin"."""
    import torch
    from torch.utils import cpp_extension

    setup = load_setup()
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (CUDA_HOME, /usr/local/cuda, PATH)")
    incs = [os.path.join(ROOT, "csrc")] + list(cpp_extension.include_paths(device_type="cuda"))
    incs += setup._nvidia_wheel_includes() + [sysconfig.get_paths()["include"]]
    defines = ["TORCH_API_INCLUDE_EXTENSION_H", "TORCH_EXTENSION_NAME=_C", "FASTBIG_WITH_CUDA=1",
               'FASTBIG_TORCH_VERSION="%s"' % torch.__version__.split("+")[0],
               'FASTBIG_CUDA_ARCHS="%s"' % "%s.%s" % (arch[:-1], arch[-1])]
    if mode == "ptx":
        target = ["--ptx", "-arch=compute_%s" % arch]
    elif mode == "cubin":
        target = ["--cubin", "-arch=sm_%s" % arch]
    elif mode == "obj":
        target = ["-c", "-gencode", "arch=compute_%s,code=sm_%s" % (arch, arch)]
    else:
        raise ValueError("mode: expected 'ptx', 'cubin' or 'obj', got %r" % (mode,))
    cmd = [nvcc, src] + target + ["-I" + d for d in incs] + ["-D" + d for d in defines]
    cmd += list(cpp_extension.COMMON_NVCC_FLAGS) + ["-std=c++20", "--compiler-options", "-fPIC"]
    cmd += list(setup.NVCC_FLAGS) + list(extra)
    if out is not None:
        cmd += ["-o", out]
    return cmd


_TORCH_INCLUDE = re.compile(r'#\s*include\s*<(torch|ATen|c10|cuda_runtime|cublas)[^>]*>')
_INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.M)
_KERNEL = re.compile(r'template\s*<([^<>]*)>\s*__global__\s+void\s+(\w+)\s*\(')


def _needs_torch(header, seen=None):
    """Whether csrc/HEADER includes torch/ATen/c10 headers, itself or through csrc/ headers."""
    seen = set() if seen is None else seen
    if header in seen:
        return False
    seen.add(header)
    path = os.path.join(ROOT, "csrc", header)
    if not os.path.exists(path):
        return True  # not ours: a system or torch header
    text = open(path).read()
    if _TORCH_INCLUDE.search(text):
        return True
    return any(_needs_torch(h, seen) for q, h in _INCLUDE.findall(text) if q == '"')


def brace_end(text, i):
    """Index just past the brace block that opens at the first '{' at or after i."""
    i = text.index("{", i)
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return j + 1
    raise ValueError("unbalanced braces after offset %d" % i)


def kernels_only_tu(src, dtype="float"):
    """A reduced translation unit of SRC (a csrc/ .cu file) for a fast device-code check: the
    file's text before its first __global__ kernel (includes, namespaces, constants, device
    helpers) without the torch/ATen/c10 headers (nor the csrc/ headers that include them),
    then every `template <...> __global__` kernel of the file as written, without the host
    launch code between and after them, then a table that takes the address of every kernel
    instantiated with DTYPE for each typename parameter and both values of each bool
    parameter, so that nvcc emits their device code. Compiles in seconds where the whole file
    takes minutes (torch's headers); a kernel that needs something this drops fails to compile
    (a loud failure, not a silent pass). Returns (source text, number of instantiations)."""
    text = open(src).read()
    kernels = list(_KERNEL.finditer(text))
    if not kernels:
        raise ValueError("%s has no template __global__ kernel" % src)
    prefix = text[:kernels[0].start()]

    def keep(m):
        q, h = m.group(1), m.group(2)
        if q == "<":
            return "" if _TORCH_INCLUDE.match(m.group(0).strip()) else m.group(0)
        return "" if _needs_torch(h) else m.group(0)

    prefix = _INCLUDE.sub(keep, prefix)
    # each kernel from its `template` to its closing brace (the regex starts at `template`)
    blocks = [text[m.start():brace_end(text, m.end())] for m in kernels]
    body = prefix + "\n\n".join(blocks)
    opened = [m.group(1) for m in re.finditer(r'\bnamespace\s*(\w*)\s*\{', prefix)]
    closed = len(re.findall(r'^\}\s*//\s*namespace', prefix, re.M))
    still_open = opened[closed:] if closed < len(opened) else []
    lines = ["", "void* fastbig_reduced_tu_kernels[] = {"]
    count = 0
    for m in kernels:
        params = [p.strip().split()[0] for p in m.group(1).split(",")]
        combos = [[]]
        for p in params:
            vals = [dtype] if p in ("typename", "class") else ["false", "true"] if p == "bool" else None
            if vals is None:
                raise ValueError("kernel %s: template parameter kind %r not handled" % (m.group(2), p))
            combos = [c + [v] for c in combos for v in vals]
        for c in combos:
            lines.append("    (void*)&%s<%s>," % (m.group(2), ", ".join(c)))
            count += 1
    lines.append("};")
    tail = "\n".join(lines) + "\n"
    closing = "".join("}  // namespace %s\n" % n for n in reversed(still_open))
    return "#include <cstdint>\n#include <algorithm>\n" + body + "\n" + tail + closing, count


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("--arch", default="90", help="compute capability without the dot (default 90)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--ptx", metavar="OUT")
    g.add_argument("--cubin", metavar="OUT")
    g.add_argument("-c", "--obj", metavar="OUT")
    ap.add_argument("--print", action="store_true", help="print the command, run nothing")
    ap.add_argument("extra", nargs="*", help="more nvcc flags (after --)")
    a = ap.parse_args(argv)
    mode, out = ("ptx", a.ptx) if a.ptx else ("cubin", a.cubin) if a.cubin else ("obj", a.obj)
    cmd = nvcc_command(a.src, a.arch, out, mode, a.extra)
    if a.print:
        print(shlex.join(cmd))
        return 0
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
