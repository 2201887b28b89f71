"""The Glow model (Kingma & Dhariwal 2018): a multi-scale flow with a pluggable compute backend.

Input convention (see docs/DESIGN.md): images are uint8 in [0, 255] or floats in [0, 1] (read on the
8-bit grid); `preprocess` maps them to [-0.5, 0.5) with `n_bits` quantisation and uniform dequantisation
noise. `encode`/`decode` work in that continuous space; `sample` returns floats in [0, 1].

Backends share every parameter, so switching `model.backend` never changes the function computed:
- "reference": the pure-PyTorch layers in glowfast.reference.
- "fused": Triton kernels for the flow steps (glowfast.fused) and one batched-LU call (glowfast.ops) for
  all plain-W log-determinants per forward and all inverses per decode.
- "auto": "fused" when the input is on a CUDA device and the kernels can run, else "reference" (still
  using the batched LU op for plain W).
Under "fused" and "auto", a level wider than the kernels take (128 channels) runs the reference layers and the
others keep the kernels (`Glow.level_backends`).
`memory_saving=True` (fused path): backward recomputes each flow step's input from its output with the inverse
kernels instead of keeping activations (glowfast.invertible); same forward values.
"""

import math
import operator
import warnings
from typing import NamedTuple

import torch
from torch import nn

from ._checks import can_synchronize, check_finite, check_image_batch, is_temperature
from ._extension import batched_lu_ops
from .reference import COUPLINGS, PERMUTATIONS, FlowStep, Split2d, TopPrior, squeeze2d, unsqueeze2d
from .reference import steps_forward as reference_steps_forward

BACKENDS = ("reference", "fused", "auto")


class GlowOutput(NamedTuple):
    log_prob: torch.Tensor  # (B,) nats, log-likelihood of the discrete image (dequantisation bound)
    bits_per_dim: torch.Tensor  # (B,)
    y_logits: torch.Tensor | None  # (B, n_classes) for class-conditional models


class GlowLevel(nn.Module):
    """squeeze -> K flow steps -> (split, except at the top level)."""

    def __init__(self, channels: int, K: int, split: bool, **step_kwargs):
        super().__init__()
        self.steps = nn.ModuleList(FlowStep(channels, **step_kwargs) for _ in range(K))
        self.split = Split2d(channels) if split else None


