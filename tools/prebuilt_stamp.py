"""The stamp of a prebuilt fastbig._C: what it was built for and from which sources.

    python tools/prebuilt_stamp.py [--archs 9.0]     # prints the stamp for this interpreter

tools/build_prebuilt.sh writes it next to the .so (prebuilt/STAMP); bench/gpu_run.sh uses the
prebuilt .so only when the stamp it computes on the GPU machine is the same (same Python tag,
torch version, CUDA archs, and the same csrc/ and setup.py): a stale or foreign build is not
used (it is rebuilt there instead).
"""
import argparse
import glob
import hashlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sources_digest(root=ROOT):
    h = hashlib.sha256()
    files = sorted(glob.glob(os.path.join(root, "csrc", "**", "*"), recursive=True)) + [os.path.join(root, "setup.py")]
    for f in files:
        if os.path.isfile(f):
            h.update(os.path.relpath(f, root).encode() + b"\0")
            with open(f, "rb") as fh:
                h.update(fh.read())
            h.update(b"\0")
    return h.hexdigest()[:16]


def installed_torch_version():
    """torch.__version__ (with its +cu130 tag) read from torch/version.py: importing torch takes
    seconds."""
    import importlib.util
    import re
    spec = importlib.util.find_spec("torch")
    for d in (spec.submodule_search_locations or []) if spec else []:
        p = os.path.join(d, "version.py")
        if os.path.exists(p):
            m = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", open(p).read(), re.M)
            if m:
                return m.group(1)
    import torch
    return torch.__version__


def stamp(archs, torch_version=None):
    if torch_version is None:
        torch_version = installed_torch_version()
    tag = "cp%d%d" % sys.version_info[:2]
    return "python=%s torch=%s archs=%s sources=%s" % (tag, torch_version, archs, sources_digest())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    a = ap.parse_args(argv)
    print(stamp(a.archs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
