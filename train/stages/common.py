"""What the two diffusion stages (pretrain, inpaint) share: the noise schedule, the loss options, the frozen
encoders, and writing the model that comes out.

The loss is diffusers' examples/text_to_image/train_text_to_image.py (0.42), option for option:
    noise   eps ~ N(0, I), plus offset noise (a per-channel constant, Guttenberg 2023, "Diffusion with Offset Noise")
    t       uniform over the training timesteps
    x_t     sqrt(a_t) x0 + sqrt(1 - a_t) eps', eps' = eps + p * N(0, I) with input perturbation p (Ning et al. 2023,
            "Input Perturbation Reduces Exposure Bias in Diffusion Models"); the target still uses eps
    target  eps, or v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (Salimans & Ho 2022)
    weight  min-SNR-γ (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"):
            min(SNR, γ) / SNR for eps, min(SNR, γ) / (SNR + 1) for v
Zero terminal SNR (Lin et al. 2023) rescales the betas so the last step is pure noise; it is written into the
saved scheduler config, so sampling uses the same schedule. Caption dropout replaces a caption by the empty prompt
with probability p, which is what classifier-free guidance (Ho & Salimans 2022) later subtracts.

Every random draw comes from the generator train/core.py passes, in a fixed order (dropout, posterior sample,
[inpaint masks], noise, offset, perturbation, timesteps), so a resumed run draws what a straight run would, and a
batch from the latent cache (train/cache.py) gives the loss the images would.
"""
from __future__ import annotations

import dataclasses
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...diffusion.latents import host_to_device
from ...diffusion.schedule import alphas_cumprod
from ...nn.checkpoint import Model, save_model
from ...nn.config import PREDICTION_TYPES, ModelConfig
from ..core import ConfigError

__all__ = ["DiffusionOptions", "NoiseSchedule", "DiffusionStage", "posterior_moments", "sample_posterior",
           "write_model", "EXTRA_FOLDERS"]

# Folders a model folder may carry that load_model ignores; a stage copies them from --init so that the chain
# (clip -> vae -> pretrain -> inpaint) ends with the CLIP vision tower the clip stage trained.
EXTRA_FOLDERS = ("image_encoder",)


@dataclass(frozen=True)
class DiffusionOptions:
    prediction_type: str | None = None   # None: keep the model's (ModelConfig.prediction_type)
    snr_gamma: float = 0.0               # 0: plain MSE; 5.0 is Hang et al.'s recommended γ
    noise_offset: float = 0.0            # 0.05-0.1 lets the model make very dark/bright images (Guttenberg)
    input_perturbation: float = 0.0      # 0.1 in Ning et al. and diffusers' example
    zero_terminal_snr: bool = False      # Lin et al. 2023; needs v-prediction (their sec. 3.2)
    caption_dropout: float = 0.0         # 0.1 is common (SD 1.5 used 10% text-conditioning dropout)

    def __post_init__(self):
        rules = [("prediction_type", self.prediction_type in (None, *PREDICTION_TYPES),
                  f"one of {', '.join(PREDICTION_TYPES)}"),
                 *((name, 0 <= getattr(self, name) < math.inf, ">= 0")
                   for name in ("snr_gamma", "noise_offset", "input_perturbation")),
                 ("caption_dropout", 0.0 <= self.caption_dropout <= 1.0, "in [0, 1]")]
        for name, ok, want in rules:
            if not ok:
                raise ConfigError("DiffusionOptions", name, getattr(self, name), want)

    def apply(self, cfg: ModelConfig) -> ModelConfig:
        """The model config this training writes: its prediction type and (zero-SNR) schedule."""
        prediction = self.prediction_type or cfg.prediction_type
        scheduler = cfg.scheduler
        if self.zero_terminal_snr:
            scheduler = dataclasses.replace(scheduler, rescale_betas_zero_snr=True)
        if scheduler.rescale_betas_zero_snr and prediction != "v_prediction":
            # With SNR 0 at t = T the input holds no trace of x0, so an eps model can never recover it there.
            raise ValueError("zero terminal SNR needs v-prediction (Lin et al. 2023, sec. 3.2): pass "
                             "--prediction v_prediction")
        return dataclasses.replace(cfg, prediction_type=prediction, scheduler=scheduler)


class NoiseSchedule:
    """The forward process of one SchedulerConfig: alphas_cumprod (T,) float32 as diffusers' DDPMScheduler has it."""

    def __init__(self, cfg: ModelConfig):
        self.alphas_cumprod = alphas_cumprod(cfg.scheduler)  # (T,), exactly 0 at T-1 under zero terminal SNR
        self.num_timesteps = cfg.scheduler.num_train_timesteps
        self._copies = {}  # device -> alphas_cumprod there: a host->GPU copy every step would wait for the GPU

    def _alphas(self, device: torch.device) -> torch.Tensor:
        if device not in self._copies:
            self._copies[device] = self.alphas_cumprod.to(device)
        return self._copies[device]

    def _coefficients(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self._alphas(x.device).to(x.dtype)[t.to(x.device)]  # (B,)
        shape = (-1,) + (1,) * (x.dim() - 1)
        return (a ** 0.5).view(shape), ((1 - a) ** 0.5).view(shape)  # (B, 1, 1, 1) each

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise (DDPMScheduler.add_noise, same float ops)."""
        s, r = self._coefficients(x0, t)
        return s * x0 + r * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(a_t) noise - sqrt(1 - a_t) x0 (DDPMScheduler.get_velocity)."""
        s, r = self._coefficients(x0, t)
        return s * noise - r * x0

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) float32 a_t / (1 - a_t), computed as diffusers' training_utils.compute_snr does."""
        a = self._alphas(t.device)
        return ((a ** 0.5)[t].float() / ((1.0 - a) ** 0.5)[t].float()) ** 2

    def min_snr_weights(self, t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
        """(B,) per-item loss weights of min-SNR-γ: min(SNR, γ) / SNR (eps) or / (SNR + 1) (v)."""
        snr = self.snr(t)
        clipped = torch.minimum(snr, torch.full_like(snr, gamma))
        return clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)