def _whole_number(value, name: str, minimum: int) -> int:
    """`value` as an int >= minimum; a clear error for floats, bools and other types (8.5 is not an image size)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)  # int, numpy integers, integer 0-d tensors
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class Glow(nn.Module):
    def __init__(
        self,
        image_shape: tuple[int, int, int],
        K: int,
        L: int,
        hidden_channels: int = 512,
        coupling: str = "affine",
        permutation: str = "invconv",
        lu: bool = True,
        learn_top: bool = True,
        n_classes: int | None = None,
        n_bits: int = 8,
        backend: str = "reference",
        memory_saving: bool = False,
    ):
        super().__init__()
        if not isinstance(image_shape, (tuple, list, torch.Size)) or len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape!r}")
        c, h, w = (_whole_number(v, f"image_shape {tuple(image_shape)!r}", 1) for v in image_shape)
        K, L = _whole_number(K, "K", 1), _whole_number(L, "L", 1)
        hidden_channels = _whole_number(hidden_channels, "hidden_channels", 1)
        if h % 2**L or w % 2**L:
            raise ValueError(f"image size {h}x{w} is not divisible by 2^L = {2**L} (L={L} squeezes)")
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {tuple(COUPLINGS)}, got {coupling!r}")
        if permutation not in PERMUTATIONS:
            raise ValueError(f"permutation must be one of {PERMUTATIONS}, got {permutation!r}")
        n_bits = _whole_number(n_bits, "n_bits", 1)
        if n_bits > 8:
            raise ValueError(f"n_bits must be in 1..8, got {n_bits}")
        if n_classes is not None:
            n_classes = _whole_number(n_classes, "n_classes (or None)", 2)
        self.image_shape = (c, h, w)
        self.config = dict(image_shape=(c, h, w), K=K, L=L, hidden_channels=hidden_channels, coupling=coupling,
                           permutation=permutation, lu=lu, learn_top=learn_top, n_classes=n_classes,
                           n_bits=n_bits)
        self.n_bits = n_bits
        self.n_bins = 2**n_bits
        self.n_classes = n_classes
        self.backend = backend
        batched_lu_ops()  # decided here, outside any code torch.compile traces
        # fused path only: backward reconstructs each flow step's input from its output (glowfast.invertible)
        # instead of storing activations; an execution option like `backend`, not part of the config
        self.memory_saving = bool(memory_saving)
        levels = []
        self.latent_shapes: list[tuple[int, int, int]] = []  # (C, H, W) of each level's latent, top last
        for level in range(L):
            c, h, w = 4 * c, h // 2, w // 2
            split = level < L - 1
            levels.append(GlowLevel(c, K, split, hidden_channels=hidden_channels, coupling=coupling,
                                    permutation=permutation, lu=lu))
            if split:
                self.latent_shapes.append((c - c // 2, h, w))
                c = c // 2
        self.levels = nn.ModuleList(levels)
        self.top_shape = (c, h, w)
        self.latent_shapes.append(self.top_shape)
        self.prior = TopPrior(self.top_shape, learn_top=learn_top, n_classes=n_classes)

    # ----------------------------------------------------------------------------------------- backend
    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        self._backend = value

    def level_backends(self, device: torch.device) -> tuple[str, ...]:
        """The compute path of each level (bottom first) for tensors on `device`; raises if "fused" cannot run there.

        The fused kernels take flow steps of at most `MAX_CHANNELS` (128) channels. A level wider than that -- the
        low-resolution top levels of a model of large images (a 256x256 Glow with L=6 has 192 and 384 channels
        there) -- runs the reference layers, under "auto" and "fused" alike, and the levels below it keep the kernels
        (they hold most of the pixels). Only a model none of whose levels fits is refused by "fused". Levels chain
        through their inputs and outputs, so the function computed is the same either way.
        """
        if self.backend == "reference":
            return ("reference",) * len(self.levels)
        if self.backend == "auto" and torch.device(device).type != "cuda":
            return ("reference",) * len(self.levels)  # the Triton interpreter on CPU is for tests, not speed
        from . import fused
        from .kernels._utils import MAX_CHANNELS

        ok, reason = fused.fused_available(device)
        widths = [level.steps[0].channels for level in self.levels]
        if ok and min(widths) > MAX_CHANNELS:
            ok, reason = False, f"a flow step has {min(widths)} channels, the kernels support at most {MAX_CHANNELS}"
        if self.backend == "fused" and not ok:
            advice = "" if "backend='reference'" in reason else ". Use backend='auto' or 'reference'."
            raise RuntimeError(f"backend='fused' cannot run on {device}: {reason}{advice}")
        return tuple("fused" if ok and width <= MAX_CHANNELS else "reference" for width in widths)

    def resolve_backend(self, device: torch.device) -> str:
        """The compute path used for tensors on `device`: "fused" when the kernels run at least one level
        (`level_backends` says which), else "reference"; raises if "fused" cannot run there."""
        return "fused" if "fused" in self.level_backends(device) else "reference"

    def reference_levels_note(self, device: torch.device) -> str | None:
        """One line naming the levels that run the reference layers while others run the fused kernels (they are
        wider than the kernels take), or None when every level runs one path."""
        paths = self.level_backends(device)
        if len(set(paths)) < 2:
            return None
        from .kernels._utils import MAX_CHANNELS

        wide = [f"{i + 1} ({level.steps[0].channels} channels)"
                for i, (level, path) in enumerate(zip(self.levels, paths)) if path == "reference"]
        return (f"the reference layers run level{'s' if len(wide) > 1 else ''} {', '.join(wide)} of {len(paths)}: the "
                f"fused kernels take at most {MAX_CHANNELS} channels per flow step")

    def steps(self) -> list[FlowStep]:
        return [step for level in self.levels for step in level.steps]

    def _batched_lu_ops(self):
        """glowfast.ops for the plain-W log-determinants/inverses (one batched-LU call), or None: backend
        'reference', LU weights, or where the op cannot run -- an install without glowfast._C, or CUDA weights with
        a glowfast._C built without its CUDA kernels; the flow steps then use torch.linalg per step, the same
        function."""
        if self.backend == "reference" or not self.steps()[0].has_plain_invconv:
            return None
        return batched_lu_ops(self.steps()[0].permute.weight.device.type)

    def _w_logabsdets(self) -> list | None:
        ops = self._batched_lu_ops()
        return None if ops is None else list(ops.batched_slogdet([s.permute.weight for s in self.steps()])[1])

    def _w_inverses(self) -> list | None:
        """Every plain W^-1 from one batched-LU call, inverted in float64 as the reference layers and glowfast.fused
        invert (an fp32 inverse of an ill-conditioned W made decode's error several times the reference's)."""
        ops = self._batched_lu_ops()
        if ops is None:
            return None
        weights = [s.permute.weight for s in self.steps()]
        return [inv.to(w.dtype) for inv, w in zip(ops.batched_inverse([w.double() for w in weights]), weights)]

    def _steps_forward(self, steps, z, w_lds, backend):
        if backend == "fused":
            from . import fused

            return fused.steps_forward(list(steps), z, w_lds, memory_saving=self.memory_saving)
        return reference_steps_forward(steps, z, w_lds)

    def _steps_inverse(self, steps, z, w_invs, backend):
        if backend == "fused":
            from . import fused

            return fused.steps_inverse(list(steps), z, w_invs)
        for i in reversed(range(len(steps))):
            z = steps[i].inverse(z, None if w_invs is None else w_invs[i])
        return z

    # ----------------------------------------------------------------------------------------- data
    def _param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def preprocess(self, x: torch.Tensor, dequantize: bool = True,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (uint8 in [0, 255] or float in [0, 1]) -> continuous model space [-0.5, 0.5)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"images must have shape (B, C, H, W), got {tuple(x.shape)} ({x.dim()}-D)")
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"images have shape (C, H, W) = {tuple(x.shape[1:])}, model expects "
                             f"{self.image_shape}")
        self._check_device(x, "images are")
        if x.dtype == torch.uint8:
            x = x.to(self._param_dtype())
        elif x.is_floating_point():
            if x.requires_grad and torch.is_grad_enabled():
                # quantising to the n_bits grid is piecewise constant: x.grad would be exactly zero, silently
                raise ValueError("images that require grad: preprocess quantises them to the n_bits grid, so their "
                                 "gradient would be zero. For d log p / d x of the continuous density use "
                                 "model.log_density(x_model) on x_model = model.preprocess(x.detach()) (or your "
                                 "own values in [-0.5, 0.5)) with requires_grad")
            check_finite(x, "images")
            if can_synchronize(x) and bool((x < 0).any() or (x > 1).any()):
                raise ValueError("float images must lie in [0, 1] (uint8 images in [0, 255])")
            x = torch.round(x.to(self._param_dtype()) * 255)
        else:
            raise TypeError(f"images must be uint8 or floating point, got dtype {x.dtype}")
        x = torch.floor(x / 2 ** (8 - self.n_bits)) / self.n_bins - 0.5
        if dequantize:
            x = x + torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) / self.n_bins
        return x

    def postprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> float images in [0, 1] on the n_bits grid.

        An image with any non-finite value (the inverse flow overflowed: an under-trained model, a high
        temperature) comes back all NaN, with a RuntimeWarning that counts them: clamped, its inf pixels would pass
        for black or white ones. `save_grid` draws NaN images black."""
        overflowed = ~torch.isfinite(x).flatten(1).all(1)
        x = torch.floor((x + 0.5) * self.n_bins).clamp(0, self.n_bins - 1)
        x = (x * (2 ** (8 - self.n_bits)) / 255.0).masked_fill(overflowed.view(-1, *[1] * (x.dim() - 1)), math.nan)
        if can_synchronize(x) and bool(overflowed.any()):
            warnings.warn(f"{int(overflowed.sum())} of {len(x)} images have non-finite values in model space (the "
                          "inverse flow overflowed: an under-trained model or a high temperature); returned as NaN "
                          "images", RuntimeWarning, stacklevel=2)
        return x

    # ----------------------------------------------------------------------------------------- flow
    def _check_model_space(self, x: torch.Tensor) -> None:
        check_image_batch(x, self.image_shape[0], "x")
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"x has shape (C, H, W) = {tuple(x.shape[1:])}, model expects {self.image_shape}")
        self._check_dtype_device(x, "x")

    def _check_dtype_device(self, x: torch.Tensor, name: str) -> None:
        p = next(self.parameters())
        if x.dtype != p.dtype:
            raise TypeError(f"{name} has dtype {x.dtype}, the model's parameters are {p.dtype} (convert one of them)")
        self._check_device(x, f"{name} is")

    def _check_device(self, x: torch.Tensor, subject: str) -> None:
        device = next(self.parameters()).device
        if x.device != device:
            raise ValueError(f"{subject} on {x.device}, the model is on {device}")

    def _check_latents(self, latents, n: int | None) -> int | None:
        """Validate decode's latents (one per level, None = sample) and return the batch size they imply."""
        if not isinstance(latents, (list, tuple)):
            raise TypeError(f"latents must be a list with one tensor (or None) per level, got {type(latents).__name__}")
        if len(latents) != len(self.levels):
            raise ValueError(f"expected {len(self.levels)} latents (one per level), got {len(latents)}")
        if n is not None:
            n = _whole_number(n, "n (the number of samples)", 1)
        for i, (z, shape) in enumerate(zip(latents, self.latent_shapes)):
            if z is None:
                continue
            name = "top latent" if i == len(latents) - 1 else f"latent {i} (level {i})"
            if not isinstance(z, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor or None, got {type(z).__name__}")
            if z.dim() != 4 or tuple(z.shape[1:]) != shape:
                raise ValueError(f"{name} must have shape (B, {', '.join(map(str, shape))}), got {tuple(z.shape)}")
            if n is not None and z.shape[0] != n:
                raise ValueError(f"{name} has batch size {z.shape[0]}, expected {n} (as the other latents or n)")
            n = z.shape[0]
            self._check_dtype_device(z, name)
            check_finite(z, name)
        return n

    def _flow(self, x: torch.Tensor):
        """x in model space (already validated) -> (latents, logdet, sum of the split priors' log p(z2 | z1))."""
        backends = self.level_backends(x.device)
        w_lds = self._w_logabsdets()
        k = 0
        z = x
        logdet = x.new_zeros(x.shape[0])
        log_pz = x.new_zeros(x.shape[0])
        latents = []
        for level, backend in zip(self.levels, backends):
            z = squeeze2d(z)
            n = len(level.steps)
            z, ld = self._steps_forward(level.steps, z, None if w_lds is None else w_lds[k: k + n], backend)
            k += n
            logdet = logdet + ld
            if level.split is not None:
                z, z2, lp = level.split(z)
                latents.append(z2)
                log_pz = log_pz + lp
        latents.append(z)
        return latents, logdet, log_pz

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x in model space -> (latents, logdet): one factored-out latent per split, then the top one."""
        self._check_model_space(x)
        latents, logdet, _ = self._flow(x)
        return latents, logdet

    def decode(self, latents: list[torch.Tensor | None], y: torch.Tensor | None = None,
               temperature: float = 1.0, generator: torch.Generator | None = None,
               n: int | None = None) -> torch.Tensor:
        """Latents -> x in model space. A None latent is drawn from its prior at `temperature`.
        Latent i has shape (B, *self.latent_shapes[i]) (the top one last)."""
        n = self._check_latents(latents, n)
        if not is_temperature(temperature):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        z = latents[-1]
        device = next(self.parameters()).device
        if z is None:
            if n is None:
                raise ValueError("decode: all latents are None; pass n (the number of samples)")
            z = self.prior.sample(n, y, temperature, generator, device, self._param_dtype())
        backends = self.level_backends(z.device)
        w_invs = self._w_inverses()
        k = sum(len(level.steps) for level in self.levels)
        for i in reversed(range(len(self.levels))):
            level = self.levels[i]
            if level.split is not None:
                z = level.split.inverse(z, latents[i], temperature, generator)
            n_steps = len(level.steps)
            k -= n_steps
            z = self._steps_inverse(level.steps, z, None if w_invs is None else w_invs[k: k + n_steps], backends[i])
            z = unsqueeze2d(z)
        return z

    # ----------------------------------------------------------------------------------------- likelihood
    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, dequantize: bool = True,
                generator: torch.Generator | None = None) -> GlowOutput:
        """Images -> GlowOutput(log_prob, bits_per_dim, y_logits). Training minimises bits_per_dim.mean()."""
        xc = self.preprocess(x, dequantize=dequantize, generator=generator)  # validates the images
        log_density, top = self._log_density(xc, y)
        num_dims = math.prod(self.image_shape)
        log_prob = log_density - num_dims * math.log(self.n_bins)
        bpd = -log_prob / (num_dims * math.log(2.0))
        return GlowOutput(log_prob, bpd, self.prior.class_logits(top))

    def log_density(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample log-density in nats of the continuous flow at x in model space (``preprocess``'s output, in
        [-0.5, 0.5)), differentiable with respect to x -- for d log p / d x (saliency maps, gradient-based OOD
        scores, adversarial inputs), which ``forward`` cannot give because ``preprocess`` refuses images that
        require grad. ``forward(images).log_prob`` is ``log_density(preprocess(images)) - D * log(n_bins)`` with
        the same noise."""
        self._check_model_space(x)
        check_finite(x, "x")
        return self._log_density(x, y)[0]

    def _log_density(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-density of model-space x, the top latent)."""
        latents, logdet, log_pz = self._flow(x)
        return log_pz + self.prior.log_prob(latents[-1], y) + logdet, latents[-1]

    def log_prob(self, x: torch.Tensor, y: torch.Tensor | None = None, dequantize: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample log-likelihood in nats of the discrete images, including the dequantisation term."""
        return self.forward(x, y, dequantize, generator).log_prob

    def bits_per_dim(self, x: torch.Tensor, y: torch.Tensor | None = None, dequantize: bool = True,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        return self.forward(x, y, dequantize, generator).bits_per_dim

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, y: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """n images as floats in [0, 1]; temperature scales every prior's standard deviation. An image whose inverse
        overflowed is all NaN, with a RuntimeWarning (``postprocess``)."""
        x = self.decode([None] * len(self.levels), y=y, temperature=temperature, generator=generator, n=n)
        return self.postprocess(x)

