"""Registers, spills, stack and shared memory of every CUDA kernel of csrc/ for one arch,
from ptxas -v, without a GPU. Each .cu file is compiled whole with setup.py's nvcc command
(tools/nvcc_flags.py) to PTX, then ptxas -v assembles it for sm_ARCH. Also counts the
approximate instructions per kernel (tanh.approx.f32, div.approx) and checks that the float32
kernels' PTX equals that of the reduced unit tests/test_build_flags.py compiles.

    python tools/ptxas_report.py [--arch 90] [--out bench/results/ptxas-sm90-<date>.txt]

The whole-file PTX is cached in build/ptxas-cache (--cache), keyed by the nvcc command, its
version and the sources: a rerun without changes takes seconds.
Exit status 1 when a kernel spills or uses a local stack frame, when a float32 kernel has an
approximate tanh or division, or when the reduced unit's PTX differs; 0 otherwise. Takes
about 1-2 minutes a file on 2 cores (torch's headers).
"""
import argparse
import hashlib
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nvcc_flags  # noqa: E402

from prebuilt_stamp import sources_digest  # noqa: E402

ROOT = nvcc_flags.ROOT
SOURCES = ["csrc/lstm/lstm_cuda.cu", "csrc/conv_bn_relu/conv_bn_relu_cuda.cu"]


def demangle(names):
    tool = shutil.which("cu++filt") or os.path.join(os.path.dirname(nvcc_flags.find_nvcc()), "cu++filt")
    if not os.path.exists(tool):
        tool = shutil.which("c++filt")
    if not tool:
        return {n: n for n in names}
    r = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = r.stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short(demangled):
    """'void fastbig::lstm::(anonymous namespace)::cell_forward_kernel<float, float>(...)' ->
    'cell_forward_kernel<float, float>'."""
    s = re.sub(r"^void\s+", "", demangled)
    s = re.sub(r"fastbig::\w+::\(anonymous namespace\)::", "", s)
    depth = 0
    for i, ch in enumerate(s):  # cut the parameter list: the first '(' at template depth 0
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            return s[:i]
    return s


def is_fp32(kernel):
    """'k<float, float, true>' -> True: every template argument is float or a bool."""
    m = re.search(r"<(.*)>$", kernel)
    return bool(m) and all(a.strip() in ("float", "true", "false") for a in m.group(1).split(","))


def ptx_functions(ptx):
    """{mangled entry name: normalized body lines} (labels, .loc and symbol names blanked)."""
    out = {}
    for m in re.finditer(r"\.entry (\S+)\(", ptx):
        body = ptx[m.start():nvcc_flags.brace_end(ptx, m.end()) - 1]  # up to the closing brace
        lines = [l.strip() for l in body.splitlines()]
        lines = [re.sub(r"_Z\w+", "SYM", re.sub(r"\$L__\w+", "L", l)) for l in lines
                 if l and not l.startswith((".loc", "//", ".pragma"))]
        out[m.group(1)] = (body, lines)
    return out


