"""pytest-benchmark suite: the cases of fastbig/bench/cases/models.py (`pytest bench/ --benchmark-only`)."""
import pytest

from fastbig.bench import suite


@pytest.mark.parametrize("case,impl", suite.params("models"))
def test_models(benchmark, case, impl):
    suite.run(benchmark, case, impl)
