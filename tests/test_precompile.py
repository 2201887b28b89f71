"""Compiling a step's kernels ahead of it (glowfast.kernels.precompile, glowfast.fused.precompile_training_step).

The dry step must (1) ask for exactly the kernel variants the real step launches -- same kernels, same argument
specialisations (dtypes, pointer alignment, integer divisibility), same constexprs and launch options, which is
what Triton's cache key is made of -- (2) launch nothing and change nothing, and (3) leave other threads alone.
On a GPU, the real step after a precompile must compile nothing more (the cache keys matched).
Observed through Triton's own entry point (`InterpretedFunction.run` on CPU, the kernels' caches on a GPU).
"""

import threading

import pytest
import torch

from glowfast import Glow
from glowfast.fused import precompile_training_step
from glowfast.kernels import actnorm_invconv, coupling, coupling_net, cross_step
from glowfast.kernels.precompile import PrecompileReport, compiled_variants, is_dry, precompiling

from conftest import KERNEL_DEVICE, requires_cuda

KERNELS = [getattr(m, name) for m in (actnorm_invconv, coupling, cross_step, coupling_net) for name in dir(m)
           if name.endswith("_kernel") and name.startswith("_")]


def _signature(args, kwargs) -> tuple:
    """What Triton specialises a launch on: tensors by dtype and 16-byte alignment, integers by == 1 and
    divisibility by 16 (and width), everything else (constexprs, launch options) by value."""
    sig = []
    for a in args:
        if isinstance(a, torch.Tensor):
            sig.append((str(a.dtype), a.data_ptr() % 16 == 0))
        elif isinstance(a, bool):
            sig.append(("bool", a))
        elif isinstance(a, int):
            sig.append(("int", a == 1, a % 16 == 0, -2**31 <= a < 2**31))
        else:
            sig.append((type(a).__name__, a))
    return tuple(sig), tuple(sorted((k, repr(v)) for k, v in kwargs.items()))


@pytest.fixture
def launch_log(monkeypatch):
    """Every kernel launch and warm-up reaching Triton: (kernel, signature, warmup?) -- observed at the interpreter's
    entry point, so on a GPU (compiled kernels) None: the tests then check what they can without it."""
    if KERNEL_DEVICE != "cpu":
        yield None
        return
    from triton.runtime.interpreter import InterpretedFunction

    log = []
    real_run = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        log.append((self.fn.__name__, _signature(args, kwargs), warmup))
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    yield log


@pytest.fixture
def deterministic_cudnn():
    """cuDNN's deterministic algorithms, benchmark mode off (two GPU runs compared bit for bit); a no-op on CPU."""
    old = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old


def _cold_kernel_caches():
    """On a GPU: empty the kernels' in-memory caches, so that a precompile really compiles (from Triton's disk
    cache: quick). Nothing to do for the interpreter."""
    if KERNEL_DEVICE == "cuda":
        index = torch.cuda.current_device()
        for k in KERNELS:
            k.device_caches.pop(index, None)


def _model(coupling="affine", permutation="invconv", lu=True, memory_saving=False, n_classes=None, shape=(3, 8, 8),
           device=KERNEL_DEVICE, networks=()):
    """`networks`: coupling-network options ("triton", "bf16": --triton-networks, --amp bf16)."""
    from glowfast.amp import apply_network_options

    torch.manual_seed(0)
    model = Glow(shape, K=3, L=2, hidden_channels=8, coupling=coupling, permutation=permutation, lu=lu,
                 n_classes=n_classes, backend="fused").to(device)
    model.memory_saving = memory_saving
    apply_network_options(model, {"triton_networks": "triton" in networks,
                                  "amp": "bf16" if "bf16" in networks else "none"})
    return model


def _images(model, batch=2, device=KERNEL_DEVICE):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (batch, *model.image_shape), dtype=torch.uint8, generator=g).to(device)


def _labels(model, batch=2, device=KERNEL_DEVICE):
    return torch.arange(batch, device=device) % model.n_classes if model.n_classes else None


def _init(model, x, y):
    with torch.no_grad():
        model(x, y)


def _real_step(model, x, y):
    model(x, y).bits_per_dim.mean().backward()


