"""Replays one fuzz case and prints its parameters and every error against its bound:

    python tests/fuzz <op> <seed>          # from the checkout; or `python -m fuzz` from tests/
"""
import os
import sys

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not __package__:
    # run as a folder, sys.path[0] is this one, where the op modules (attention, lstm, ...) would
    # shadow top-level names: put tests/ there instead, for `fuzz` and conftest
    sys.path[0] = _TESTS
sys.path.append(os.path.dirname(_TESTS))  # the checkout, when fastbig is not installed

from fuzz import OPS, run_case  # noqa: E402

if len(sys.argv) != 3 or sys.argv[1] not in OPS:
    sys.exit(f"usage: python tests/fuzz <op> <seed>; op one of {', '.join(OPS)}")
op, seed = sys.argv[1], int(sys.argv[2])
p, res = run_case(op, seed)
print(f"{op} seed={seed} params={p}")
for name, err, bound in res:
    print(f"  {name}: rel err {err:.3e} (bound {bound:.1e}){'  FAIL' if not err <= bound else ''}")
