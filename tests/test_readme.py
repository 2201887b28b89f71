"""The README's Python example runs as written (at a smaller width and depth) and does what its comments say."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"
FULL_SIZE = "K=32, L=3, hidden_channels=512"


def _usage_example() -> str:
    text = README.read_text()
    section = text[text.index("## Using the model"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_usage_example_runs_and_reconstructs_the_images():
    code = _usage_example()
    assert FULL_SIZE in code, "the README example changed: update this test's size substitution"
    namespace = {}
    torch.manual_seed(0)
    exec(compile(code.replace(FULL_SIZE, "K=2, L=3, hidden_channels=16"), str(README), "exec"), namespace)
    images, out, samples, recon = (namespace[k] for k in ("images", "out", "samples", "recon"))
    assert torch.isfinite(out.bits_per_dim).all() and out.bits_per_dim.shape == (16,)
    assert samples.shape == (64, 3, 32, 32) and 0 <= samples.min() and samples.max() <= 1
    # "recon == images / 255": decode(encode(x)) lands every pixel back in its own 8-bit bin
    torch.testing.assert_close(recon, images.float() / 255, rtol=0, atol=0)
