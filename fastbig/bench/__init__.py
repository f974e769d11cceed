"""fastbig's benchmark harness: ``fastbig bench ...`` (or ``python -m fastbig.bench ...``).

    harness.py  the run: cases x implementations, correctness gate, timing, the table
    cases/      the cases, one module per op (the harness and bench/'s pytest-benchmark suites)
    timing.py   CPU/GPU timers (alternating rounds) and peak memory
    roof.py     the device's roof: measured matmul FLOP/s and copy bandwidth, or datasheet
    report.py   speed-ups, goals, the table, JSON and long-format CSV
    plots.py    one PNG per op (matplotlib, imported lazily)
"""
from __future__ import annotations


def main(argv=None) -> int:
    """Entry point of ``fastbig bench``: takes the arguments after ``bench``, returns an exit code."""
    from .harness import main as _main
    return _main(argv)


__all__ = ["main"]
