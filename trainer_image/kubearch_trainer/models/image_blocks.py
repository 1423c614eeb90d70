"""Size tables and convolutional building blocks shared by the image families (VAE, diffusion, CNN).

Why a table per family: ``--model-size`` must mean "a bigger model of the same family" for every
architecture, but a transformer's ``d_model``/``n_layers`` do not translate into a VAE's channel
widths. Each family reads its own row here; explicit ``--d-model`` (width) and ``--n-layers``
(depth) still override the preset, so one knob pair reaches every family.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kubearch_trainer.config import FAMILY_SIZE_TABLE, ModelConfig, family_dims  # noqa: F401 - re-exported

# The size tables live in config.py (torch-free: the operator's GPU matrix counts parameters).


def seeded_randn(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Standard normal noise on ``device``, drawn on the generator's own device.

    torch refuses ``randn(generator=cpu_gen, device="cuda")``; sampling functions take a CPU
    generator for determinism across machines, so draw where the generator lives, then move.
    """
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where).to(device)


def groups_for(channels: int, preferred: int = 8) -> int:
    """Largest group count <= ``preferred`` that divides ``channels`` (GroupNorm needs a divisor)."""
    for g in range(min(preferred, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def max_downsamples(image_size: int, min_side: int = 4) -> int:
    """How many exact halvings keep the side an integer >= ``min_side``."""
    n, side = 0, image_size
    while side % 2 == 0 and side // 2 >= min_side:
        side //= 2
        n += 1
    return n


class ConvEncoder(nn.Module):
    """Image -> feature map: a 3×3 stem, then ``stages`` stride-2 convs doubling the width (cap 8×).

    GroupNorm rather than BatchNorm: VAEs are trained with small per-process batches under DDP, and
    batch statistics would make the reconstruction of one image depend on its batch mates.
    """

    def __init__(self, in_channels: int, width: int, stages: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU()]
        ch = width
        self.channels = [ch]
        for i in range(stages):
            out = width * min(2 ** (i + 1), 8)
            layers += [
                nn.Conv2d(ch, out, 4, stride=2, padding=1),
                nn.GroupNorm(groups_for(out), out),
                nn.SiLU(),
            ]
            ch = out
            self.channels.append(ch)
        self.net = nn.Sequential(*layers)
        self.out_channels = ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    """Feature map -> image logits, mirroring :class:`ConvEncoder` with stride-2 transposed convs."""

    def __init__(self, out_channels: int, width: int, stages: int) -> None:
        super().__init__()
        chans = [width * min(2**i, 8) for i in range(stages + 1)]
        self.in_channels = chans[-1]
        layers: list[nn.Module] = []
        for i in range(stages, 0, -1):
            layers += [
                nn.ConvTranspose2d(chans[i], chans[i - 1], 4, stride=2, padding=1),
                nn.GroupNorm(groups_for(chans[i - 1]), chans[i - 1]),
                nn.SiLU(),
            ]
        layers.append(nn.Conv2d(chans[0], out_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


@torch.no_grad()
def sample_quality(samples: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """FID-free sample-quality proxies (no Inception network, no download).

    ``sample_nn_distance``: mean RMS pixel distance from each sample to its nearest real image
    (lower = closer to the data manifold; 0 would also mean memorisation); ``sample_mean_gap`` /
    ``sample_std_gap``: |difference| of the pixel mean / standard deviation to the real images'.
    """
    s = samples.float().flatten(1)
    r = real.float().flatten(1).to(s.device)
    dist = torch.cdist(s, r) / math.sqrt(s.shape[1])
    return {
        "sample_nn_distance": float(dist.min(dim=1).values.mean()),
        "sample_mean_gap": float((s.mean() - r.mean()).abs()),
        "sample_std_gap": float((s.std() - r.std()).abs()),
    }
