"""pytest-benchmark suite: the cases of fastbig/bench/cases/lstm.py (`pytest bench/ --benchmark-only`)."""
import pytest

from fastbig.bench import suite


@pytest.mark.parametrize("case,impl", suite.params("lstm"))
def test_lstm(benchmark, case, impl):
    suite.run(benchmark, case, impl)
