"""pytest-benchmark suite: the cases of fastbig/bench/cases/conv_bn_relu.py (`pytest bench/ --benchmark-only`)."""
import pytest

from fastbig.bench import suite


@pytest.mark.parametrize("case,impl", suite.params("conv_bn_relu"))
def test_conv_bn_relu(benchmark, case, impl):
    suite.run(benchmark, case, impl)
