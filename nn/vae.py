"""The KL autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models", sec. 3.1): images in [-1, 1] <-> latents 8x smaller with 4 channels.

Module paths mirror diffusers' AutoencoderKL (diffusers/models/autoencoders/{autoencoder_kl,vae}.py), so a
diffusers `vae/` folder loads with a strict load_state_dict; with `mask_conditioned` they mirror its
AsymmetricAutoencoderKL (Zhu et al. 2023, "Designing a Better Asymmetric VQGAN for StableDiffusion"), whose decoder
also reads the known pixels of an inpainting task (and may be wider than the encoder). Latents here are UNSCALED:
the pipeline multiplies by `cfg.scaling_factor` after `encode` and divides before `decode`.

`use_tiling` / `use_slicing` are diffusers' enable_tiling / enable_slicing: images larger than `cfg.sample_size`
(latents larger than sample_size / 8) are encoded/decoded in overlapping tiles blended into each other, exactly as
AutoencoderKL.tiled_encode / tiled_decode do (so memory stays that of one tile; a tiled result differs slightly from
an untiled one, as there), and a batch one image at a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig
from .layers import Attention, Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D, maybe_checkpoint

__all__ = ["VAE", "DiagonalGaussian", "ConditionEncoder"]

# LDM's VAE normalises with eps 1e-6 everywhere (taming-transformers' Normalize), unlike the UNet's 1e-5.
_EPS = 1e-6


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, exp(logvar)), as LDM's DiagonalGaussianDistribution
    (ldm/modules/distributions/distributions.py). `moments` is (B, 2*C, h, w): mean channels first."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        # The clamp keeps exp() finite early in training; LDM's bounds.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * noise, the noise drawn on the generator's device (a CPU generator gives the same latents
        whichever device the VAE runs on, as diffusers' randn_tensor does)."""
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over all latent dims, one value per item: (B,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class SpatialSelfAttention(Attention):
    """The VAE mid block's attention: one head over all h*w positions, GroupNorm first, residual added.

    diffusers builds it as Attention(heads=1, dim_head=C, bias=True, residual_connection=True) with `group_norm`.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, dim_head=channels, bias=True)
        self.group_norm = GroupNorm(groups, channels, _EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        h = super().forward(h)  # (B, HW, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)


class MidBlock(nn.Module):
    """resnet, attention, resnet at the lowest resolution (diffusers' UNetMidBlock2D, no time embedding)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, None, groups, _EPS) for _ in range(2)])

    def forward(self, x: torch.Tensor, ckpt: bool = False) -> torch.Tensor:
        x = maybe_checkpoint(ckpt, self.resnets[0], x)
        x = maybe_checkpoint(ckpt, self.attentions[0], x)
        return maybe_checkpoint(ckpt, self.resnets[1], x)


class _Level(nn.Module):
    """One resolution level: `resnets`, then `downsamplers.0` (encoder) or `upsamplers.0` (decoder) if any."""

    def __init__(self, resnets: list[ResnetBlock2D], down: Downsample2D | None = None, up: Upsample2D | None = None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.downsamplers = nn.ModuleList([down]) if down is not None else None
        self.upsamplers = nn.ModuleList([up]) if up is not None else None

    def forward(self, x: torch.Tensor, ckpt: bool = False) -> torch.Tensor:
        for resnet in self.resnets:
            x = maybe_checkpoint(ckpt, resnet, x)
        for sampler in (self.downsamplers or ()):
            x = sampler(x)
        for sampler in (self.upsamplers or ()):
            x = sampler(x)
        return x


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, 2*latent, H/8, W/8): mean and log-variance of the posterior."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        for i in range(n):
            c_in = ch[max(i - 1, 0)]
            resnets = [ResnetBlock2D(c_in if j == 0 else ch[i], ch[i], None, g, _EPS)
                       for j in range(cfg.layers_per_block)]
            down = Downsample2D(ch[i], padding=0) if i < n - 1 else None
            self.down_blocks.append(_Level(resnets, down=down))
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = GroupNorm(g, ch[-1], _EPS, silu=True)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, ckpt: bool = False) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x, ckpt)
        x = self.mid_block(x, ckpt)
        return self.conv_out(self.conv_norm_out(x))