def posterior_moments(vae: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """images (B, 3, H, W) in [-1, 1] -> q(z|x) as (B, 2C, h, w): mean channels, then the clamped log-variance.
    This is what the latent cache stores, so the cache and on-the-fly encoding share one sampling path."""
    posterior = vae.encode_posterior(images)
    return torch.cat([posterior.mean, posterior.logvar], dim=1).float()  # (B, 2C, h, w)


def sample_posterior(moments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """z = mean + exp(logvar / 2) * eps, eps drawn on the CPU generator (LDM's DiagonalGaussianDistribution)."""
    mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
    eps = host_to_device(torch.randn(mean.shape, generator=generator), mean.device)
    return mean + torch.exp(0.5 * logvar) * eps


def _randn(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return host_to_device(torch.randn(shape, generator=generator), like.device).to(like.dtype)


def write_model(model: Model, out_dir: Path, init: str | Path | None = None) -> Path:
    """save_model as a diffusers folder, then copy EXTRA_FOLDERS over from the --init folder (if it has them)."""
    out_dir = Path(out_dir)
    save_model(model, out_dir, layout="diffusers")
    if init is not None and Path(init).is_dir() and Path(init).resolve() != out_dir.resolve():
        for name in EXTRA_FOLDERS:
            if (Path(init) / name).is_dir() and not (out_dir / name).exists():
                shutil.copytree(Path(init) / name, out_dir / name)
    return out_dir


class DiffusionStage:
    """Trains `model.unet` on the frozen text encoder and VAE (base of pretrain and inpaint).

    A batch is either dataset items (`image` (B, 3, H, W) in [-1, 1], `caption` list[str]) or latent-cache items
    (`moments` (B, 2C, h, w), `context` (B, 77, C)); see train/cache.py.
    """

    def __init__(self, model: Model, options: DiffusionOptions = DiffusionOptions(), device="cpu",
                 init: str | Path | None = None):
        self.options, self.device, self.init = options, torch.device(device), init
        self.model = dataclasses.replace(model, config=options.apply(model.config))
        self.schedule = NoiseSchedule(self.model.config)
        for frozen in (self.model.vae, self.model.text_encoder):
            frozen.to(self.device).eval().requires_grad_(False)
        self.model.unet.requires_grad_(True)
        self.empty_context = self._encode_text([""])  # (1, 77, C): the dropped caption (the CFG "uncond")

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def trainable(self) -> nn.Module:
        return self.model.unet

    @torch.no_grad()
    def _encode_text(self, captions: list[str]) -> torch.Tensor:
        ids = host_to_device(self.model.tokenizer(captions), self.device)  # (B, 77)
        return self.model.text_encoder(ids).float()  # (B, 77, C)

    @torch.no_grad()
    def condition(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (x0: scaled latents (B, C, h, w), context (B, 77, C)), with caption dropout applied."""
        cached = "moments" in batch
        n = batch["moments" if cached else "image"].shape[0]
        drop = torch.rand(n, generator=generator) < self.options.caption_dropout  # (B,), drawn every step
        if cached:
            context = batch["context"].float()
            context = torch.where(host_to_device(drop, context.device)[:, None, None], self.empty_context, context)
            moments = batch["moments"].float()
        else:
            captions = ["" if d else c for d, c in zip(drop.tolist(), batch["caption"])]
            context = self._encode_text(captions)
            moments = posterior_moments(self.model.vae, batch["image"])
        x0 = sample_posterior(moments, generator) * self.config.scaling_factor
        return x0, context

    def diffusion_loss(self, unet: nn.Module, x0: torch.Tensor, context: torch.Tensor, generator: torch.Generator,
                       concat: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """The noise-prediction loss of `unet` at random timesteps. `concat` (B, 5, h, w) is appended to the noisy
        latents along channels (the inpainting UNet's mask and masked-image latents)."""
        opts, prediction = self.options, self.config.prediction_type
        noise = _randn(x0.shape, generator, x0)  # (B, C, h, w)
        if opts.noise_offset:
            noise = noise + opts.noise_offset * _randn((x0.shape[0], x0.shape[1], 1, 1), generator, x0)
        noised_with = noise
        if opts.input_perturbation:
            noised_with = noise + opts.input_perturbation * _randn(noise.shape, generator, x0)
        t = host_to_device(torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), generator=generator),
                           x0.device)
        x_t = self.schedule.add_noise(x0, noised_with, t)
        target = noise if prediction == "epsilon" else self.schedule.velocity(x0, noise, t)
        model_input = x_t if concat is None else torch.cat([x_t, concat.to(x_t.dtype)], dim=1)  # (B, 4 [+5], h, w)
        pred = unet(model_input, t, context)
        per_item = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
        mse = per_item.mean()
        if opts.snr_gamma:
            loss = (per_item * self.schedule.min_snr_weights(t, opts.snr_gamma, prediction)).mean()
        else:
            loss = mse
        return loss, {"mse": mse.detach()}

    def save_final(self, module: nn.Module, out_dir: Path) -> None:
        write_model(dataclasses.replace(self.model, unet=module), out_dir, self.init)