CASES = [
    pytest.param(dict(), id="affine-invconv-lu"),
    pytest.param(dict(coupling="additive", permutation="shuffle"), id="additive-shuffle-lu"),
    pytest.param(dict(permutation="reverse"), id="affine-reverse-lu"),
    pytest.param(dict(lu=False), id="affine-invconv-plainW"),
    pytest.param(dict(memory_saving=True), id="memory-saving"),
    pytest.param(dict(n_classes=3, shape=(1, 8, 12)), id="conditional-nonsquare"),
    # levels of 80 and 160 channels: the second, wider than the kernels take, runs the reference layers
    pytest.param(dict(shape=(20, 4, 4)), id="wide-top-level-on-the-reference"),
    # the coupling networks' own kernels (--triton-networks), fp32 and bf16 activations
    pytest.param(dict(networks=("triton",)), id="triton-networks"),
    pytest.param(dict(networks=("triton", "bf16")), id="triton-networks-bf16"),
]


@pytest.mark.parametrize("options", CASES)
def test_dry_step_asks_for_exactly_the_variants_the_real_step_launches(options, launch_log):
    if launch_log is None:
        pytest.skip("observes launches at the interpreter's entry point; on a GPU "
                    "test_gpu_real_step_after_precompile_compiles_nothing checks the keys instead")
    model = _model(**options)
    x, y = _images(model), _labels(model)
    _init(model, x, y)
    launch_log.clear()  # the init runs the reference flow layers, but --triton-networks' networks run their kernels
    report = precompile_training_step(model, x, y)
    dry = list(launch_log)
    launch_log.clear()
    _real_step(model, x, y)
    real = list(launch_log)
    assert dry and all(warmup for _, _, warmup in dry), "the dry step launched a kernel"
    assert not any(warmup for _, _, warmup in real)
    assert report.launches == len(dry) == len(real)
    assert {(k, s) for k, s, _ in dry} == {(k, s) for k, s, _ in real}
    # backward kernels too: the dry step's backward ran on this thread, inside the context
    assert any("bwd" in k for k, _, _ in dry)


@pytest.mark.parametrize("options", [CASES[0], CASES[-2]])
def test_every_kernel_launch_asks_for_fused_multiply_adds(options, launch_log):
    """The kernels were validated with Triton's a * b + c contraction on, which Triton 3.10 turns off by default:
    every launch (training step and sampling) asks for it explicitly (glowfast.kernels._utils.FP_FUSION). Under
    the interpreter the launches' own arguments are read; on a GPU the options of the variants Triton compiled."""
    model = _model(**options)
    x, y = _images(model), _labels(model)
    _init(model, x, y)
    _cold_kernel_caches()
    _real_step(model, x, y)
    with torch.no_grad():
        model.sample(2)
    if launch_log is not None:
        kernels = {k for k, _, _ in launch_log}
        assert any("bwd" in k for k in kernels) and any("inv" in k for k in kernels), kernels
        asked = {dict(kwargs).get("enable_fp_fusion") for _, (_, kwargs), _ in launch_log}
        assert asked == {"True"}, f"launches with enable_fp_fusion {asked}"
        return
    index = torch.cuda.current_device()
    compiled = [c for k in KERNELS for c in k.device_caches[index][0].values()]
    assert compiled and all(c.metadata.enable_fp_fusion for c in compiled)


@pytest.mark.parametrize("shape", [(3, 8, 8), (20, 4, 4)], ids=["fused-levels", "wide-top-level"])
def test_dry_step_changes_nothing_even_on_garbage(shape):
    """Parameters, buffers, existing gradients, the RNG and the training mode are as before, with the kernels'
    unwritten outputs filled with NaN (torch's fill_uninitialized_memory): no value-dependent check may fire -- also
    in a level that runs the reference layers on the garbage (20 x 4 x 4: a 160-channel top level).
    (CPU under the interpreter, and on a GPU: there the precompile really compiles.)"""
    model = _model(memory_saving=True, n_classes=3, shape=shape)
    x, y = _images(model), _labels(model)
    _init(model, x, y)
    _real_step(model, x, y)  # some existing gradients, which must survive
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
    was = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)  # warn_only: cuBLAS/cuDNN ops without a
    torch.utils.deterministic.fill_uninitialized_memory = True  # deterministic variant must not raise here
    try:
        report = precompile_training_step(model, x, y)
    finally:
        torch.use_deterministic_algorithms(was[0])
        torch.utils.deterministic.fill_uninitialized_memory = was[1]
    assert report.launches > 0
    assert not model.training
    assert torch.equal(rng, torch.get_rng_state())
    if cuda_rng is not None:
        assert torch.equal(cuda_rng, torch.cuda.get_rng_state(x.device))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for n, p in model.named_parameters():
        assert (p.grad is None) == (n not in grads), n
        if p.grad is not None:
            assert torch.equal(p.grad, grads[n]), n


