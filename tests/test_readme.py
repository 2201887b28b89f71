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


def test_readme_load_glow_example_loads_a_trained_run(tmp_path):
    """The second example of "Using the model" (a trained run back in Python), on a 3-step run of the digits."""
    from glowfast import Glow
    from glowfast.train import main as train_main

    text = README.read_text()
    section = text[text.index("## Using the model"):text.index("## GPU notes")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2 and 'load_glow("runs/mnist-k16", device="cuda")' in blocks[1], \
        "the README example changed: update this test's substitutions"
    run = tmp_path / "run"
    assert train_main(["--dataset", "digits", "-K", "2", "-L", "2", "--hidden-channels", "16", "--steps", "3",
                       "--eval-interval", "3", "--temperatures", "0.7", "--threads", "1", "--no-progress",
                       "--device", "cpu", "--run-dir", str(run)]) == 0
    namespace = {}
    exec(compile(blocks[1].replace("runs/mnist-k16", str(run)).replace('device="cuda"', 'device="cpu"'),
                 str(README), "exec"), namespace)
    model = namespace["model"]
    assert isinstance(model, Glow) and not model.training and model.image_shape == (1, 8, 8)
