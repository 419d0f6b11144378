"""`backdrop train vae`: the KL autoencoder (Rombach et al. 2022, sec. 3.1 and appendix G) on images alone.

Loss = (1 - α) L1 + α (1 - SSIM) + β KL / (3HW), with α = 0.84 and β = 1e-6:
* L1 + SSIM is Zhao et al. 2017 ("Loss Functions for Image Restoration with Neural Networks", IEEE TCI), whose
  mix with α = 0.84 beat L2, L1 and SSIM alone on restoration. L1 keeps colours right but blurs; SSIM (Wang et al.
  2004) scores local means, contrast and structure in 11x11 Gaussian windows, so it pays for edges and texture that
  L1 averages away. LDM adds LPIPS and, after 50k steps, a patch-GAN: LPIPS needs a pretrained VGG (not available
  offline) and the GAN doubles the cost and is fragile on a CPU budget, so neither is here.
* KL(q(z|x) || N(0, I)) with LDM's weight 1e-6 on per-image sums (configs/autoencoder/*kl*f8*.yaml); our
  reconstruction terms are per-pixel means, so the KL sum is divided by the 3HW pixel values of the image to keep
  LDM's ratio. It only keeps the latent scale in check; it is not a VAE prior to sample from.
At the end the latent scaling factor is re-measured as 1 / std(latents) over a calibration batch (LDM's
`scale_by_std`), so the UNet trained next sees unit-variance latents.

`decoder_only` (`--decoder-only`) fine-tunes the decoder (and post_quant_conv) of a trained VAE with its encoder
frozen, as Stability did for sd-vae-ft-mse: the latent space and scaling factor stay those of --init, so a UNet
already trained on them keeps working and only the pixels it decodes to get sharper. The KL term is then constant.

`mask_conditioned` (`--mask-conditioned`, with `--decoder-only`) turns the decoder into an asymmetric one (Zhu et
al. 2023; diffusers' AsymmetricAutoencoderKL, nn/vae.py): the decoder keeps its weights and gains a condition encoder
over the masked image, and is trained to reconstruct each image given it and a repaint mask per item (data.py's
inpaint_mask: the product kept `product_prob` of the time where the data has product masks, else random masks,
a quarter of which repaint everything and so train plain decoding too). At inference the inpaint pipeline hands the
decoder the known pixels, so the product's edge is decoded from the pixels, not only from 4 latent numbers per
8x8 cell. The encoder, its latent space and the UNet stay as they are.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...diffusion.latents import host_to_device
from ...nn.checkpoint import Model
from ...nn.vae import VAE
from ..data import inpaint_mask
from .common import posterior_moments, sample_posterior, write_model

__all__ = ["VAEStage", "Autoencoder", "ssim", "measure_scaling_factor", "to_mask_conditioned"]

SSIM_WEIGHT = 0.84  # Zhao et al. 2017, sec. III-D
KL_WEIGHT = 1e-6    # LDM kl-f8 autoencoder config, `kl_weight`


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()  # (size,)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5,
         data_range: float = 2.0) -> torch.Tensor:
    """Mean SSIM per image (Wang et al. 2004, eq. 13; K1 = 0.01, K2 = 0.03, Gaussian window, no padding).
    x, y (B, C, H, W), values spanning `data_range` (2 for [-1, 1]) -> (B,). Computed in float32."""
    x, y = x.float(), y.float()
    c = x.shape[1]
    size = min(window, x.shape[-2], x.shape[-1])
    size -= 1 - size % 2  # odd, so the window has a centre
    g = _gaussian_window(size, sigma, x.device, x.dtype)
    gh, gw = g.view(1, 1, size, 1).repeat(c, 1, 1, 1), g.view(1, 1, 1, size).repeat(c, 1, 1, 1)

    def blur(t):  # separable Gaussian mean over each window, per channel
        return F.conv2d(F.conv2d(t, gh, groups=c), gw, groups=c)

    mu_x, mu_y = blur(x), blur(y)  # (B, C, H', W')
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=(1, 2, 3))


@torch.no_grad()
def measure_scaling_factor(vae: nn.Module, images: torch.Tensor, batch_size: int = 16) -> float:
    """1 / std of posterior samples of `images` (LDM's scale_by_std), rounded to 5 significant digits."""
    was_training = vae.training
    vae.eval()
    device = next(vae.parameters()).device
    g = torch.Generator().manual_seed(0)
    z = torch.cat([sample_posterior(posterior_moments(vae, images[i:i + batch_size].to(device)), g).cpu()
                   for i in range(0, len(images), batch_size)])
    vae.train(was_training)
    std = float(z.double().std())
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"measure_scaling_factor: the latents' std is {std}; the VAE has collapsed or diverged")
    return float(f"{1.0 / std:.5g}")


