"""``python -m fastbig.bench.buildcheck [cpu|cuda]``: print what fastbig._C was built with; exit 1
when it is not loaded, or (for cuda) was built without CUDA. bench/gpu_run.sh runs it after the build."""
from __future__ import annotations

import json
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    device = argv[0] if argv else "cpu"
    if device not in ("cpu", "cuda"):
        print(f"buildcheck: expected cpu or cuda, got {device!r}", file=sys.stderr)
        return 2
    import fastbig
    info = fastbig.build_info()
    print(json.dumps(info, indent=1, default=str))
    if not info["loaded"]:
        print(f"buildcheck: fastbig._C is not loaded: {info['error']}", file=sys.stderr)
        return 1
    if device == "cuda" and not info["cuda"]:
        print("buildcheck: fastbig._C was built without CUDA", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