class ConditionEncoder(nn.Module):
    """The asymmetric decoder's view of the known pixels (diffusers' MaskConditionEncoder): five convs over the
    masked image, 3x3 at full resolution twice, then three 4x4 stride-2 ones, with widths
    min(c0 * 2^k, cL) for k = 0..3, then cL (c0, cL: the decoder's first and last widths). Returns each conv's
    output before its ReLU, keyed by (channels, downscale); a later conv of the same key wins, as in diffusers."""

    def __init__(self, in_channels: int, c0: int, c_last: int):
        super().__init__()
        widths = [min(c0 * 2 ** k, c_last) for k in range(4)] + [c_last]
        ins = [in_channels] + widths[:-1]
        self.layers = nn.Sequential(*[nn.Conv2d(i, o, 3, 1, 1) if k < 2 else nn.Conv2d(i, o, 4, 2, 1)
                                      for k, (i, o) in enumerate(zip(ins, widths))])
        self.keys = [(o, 2 ** max(k - 1, 0)) for k, o in enumerate(widths)]  # (channels, downscale) per conv

    def forward(self, masked_image: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
        out = {}
        x = masked_image  # (B, 3, H, W)
        for key, conv in zip(self.keys, self.layers):
            x = conv(x)  # (B, C, H / s, W / s)
            out[key] = x
            x = torch.relu(x)
        return out


class Decoder(nn.Module):
    """(B, latent, h, w) -> (B, 3, 8h, 8w). Each level has decoder_layers + 1 resnets (layers_per_block + 1, as
    LDM, unless the decoder is an asymmetric one).

    Mask-conditioned (cfg.mask_conditioned, diffusers' MaskConditionDecoder): given the image and the repaint mask
    (SD's convention: 1 = repaint), the input of every level and the last features take the condition encoder's
    features of the masked image wherever the mask (nearest-downsampled) is 0, so the known pixels and the edges
    next to them are decoded from the pixels themselves, not only from 4 latent numbers per 8x8 cell."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.decoder_channels, cfg.norm_num_groups, len(cfg.decoder_channels)
        rev = tuple(reversed(ch))
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], g)
        self.up_blocks = nn.ModuleList()
        for i in range(n):
            c_in = rev[max(i - 1, 0)]
            resnets = [ResnetBlock2D(c_in if j == 0 else rev[i], rev[i], None, g, _EPS)
                       for j in range(cfg.decoder_layers + 1)]
            up = Upsample2D(rev[i]) if i < n - 1 else None
            self.up_blocks.append(_Level(resnets, up=up))
        self.condition_encoder = None
        if cfg.mask_conditioned:
            self.condition_encoder = ConditionEncoder(cfg.out_channels, ch[0], ch[-1])
            # the features each level's input and the output take: (channels, downscale from the image)
            self._cond_keys = [(rev[max(i - 1, 0)], 2 ** (n - 1 - i)) for i in range(n)] + [(ch[0], 1)]
            missing = [k for k in self._cond_keys if k not in self.condition_encoder.keys]
            if missing:
                raise ValueError(f"VAEConfig: a mask-conditioned decoder with widths {ch} needs condition features "
                                 f"(channels, downscale) {missing}, which its condition encoder "
                                 f"{self.condition_encoder.keys} does not make")
        self.conv_norm_out = GroupNorm(g, ch[0], _EPS, silu=True)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, ckpt: bool = False, image: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z), ckpt)
        if image is None:
            for block in self.up_blocks:
                x = block(x, ckpt)
            return self.conv_out(self.conv_norm_out(x))
        mask = mask.to(x.dtype)  # (B, 1, H, W), 1 = repaint
        cond = maybe_checkpoint(ckpt, self.condition_encoder, (1 - mask) * image.to(x.dtype))
        for block, key in zip(self.up_blocks, self._cond_keys):
            m = F.interpolate(mask, size=x.shape[-2:], mode="nearest")  # (B, 1, h', w')
            x = block(x * m + cond[key] * (1 - m), ckpt)
        x = x * mask + cond[self._cond_keys[-1]] * (1 - mask)
        return self.conv_out(self.conv_norm_out(x))


def _blend(before: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """`tile` with its first `extent` rows (dim 2) or columns (dim 3) faded in from the last ones of `before`."""
    extent = min(before.shape[dim], tile.shape[dim], extent)
    if extent == 0:
        return tile
    w = torch.arange(extent, device=tile.device, dtype=tile.dtype) / extent  # 0, 1/e, ... : weight of `tile`
    w = w.view(-1, 1) if dim == 2 else w
    head = before.narrow(dim, before.shape[dim] - extent, extent) * (1 - w) + tile.narrow(dim, 0, extent) * w
    return torch.cat([head, tile.narrow(dim, extent, tile.shape[dim] - extent)], dim)


def tiled(fn, x: torch.Tensor, tile: int, out_tile: int, overlap: float = 0.25,
          condition: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """fn over tile x tile windows of x (B, C, H, W) that start every tile * (1 - overlap); fn maps a window (and
    the same window of each `condition` tensor, at fn's output scale) to out_tile / tile times its size. Each result
    fades into the one above and the one to its left over out_tile * overlap rows/columns and keeps its first
    out_tile * (1 - overlap): diffusers' AutoencoderKL tiled_encode / tiled_decode. When fn shrinks (the encoder),
    a last window narrower than one output pixel is left out: what it would add is already covered (diffusers
    encodes it and fails, e.g. at 4 px, or returns a row more than an untiled encode)."""
    step, blend = int(tile * (1 - overlap)), int(out_tile * overlap)
    keep, f = out_tile - blend, out_tile / tile
    starts = [range(0, n, step) if f >= 1 else [s for s in range(0, n, step) if (n - s) * f >= 1]
              for n in x.shape[2:]]
    rows: list[list[torch.Tensor]] = []
    for i in starts[0]:
        row: list[torch.Tensor] = []
        for j in starts[1]:
            window = (slice(None), slice(None), slice(i, i + tile), slice(j, j + tile))
            scaled = (slice(None), slice(None), slice(int(i * f), int((i + tile) * f)),
                      slice(int(j * f), int((j + tile) * f)))
            out = fn(x[window], *(c[scaled] for c in condition))
            if rows:
                out = _blend(rows[-1][len(row)], out, blend, 2)
            if row:
                out = _blend(row[-1], out, blend, 3)
            row.append(out)
        rows.append(row)
    return torch.cat([torch.cat([t[:, :, :keep, :keep] for t in row], 3) for row in rows], 2)


class VAE(nn.Module):
    """AutoencoderKL. `encode` gives the posterior mean, `decode` maps latents back to (unclamped) images."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1)  # a 1x1 conv on the moments, kept from VQGAN's layout
        self.post_quant_conv = nn.Conv2d(c, c, 1)
        # Recompute resnet/attention activations in backward (training only); see layers.maybe_checkpoint.
        self.gradient_checkpointing = False
        self.use_tiling = False   # diffusers' enable_tiling(): see the module docstring
        self.use_slicing = False  # diffusers' enable_slicing(): one image of a batch at a time
        self.tile_overlap_factor = 0.25

    def enable_tiling(self, use_tiling: bool = True) -> None:  # diffusers' AutoencoderKL switches
        self.use_tiling = use_tiling

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def _check(self, x: torch.Tensor, channels: int, what: str, name: str) -> None:
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"VAE.{what}: {name} must be (B, {channels}, H, W), got shape {tuple(x.shape)}")

    def encode_posterior(self, images: torch.Tensor) -> DiagonalGaussian:
        """images (B, 3, H, W) in [-1, 1] -> q(z|x) over (B, 4, H/8, W/8) latents.

        Sides that are not multiples of 8 round down, as in diffusers (the encoder pads one row/column)."""
        self._check(images, self.cfg.in_channels, "encode", "images")
        ckpt = self.gradient_checkpointing and self.training
        size = self.cfg.sample_size

        def whole(x: torch.Tensor) -> torch.Tensor:  # (B, 2C, h, w)
            return self.quant_conv(self.encoder(x, ckpt))

        def moments(x: torch.Tensor) -> torch.Tensor:
            if self.use_tiling and max(x.shape[2:]) > size:
                return tiled(whole, x, size, size // self.cfg.downsample_factor, self.tile_overlap_factor)
            return whole(x)
        if self.use_slicing and images.shape[0] > 1:
            return DiagonalGaussian(torch.cat([moments(x) for x in images.split(1)]))
        return DiagonalGaussian(moments(images))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> posterior mean (B, 4, H/8, W/8), unscaled."""
        return self.encode_posterior(images).mean

    def decode(self, latents: torch.Tensor, image: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Unscaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w), roughly [-1, 1] but not clamped.

        A mask-conditioned VAE (cfg.mask_conditioned) also takes the inpainting task's image (B, 3, 8h, 8w) in
        [-1, 1] and repaint mask (B, 1, 8h, 8w), 1 = repaint, 0 = keep (diffusers' AsymmetricAutoencoderKL
        arguments); without them it decodes as a plain VAE."""
        self._check(latents, self.cfg.latent_channels, "decode", "latents")
        if (image is None) != (mask is None):
            raise ValueError("VAE.decode: give both image and mask (the inpainting condition) or neither")
        if image is not None:
            if not self.cfg.mask_conditioned:
                raise ValueError("VAE.decode: image/mask condition only a mask-conditioned VAE "
                                 "(AsymmetricAutoencoderKL); this one is a plain AutoencoderKL")
            B, _, h, w = latents.shape
            f = self.cfg.downsample_factor
            for name, t, c in (("image", image, self.cfg.out_channels), ("mask", mask, 1)):
                if tuple(t.shape) != (B, c, h * f, w * f):
                    raise ValueError(f"VAE.decode: {name} must be {(B, c, h * f, w * f)} for latents "
                                     f"{tuple(latents.shape)}, got {tuple(t.shape)}")
        ckpt = self.gradient_checkpointing and self.training
        size = self.cfg.sample_size // self.cfg.downsample_factor
        cond = () if image is None else (image, mask)

        def whole(z: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
            return self.decoder(self.post_quant_conv(z), ckpt, *cond)

        def decode(z: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
            if self.use_tiling and max(z.shape[2:]) > size:
                return tiled(whole, z, size, self.cfg.sample_size, self.tile_overlap_factor, cond)
            return whole(z, *cond)
        if self.use_slicing and latents.shape[0] > 1:
            return torch.cat([decode(*items) for items in zip(*(t.split(1) for t in (latents, *cond)))])
        return decode(latents, *cond)

    def forward(self, images: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct for training: (reconstruction, posterior); decodes a posterior sample or its mean, with
        `images` and `mask` as the decoder's condition when a mask is given (mask-conditioned VAEs)."""
        posterior = self.encode_posterior(images)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, None if mask is None else images, mask), posterior
