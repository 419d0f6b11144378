"""ControlNet (Zhang et al. 2023, arXiv:2302.05543): a trainable copy of the UNet's encoder that reads a control
image (edges, depth, pose, ...) and steers the frozen UNet through residuals added to its skips and mid block:

    cond (B, 3, H, W) in [0, 1] -> controlnet_cond_embedding (3 stride-2 convs: latent size) -> + conv_in(latents)
    -> down_blocks, mid_block (the UNet's, nn/unet.encoder_modules) -> one zero-initialised 1x1 conv per skip
    (controlnet_down_blocks) and one for the mid block (controlnet_mid_block) -> residuals * conditioning_scale

Module paths are diffusers' ControlNetModel's, so a diffusers `controlnet/` folder (config.json +
diffusion_pytorch_model.safetensors, e.g. lllyasviel/control_v11p_sd15_canny) loads with a strict key check. The
residuals go to UNet.forward's down_block_additional_residuals / mid_block_additional_residual (diffusers' names).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import UNetConfig, _check, _check_fields
from .unet import check_context, encode, encoder_modules, time_embedding

__all__ = ["ControlNet", "ControlNetConfig", "ConditioningEmbedding", "load_controlnet", "saved_controlnets"]


@dataclass(frozen=True)
class ControlNetConfig:
    """The encoder's shape (a UNetConfig: its in_channels are the latents', 4), and the conditioning embedding's
    channels (three stride-2 convs between four widths: the VAE's 8x), as diffusers' ControlNetModel config."""
    unet: UNetConfig = field(default_factory=UNetConfig)
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    conditioning_channels: int = 3
    channel_order: str = "rgb"  # "bgr": the control image's channels are flipped first (diffusers' option)
    global_pool_conditions: bool = False  # residuals averaged over space (the "shuffle" ControlNet)

    def __post_init__(self):
        _check_fields(self, {"conditioning_channels": 16})
        _check(self.unet.in_channels == self.unet.out_channels, "ControlNetConfig",
               f"in_channels {self.unet.in_channels}: a ControlNet reads the {self.unet.out_channels} latent channels")
        _check(min(self.conditioning_embedding_out_channels) >= 1 and self.conditioning_channels >= 1,
               "ControlNetConfig", "conditioning_embedding_out_channels and conditioning_channels must be positive")
        _check(self.channel_order in ("rgb", "bgr"), "ControlNetConfig",
               f"controlnet_conditioning_channel_order {self.channel_order!r}: 'rgb' or 'bgr'")

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell of the control image: 2 per stride-2 conv of the conditioning embedding."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    def to_diffusers(self) -> dict:
        """The `config.json` diffusers' ControlNetModel reads."""
        unet = {k: v for k, v in self.unet.to_diffusers().items()
                if k not in ("up_block_types", "out_channels", "center_input_sample", "sample_size")}
        return unet | {"_class_name": "ControlNetModel",
                       "conditioning_embedding_out_channels": list(self.conditioning_embedding_out_channels),
                       "conditioning_channels": self.conditioning_channels,
                       "controlnet_conditioning_channel_order": self.channel_order,
                       "global_pool_conditions": self.global_pool_conditions}

    @classmethod
    def from_diffusers(cls, cfg: dict, source: str = "controlnet/config.json") -> "ControlNetConfig":
        """Read a diffusers ControlNetModel config; refuse what we do not implement, naming the field."""
        name = cfg.get("_class_name", "ControlNetModel")
        if name != "ControlNetModel":
            t2i = "; a T2IAdapter is given as adapter= (pipe.adapter), not as a ControlNet" * (name == "T2IAdapter")
            raise ValueError(f"{source}: _class_name {name!r}: not a ControlNetModel (SDXL's ControlNetUnion and "
                             f"ControlNet-XS are not supported){t2i}")
        down = cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
        up = ["CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D" for t in reversed(down)]
        ours = ("conditioning_embedding_out_channels", "conditioning_channels",
                "controlnet_conditioning_channel_order", "global_pool_conditions")
        unet = UNetConfig.from_diffusers({k: v for k, v in cfg.items() if k not in ours} | {
            "up_block_types": up, "out_channels": cfg.get("in_channels", 4)}, source)
        widths = cfg.get("conditioning_embedding_out_channels", (16, 32, 96, 256))
        return cls(unet, tuple(widths) if isinstance(widths, list) else widths,
                   cfg.get("conditioning_channels", 3), cfg.get("controlnet_conditioning_channel_order", "rgb"),
                   cfg.get("global_pool_conditions", False))  # a bool, or __post_init__ names it


class ConditioningEmbedding(nn.Module):
    """Control image (B, 3, H, W) -> (B, C0, H/8, W/8): conv + SiLU, then per width a conv and a stride-2 conv (each
    + SiLU), then a zero-initialised conv (diffusers' ControlNetConditioningEmbedding; LDM's input_hint_block)."""

    def __init__(self, out_channels: int, in_channels: int, widths: tuple[int, ...]):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(widths[:-1], widths[1:]):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(cond))
        for block in self.blocks:
            h = F.silu(block(h))
        return self.conv_out(h)


