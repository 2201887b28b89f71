"""ActNorm2d: per-channel affine map with data-dependent initialisation (Glow §3.1)."""

import torch
import torch.distributed as dist
from torch import nn

from ._checks import check_input, layer_name


class ActNorm2d(nn.Module):
    """y = (x + bias) * exp(log_scale); logdet = H*W*sum(log_scale).

    The first forward call in training mode initialises bias = -mean and log_scale = -log(std + eps)
    per channel from that batch, so the outputs have zero mean and unit variance per channel.
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.channels = channels
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))
        # Host-side mirror of `initialized`: reading the buffer on a GPU synchronises the device, which would
        # happen at every flow step of every forward (and split torch.compile graphs). Read it once, then cache.
        self._initialized_cache = False

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set bias and log_scale from the batch `x` (B, C, H, W).

        Raises ValueError (parameters and `initialized` untouched) for an empty batch or non-finite statistics.
        Checked after batch_stats' all-reduce, so under torch.distributed every rank raises alike (an empty rank's
        NaN moments reach every rank). One host sync, once per layer.
        """
        check_input(x, self, self.channels)
        mean, std = self.batch_stats(x)
        if x.numel() == 0:
            raise ValueError(f"{layer_name(self)}: data-dependent init needs a non-empty batch, got shape "
                             f"{tuple(x.shape)}")
        if not bool(torch.isfinite(torch.stack([mean, std])).all()):
            raise ValueError(f"{layer_name(self)}: data-dependent init got non-finite batch statistics "
                             "(NaN or Inf in the input batch)")
        self.set_from_stats(mean, std)

    @staticmethod
    @torch.no_grad()
    def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std over (B, H, W) — over all ranks' batches under torch.distributed.

        Averaging the first and second moments across ranks (equal per-rank batch sizes, as
        DistributedSampler gives) makes the initialisation identical on every rank, as DDP requires.
        """
        flat = x.detach().transpose(0, 1).reshape(x.shape[1], -1).double()
        moments = torch.stack([flat.mean(dim=1), flat.pow(2).mean(dim=1)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(moments)
            moments /= dist.get_world_size()
        mean, sq = moments
        std = (sq - mean**2).clamp_min(0).sqrt()
        return mean.to(x.dtype), std.to(x.dtype)

    @torch.no_grad()
    def set_from_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(True)
        self._initialized_cache = True

    def needs_init(self) -> bool:
        if not self.training or self._initialized_cache:
            return False
        self._initialized_cache = bool(self.initialized)  # one device sync, until the next state-dict load
        return not self._initialized_cache

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._initialized_cache = False  # re-read the loaded buffer on the next training forward

    def logdet(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return (h * w * self.log_scale.sum()).expand(x.shape[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_input(x, self, self.channels)
        if self.needs_init():
            self.initialize(x)
        y = (x + self.bias.view(1, -1, 1, 1)) * torch.exp(self.log_scale).view(1, -1, 1, 1)
        return y, self.logdet(x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        check_input(y, self, self.channels)
        return y * torch.exp(-self.log_scale).view(1, -1, 1, 1) - self.bias.view(1, -1, 1, 1)