def test_training_after_a_precompile_is_bit_identical(deterministic_cudnn):
    """On a GPU the precompile really compiles (cold in-memory caches) and the kernels then run for real."""
    def train(precompile: bool):
        model = _model()
        x = _images(model, batch=3)
        _init(model, x, None)
        opt = torch.optim.Adamax(model.parameters(), lr=1e-3)
        if precompile:
            _cold_kernel_caches()
            precompile_training_step(model, x)
        torch.manual_seed(5)
        losses = []
        for _ in range(2):
            opt.zero_grad()
            loss = model(x).bits_per_dim.mean()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return torch.stack(losses), model.state_dict()

    (la, sa), (lb, sb) = train(False), train(True)
    assert torch.equal(la, lb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_uninitialised_actnorm_is_refused():
    model = _model()
    x = _images(model)
    with pytest.raises(ValueError, match="ActNorm"):
        precompile_training_step(model, x)
    assert all(not step.actnorm._initialized_cache for step in model.steps())  # no init from garbage either


def test_reference_path_compiles_nothing(launch_log):
    model = _model()
    model.backend = "reference"
    x = _images(model)
    _init(model, x, None)
    report = precompile_training_step(model, x)
    assert report.launches == 0 and "reference" in report.skipped and not launch_log  # None on a GPU


def test_interpreter_run_reports_why_nothing_compiled(launch_log):
    if launch_log is None:
        pytest.skip("checks the interpreter's own skip reason; a GPU compiles for real (tests below)")
    model = _model()
    x = _images(model)
    _init(model, x, None)
    report = precompile_training_step(model, x)
    assert isinstance(report, PrecompileReport)
    assert report.compiled == 0 and "interpreter" in report.skipped


def test_nested_precompiling_is_refused():
    with precompiling():
        assert is_dry()
        with pytest.raises(RuntimeError, match="already active"):
            with precompiling():
                pass
    assert not is_dry()


def test_the_dry_flag_is_per_thread(launch_log):
    """Kernels launched by another thread while this one precompiles run for real, with correct results."""
    from glowfast.kernels import coupling_forward

    z = torch.randn(2, 4, 3, 5, device=KERNEL_DEVICE)
    h = torch.randn(2, 4, 3, 5, device=KERNEL_DEVICE)
    expected = coupling_forward(z, h)
    out = {}
    with precompiling():
        worker = threading.Thread(target=lambda: out.update(r=coupling_forward(z, h), dry=is_dry()))
        worker.start()
        worker.join()
    assert out["dry"] is False
    torch.testing.assert_close(out["r"], expected, rtol=0, atol=0)
    if launch_log is not None:
        assert launch_log[-1][2] is False


def test_an_exception_inside_leaves_no_dry_state():
    with pytest.raises(KeyError):
        with precompiling():
            raise KeyError("boom")
    assert not is_dry()


# ------------------------------------------------------------------------------------------------ GPU


@requires_cuda
@pytest.mark.parametrize("memory_saving, networks", [(False, ()), (True, ()), (False, ("triton",)),
                                                     (False, ("triton", "bf16"))])
def test_gpu_real_step_after_precompile_compiles_nothing(memory_saving, networks):
    """The cache keys of the warm-ups are those of the real launches: after a precompile from a cold in-memory
    cache, a real forward + backward adds no compiled kernel (and at least one variant was compiled ahead);
    `compiled_variants` (what benchmarks/startup.py reports) counts them."""
    if KERNEL_DEVICE != "cuda":
        pytest.skip("a GPU, but TRITON_INTERPRET=1: the kernels are interpreted, nothing is compiled")
    model = _model(memory_saving=memory_saving, shape=(3, 16, 16), device="cuda", networks=networks)
    x, y = _images(model, 4, "cuda"), None
    _init(model, x, y)
    _cold_kernel_caches()
    assert compiled_variants() == 0
    report = precompile_training_step(model, x, y)
    assert report.skipped is None and report.compiled > 0, report
    assert 0 < report.dry_seconds <= report.seconds
    before = compiled_variants()
    assert before == report.compiled
    _real_step(model, x, y)
    torch.cuda.synchronize()
    assert compiled_variants() == before


# ------------------------------------------------------------------------------------------------ integrations


def _train_run(tmp_path, name, extra):
    import json

    from glowfast.checkpoint import LAST, load_checkpoint
    from glowfast.train import main

    from test_train import TINY

    args = [a for a in TINY if a != "reference"]
    args[args.index("--backend") + 1: args.index("--backend") + 1] = ["fused"]
    args[args.index("--device") + 1] = KERNEL_DEVICE
    run = tmp_path / name
    small = ["--batch-size", "16", "--init-batch-size", "16", "--temperatures", "1", "--n-samples", "4"]
    assert main(args + small + ["--steps", "3", "--eval-interval", "3", "--run-dir", str(run), *extra]) == 0
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return recs, load_checkpoint(run / "checkpoints" / LAST)["model"]


def test_trainer_precompiles_before_its_first_step_and_trains_identically(tmp_path, deterministic_cudnn):
    """On CPU (interpreter) bit for bit; on a GPU, where the precompile really compiles, to rounding: two processes'
    worth of cuBLAS/cuDNN choices are not promised to be bitwise repeatable, and a flaky test would cost a GPU
    session. (The in-process test above compares bit for bit on the GPU too, cuDNN pinned deterministic.)"""
    _cold_kernel_caches()
    on, state_on = _train_run(tmp_path, "on", ["--precompile"])
    off, state_off = _train_run(tmp_path, "off", [])  # the default
    pre = [r for r in on if r["type"] == "precompile"]
    assert len(pre) == 1 and pre[0]["step"] == 0 and pre[0]["launches"] > 0, pre
    if KERNEL_DEVICE == "cuda":
        assert pre[0]["skipped"] is None and pre[0]["compiled"] > 0, pre
    assert not [r for r in off if r["type"] == "precompile"]
    train_on = [(r["step"], r["loss"], r["grad_norm"]) for r in on if r["type"] == "train"]
    train_off = [(r["step"], r["loss"], r["grad_norm"]) for r in off if r["type"] == "train"]
    assert len(train_on) == len(train_off) > 0
    if KERNEL_DEVICE == "cpu":
        assert train_on == train_off
        for k in state_on:
            assert torch.equal(state_on[k], state_off[k]), k
    else:
        torch.testing.assert_close(torch.tensor(train_on), torch.tensor(train_off), rtol=1e-4, atol=1e-5)
        for k in state_on:
            torch.testing.assert_close(state_on[k], state_off[k], rtol=1e-4, atol=1e-5, msg=k)


def test_experiments_init_before_precompile_is_the_first_steps_own_init():
    """glowfast.experiments initialises ActNorm on the first batch under a forked RNG before precompiling: the
    same parameters as the first training step's own init (same dequantisation noise), and the RNG untouched."""
    from glowfast.experiments.common import _precompile

    a, b = _model(n_classes=3), _model(n_classes=3)
    x, y = _images(a, 4), _labels(a, 4)
    torch.manual_seed(11)
    result = _precompile(a, x, y)
    rng_after = torch.get_rng_state()
    torch.manual_seed(11)
    assert torch.equal(rng_after, torch.get_rng_state())  # _precompile drew nothing from the global RNG
    b(x, y)  # what the first step's forward does under the same RNG state: ActNorm's init from its batch
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert result["launches"] > 0
    assert ("interpreter" in result["skipped"]) if KERNEL_DEVICE == "cpu" else result["skipped"] is None