class ControlNet(nn.Module):
    """forward(sample (B, 4, h, w), timestep, context (B, L, C), cond (B, 3, h*8, w*8) in [0, 1]) -> (down residuals,
    one per UNet skip, mid residual), each times conditioning_scale (guess_mode: 0.1 .. 1 from the first skip to
    the mid block, diffusers' logspace), ready for UNet.forward."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.cfg = cfg
        u = cfg.unet
        self.conv_in = nn.Conv2d(u.in_channels, u.block_out_channels[0], 3, padding=1)
        self.time_proj, self.time_embedding, self.down_blocks, self.mid_block = encoder_modules(u)
        self.controlnet_cond_embedding = ConditioningEmbedding(u.block_out_channels[0], cfg.conditioning_channels,
                                                               cfg.conditioning_embedding_out_channels)
        skips = [u.block_out_channels[0]]  # conv_in's, then each down resnet's and downsampler's
        for i, c in enumerate(u.block_out_channels):
            skips += [c] * (u.layers_per_block + (i < len(u.block_out_channels) - 1))
        self.controlnet_down_blocks = nn.ModuleList([nn.Conv2d(c, c, 1) for c in skips])
        self.controlnet_mid_block = nn.Conv2d(u.block_out_channels[-1], u.block_out_channels[-1], 1)

    def forward(self, sample: torch.Tensor, timestep, context: torch.Tensor, cond: torch.Tensor,
                conditioning_scale: float = 1.0, guess_mode: bool = False):
        u, f = self.cfg.unet, self.cfg.downsample_factor
        if sample.dim() != 4 or sample.shape[1] != u.in_channels:
            raise ValueError(f"ControlNet.forward: sample must be (B, {u.in_channels}, h, w), "
                             f"got {tuple(sample.shape)}")
        B, _, h, w = sample.shape
        want = (B, self.cfg.conditioning_channels, h * f, w * f)
        if tuple(cond.shape) != want:
            raise ValueError(f"ControlNet.forward: the control image must be {want} (the latents' size times {f}), "
                             f"got {tuple(cond.shape)}")
        check_context(u, context, B, "ControlNet.forward")
        if self.cfg.channel_order == "bgr":
            cond = cond.flip(1)
        emb = time_embedding(self, timestep, sample)  # (B, 4*C0)
        x = self.conv_in(sample) + self.controlnet_cond_embedding(cond.to(sample.dtype))
        mid, skips = encode(self.down_blocks, self.mid_block, x, emb, context, False)
        down = [block(s) for block, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(mid)
        if guess_mode and not self.cfg.global_pool_conditions:
            scales = torch.logspace(-1, 0, len(down) + 1, device=sample.device) * conditioning_scale
            down, mid = [d * s for d, s in zip(down, scales)], mid * scales[-1]
        else:
            down, mid = [d * conditioning_scale for d in down], mid * conditioning_scale
        if self.cfg.global_pool_conditions:
            down, mid = [d.mean(dim=(2, 3), keepdim=True) for d in down], mid.mean(dim=(2, 3), keepdim=True)
        return down, mid


def load_controlnet(path, dtype: torch.dtype = torch.float32, device="cpu", allow_pickle: bool = False,
                    variant: str | None = None) -> ControlNet:
    """A diffusers ControlNetModel folder (config.json + diffusion_pytorch_model[.variant].safetensors, or a model
    folder's controlnet/ subfolder) or an original single file (nn/controlnet_ldm.py), every key and shape checked
    (CheckpointError naming the file and the keys)."""
    from .component_folder import read_component

    if Path(path).is_file():  # an original (LDM) file
        from .controlnet_ldm import read_ldm_controlnet
        return read_ldm_controlnet(Path(path), dtype, device, allow_pickle)
    return read_component(path, "controlnet", "ControlNet", "ControlNetModel", ControlNetConfig.from_diffusers,
                          ControlNet, dtype, device, allow_pickle, variant)


def saved_controlnets(root: Path) -> list[Path]:
    """The ControlNet folders of a saved diffusers ControlNet pipeline (model_index.json names a controlnet):
    controlnet/, and controlnet_1/, controlnet_2/, ... after it for a MultiControlNetModel; [] for other folders."""
    index = root / "model_index.json"
    if not root.is_dir() or not index.is_file() or '"controlnet"' not in index.read_text():
        return []
    found = []
    while (folder := root / ("controlnet" + (f"_{len(found)}" if found else ""))).is_dir():
        found.append(folder)
    return found