def parse_ptxas(text):
    """{mangled: dict(regs, smem, cmem, stack, spill_st, spill_ld)} from ptxas -v output."""
    res, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line) or re.search(r"Function properties for (\S+)", line)
        if m:
            cur = m.group(1)
            res.setdefault(cur, {})
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            res[cur].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            res[cur]["regs"] = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            res[cur]["smem"] = int(sm.group(1)) if sm else 0
            cm = re.search(r"(\d+) bytes cmem\[0\]", line)
            res[cur]["cmem"] = int(cm.group(1)) if cm else 0
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="90")
    ap.add_argument("--out", help="also write the table here")
    ap.add_argument("--sources", nargs="*", default=SOURCES)
    ap.add_argument("--cache", default=os.path.join(ROOT, "build", "ptxas-cache"),
                    help="whole-file PTX kept here, keyed by the nvcc command, nvcc version and sources")
    a = ap.parse_args(argv)
    nvcc = nvcc_flags.find_nvcc()
    if nvcc is None:
        print("ptxas_report: nvcc not found", file=sys.stderr)
        return 2
    ptxas = os.path.join(os.path.dirname(nvcc), "ptxas")
    ver = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    a.cache = os.path.abspath(a.cache)
    setup = nvcc_flags.load_setup()
    rows, problems, notes = [], [], []
    tmp = tempfile.mkdtemp(prefix="ptxas_report_")
    for src in a.sources:
        base = os.path.basename(src)[:-3]
        cmd = nvcc_flags.nvcc_command(os.path.join(ROOT, src), a.arch, None, "ptx")
        key = hashlib.sha256((" ".join(cmd) + ver + sources_digest()).encode()).hexdigest()[:16]
        cached = os.path.join(a.cache, "%s-sm%s-%s.ptx" % (base, a.arch, key))
        ptx_path = os.path.join(tmp, base + ".ptx")
        t0 = time.time()
        if os.path.exists(cached):
            shutil.copy(cached, ptx_path)
            how = "from the cache %s" % os.path.relpath(cached, ROOT)
        else:
            r = subprocess.run(cmd + ["-o", ptx_path], capture_output=True, text=True)
            if r.returncode != 0:
                print(r.stderr[-4000:], file=sys.stderr)
                problems.append("%s: nvcc failed" % src)
                continue
            os.makedirs(a.cache, exist_ok=True)
            shutil.copy(ptx_path, cached)
            how = "in %.0f s" % (time.time() - t0)
        r = subprocess.run([ptxas, "-arch=sm_%s" % a.arch, "-v", ptx_path, "-o", ptx_path + ".cubin"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-4000:], file=sys.stderr)
            problems.append("%s: ptxas failed" % src)
            continue
        info = parse_ptxas(r.stdout + r.stderr)
        ptx = open(ptx_path).read()
        funcs = ptx_functions(ptx)
        names = demangle(sorted(funcs))
        for mangled in sorted(funcs, key=lambda n: short(names[n])):
            body = funcs[mangled][0]
            k = info.get(mangled, {})
            row = dict(file=os.path.basename(src), kernel=short(names[mangled]), **k,
                       tanh_approx=body.count("tanh.approx.f32"), div_approx=body.count("div.approx"))
            rows.append(row)
            if k.get("spill_st", 0) or k.get("spill_ld", 0) or k.get("stack", 0):
                problems.append("%s %s: spills/stack %s" % (row["file"], row["kernel"], k))
            if is_fp32(row["kernel"]) and (row["tanh_approx"] or row["div_approx"]):
                problems.append("%s %s: approximate tanh/div in a float32 kernel" % (row["file"], row["kernel"]))
        # the reduced unit of tests/test_build_flags.py: same float32 kernels, same PTX
        text, n = nvcc_flags.kernels_only_tu(os.path.join(ROOT, src), dtype="float")
        red_src = os.path.join(tmp, base + "_kernels.cu")
        open(red_src, "w").write(text)
        r = subprocess.run(nvcc_flags.nvcc_command(red_src, a.arch, red_src + ".ptx", "ptx"),
                           capture_output=True, text=True)
        if r.returncode != 0:
            problems.append("%s: the reduced unit does not compile" % src)
        else:
            red = ptx_functions(open(red_src + ".ptx").read())
            full32 = {short(names[m]): funcs[m][1] for m in funcs if is_fp32(short(names[m]))}
            rnames = demangle(sorted(red))
            red32 = {short(rnames[m]): red[m][1] for m in red}
            same = sorted(full32) == sorted(red32) and all(full32[k] == red32[k] for k in full32)
            notes.append("%s: whole file to PTX %s; reduced unit (%d float32 kernels): PTX %s the whole "
                         "file's float32 kernels" % (src, how, n, "identical to" if same else "DIFFERS from"))
            if not same:
                problems.append("%s: reduced unit PTX differs (%s vs %s)" % (src, sorted(full32), sorted(red32)))
    shutil.rmtree(tmp, ignore_errors=True)

    lines = ["# ptxas -v for sm_%s, %s, %s" % (a.arch, datetime.date.today().isoformat(), ver),
             "# nvcc flags (setup.py NVCC_FLAGS): %s" % " ".join(setup.NVCC_FLAGS),
             "# made by: python tools/ptxas_report.py --arch %s" % a.arch,
             "# regs: registers per thread; smem: static shared bytes; stack/spill: bytes; "
             "tanh/div: tanh.approx.f32 / div.approx instructions in the kernel's PTX", ""]
    hdr = "%-24s %-58s %5s %6s %6s %6s %6s %5s %4s" % ("file", "kernel", "regs", "smem", "stack", "spillS",
                                                       "spillL", "tanh", "div")
    lines += [hdr, "-" * len(hdr)]
    for r_ in rows:
        lines.append("%-24s %-58s %5s %6s %6s %6s %6s %5d %4d" % (
            r_["file"], r_["kernel"], r_.get("regs", "?"), r_.get("smem", "?"), r_.get("stack", "?"),
            r_.get("spill_st", "?"), r_.get("spill_ld", "?"), r_["tanh_approx"], r_["div_approx"]))
    lines.append("")
    if rows:
        lines.append("kernels: %d; max registers %d; max static smem %d B; spills in %d kernels" % (
            len(rows), max(r_.get("regs", 0) for r_ in rows), max(r_.get("smem", 0) for r_ in rows),
            sum(1 for r_ in rows if r_.get("spill_st", 0) or r_.get("spill_ld", 0))))
    lines += notes
    lines += ["PROBLEM: " + p for p in problems] or ["problems: none"]
    table = "\n".join(lines) + "\n"
    sys.stdout.write(table)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(table)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