def to_mask_conditioned(model: Model) -> Model:
    """The model with a mask-conditioned VAE: every weight kept, a new condition encoder (torch's default init).
    A model whose VAE already is one is returned as is."""
    if model.config.vae.mask_conditioned:
        return model
    cfg = dataclasses.replace(model.config, vae=dataclasses.replace(model.config.vae, mask_conditioned=True))
    p = next(model.vae.parameters())
    vae = VAE(cfg.vae).to(p.device, p.dtype)
    missing, unexpected = vae.load_state_dict(model.vae.state_dict(), strict=False)
    new = [k for k in missing if not k.startswith("decoder.condition_encoder.")]
    if new or unexpected:
        raise RuntimeError(f"to_mask_conditioned: unmatched VAE keys {sorted(new + unexpected)[:5]}")
    vae.gradient_checkpointing = model.vae.gradient_checkpointing
    return dataclasses.replace(model, vae=vae.train(model.vae.training), config=cfg)


class Autoencoder(nn.Module):
    """What the stage trains: the VAE, run encode -> posterior sample -> decode in one forward, so that under DDP
    the whole graph goes through the wrapper's forward. The sample's noise comes from the CPU generator; `mask`
    (B, 1, H, W), 1 = repaint, conditions a mask-conditioned decoder on the rest of `images`."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, generator: torch.Generator, mask: torch.Tensor | None = None):
        posterior = self.vae.encode_posterior(images)
        z = sample_posterior(torch.cat([posterior.mean, posterior.logvar], dim=1), generator)  # (B, C, h, w)
        return self.vae.decode(z, None if mask is None else images, mask), posterior


class VAEStage:
    """Trains `model.vae` as an autoencoder: reconstruct the posterior sample, keep the posterior near N(0, I)."""

    def __init__(self, model: Model, device="cpu", init=None, ssim_weight: float = SSIM_WEIGHT,
                 kl_weight: float = KL_WEIGHT, calibration: torch.Tensor | None = None, decoder_only: bool = False,
                 mask_conditioned: bool = False, product_prob: float = 0.5):
        if not 0.0 <= ssim_weight <= 1.0 or kl_weight < 0:
            raise ValueError(f"VAEStage: ssim_weight must be in [0, 1] and kl_weight >= 0, got {ssim_weight}, "
                             f"{kl_weight}")
        if decoder_only and calibration is not None:
            raise ValueError("VAEStage: decoder_only keeps the encoder's latent space and its scaling factor; "
                             "pass no calibration images")
        if (mask_conditioned or model.config.vae.mask_conditioned) and not decoder_only:
            raise ValueError("VAEStage: a mask-conditioned VAE is trained decoder-only (--decoder-only): its decoder "
                             "sees the known pixels, so training the encoder with it would let the latents drop them")
        if not 0.0 <= product_prob <= 1.0:
            raise ValueError(f"VAEStage: product_prob must be in [0, 1], got {product_prob}")
        model = to_mask_conditioned(model) if mask_conditioned else model
        self.conditioned, self.product_prob = model.config.vae.mask_conditioned, product_prob
        self.model, self.device, self.init = model, torch.device(device), init
        self.ssim_weight, self.kl_weight = ssim_weight, kl_weight
        self.calibration = calibration  # (N, 3, H, W) images for the scaling factor; None keeps the model's
        vae = model.vae.requires_grad_(not decoder_only)
        if decoder_only:
            vae.decoder.requires_grad_(True)
            vae.post_quant_conv.requires_grad_(True)
        self.autoencoder = Autoencoder(vae)

    def trainable(self) -> nn.Module:
        return self.autoencoder

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        if "image" not in batch:
            raise ValueError("the vae stage trains on images; a latent cache holds the outputs of the VAE it would "
                             "train (pass --data synthetic:N or an image folder)")
        x = batch["image"]  # (B, 3, H, W) in [-1, 1]
        recon, posterior = model(x, generator, self._repaint_masks(batch, generator, x.device))  # (B, 3, H, W)
        l1 = (recon.float() - x.float()).abs().mean()
        s = ssim(recon, x).mean()
        kl = posterior.kl().float().mean() / x[0].numel()  # per-image sum / 3HW (see the module docstring)
        loss = (1 - self.ssim_weight) * l1 + self.ssim_weight * (1 - s) + self.kl_weight * kl
        return loss, {"l1": l1.detach(), "ssim": s.detach(), "kl": kl.detach()}

    def _repaint_masks(self, batch: dict, generator: torch.Generator, device) -> torch.Tensor | None:
        """(B, 1, H, W), 1 = repaint, one per item (data.inpaint_mask), for a mask-conditioned decoder; else None."""
        if not self.conditioned:
            return None
        H, W = batch["image"].shape[-2:]
        product = batch["mask"].cpu() if "mask" in batch else [None] * len(batch["image"])  # (B, 1, H, W)
        masks = torch.stack([inpaint_mask(H, W, generator, p, self.product_prob) for p in product])
        return host_to_device(masks, device)

    def save_final(self, module: nn.Module, out_dir: Path) -> None:
        vae, cfg = module.vae, self.model.config
        if self.calibration is not None:
            scale = measure_scaling_factor(vae, self.calibration)
            cfg = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, scaling_factor=scale))
            vae.cfg = cfg.vae
        write_model(dataclasses.replace(self.model, vae=vae, config=cfg), out_dir, self.init)
