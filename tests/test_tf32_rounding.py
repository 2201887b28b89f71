"""benchmarks/tf32_rounding.py's emulation of TF32 operands (fp32 cut to 10 explicit mantissa bits).

At 1.0 (exponent 0) a TF32 ulp is 2**-10 and the half-ulp 2**-11; fp32 keeps 13 more bits (down to 2**-23).
The expected values are worked out by hand: truncation drops everything below 2**-10; rounding goes to the
nearest multiple of 2**-10, ties away from zero (as `round_to_tf32` in glowfast/kernels/actnorm_invconv.py and
the hardware's cvt.rna.tf32.f32).
"""

import importlib.util
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "tf32_rounding.py"
_spec = importlib.util.spec_from_file_location("tf32_rounding_under_test", _PATH)
tf32_rounding = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tf32_rounding)

# (fp32 input, truncated, rounded)
CASES = [
    (1.0, 1.0, 1.0),
    (1 + 2**-10, 1 + 2**-10, 1 + 2**-10),  # exactly representable: unchanged
    (1 + 2**-12, 1.0, 1.0),  # a quarter ulp: below the half-ulp
    (1 + 2**-11 - 2**-23, 1.0, 1.0),  # just below the half-ulp
    (1 + 2**-11, 1.0, 1 + 2**-10),  # a tie: away from zero
    (1 + 2**-11 + 2**-12, 1.0, 1 + 2**-10),  # three quarters of an ulp
    (1 + 2**-10 + 2**-11 + 2**-12, 1 + 2**-10, 1 + 2**-9),
    (2 - 2**-23, 2 - 2**-10, 2.0),  # all 23 mantissa bits set: rounding carries into the exponent
    (-(1 + 2**-11 + 2**-12), -1.0, -(1 + 2**-10)),  # sign-magnitude: the same on the magnitude
    (3 * (1 + 2**-12), 3.0, 3.0),  # 3 = 1.5 * 2: mantissa 1.5 + 2**-12 + 2**-13, below the half-ulp
]


@pytest.mark.parametrize(("x", "truncated", "rounded"), CASES)
def test_tf32_truncates_and_rounds_to_ten_mantissa_bits(x, truncated, rounded):
    t = torch.tensor([x], dtype=torch.float32)
    assert float(t) == x  # the input is an exact fp32 value
    assert tf32_rounding.tf32(t, "truncate").item() == truncated
    assert tf32_rounding.tf32(t, "round").item() == rounded


def test_tf32_keeps_the_input_dtype_and_shape():
    x = torch.tensor([[1 + 2**-11 + 2**-12, 1 + 2**-12]], dtype=torch.float64)
    out = tf32_rounding.tf32(x, "round")
    assert out.dtype == torch.float64 and out.shape == (1, 2)
    assert out.tolist() == [[1 + 2**-10, 1.0]]
