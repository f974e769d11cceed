"""pytest-benchmark suite: the cases of fastbig/bench/cases/attention.py (`pytest bench/ --benchmark-only`)."""
import pytest

from fastbig.bench import suite


@pytest.mark.parametrize("case,impl", suite.params("attention"))
def test_attention(benchmark, case, impl):
    suite.run(benchmark, case, impl)
