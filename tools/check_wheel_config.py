"""CI check: the CUDA-wheel workflow and the cibuildwheel config parse and say what we rely on."""
import sys
import tomllib

import yaml

with open("pyproject.toml", "rb") as f:
    py = tomllib.load(f)
cibw = py["tool"]["cibuildwheel"]
linux = cibw["linux"]
errors = []
if "cp311-manylinux_x86_64" not in cibw["build"]:
    errors.append("cibuildwheel.build must include cp311-manylinux_x86_64")
rw = linux["repair-wheel-command"]
for lib in ("libtorch.so", "libc10.so", "libcudart"):
    if lib not in rw:
        errors.append(f"repair-wheel-command must exclude {lib}")
if "TORCH_CUDA_ARCH_LIST" not in linux["environment"]:
    errors.append("cibuildwheel.linux.environment must set TORCH_CUDA_ARCH_LIST")

with open(".github/workflows/wheels.yml") as f:
    wf = yaml.safe_load(f)
jobs = wf.get("jobs", {})
if not jobs:
    errors.append("wheels.yml has no jobs")
steps = [s for j in jobs.values() for s in j.get("steps", [])]
if not any("cibuildwheel" in str(s.get("uses", "")) + str(s.get("run", "")) for s in steps):
    errors.append("wheels.yml never runs cibuildwheel")
if errors:
    print("wheel config: " + "; ".join(errors), file=sys.stderr)
    sys.exit(1)
print(f"wheel config ok: {len(jobs)} job(s), {len(steps)} step(s), builds {cibw['build']}")
