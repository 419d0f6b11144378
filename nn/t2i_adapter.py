"""T2I-Adapter (Mou et al. 2023, arXiv:2302.08453): a small convolutional network that reads a control image (edges,
depth, sketch, pose, ...) once per image and steers the frozen UNet through one feature map per UNet down level:

    full_adapter:  x (B, C_in, H, W) in [0, 1] -> PixelUnshuffle(f) (B, C_in*f*f, H/f, W/f) -> conv_in
                   -> body.0 .. body.n-1 (AvgPool 2x (ceil) from body.1 on, 1x1 in_conv where the width changes,
                   residual 3x3/1x1 conv pairs) -> n feature maps (B, channels[i], H/f/2^i, W/f/2^i)
    light_adapter: the same without conv_in; each block narrows to a quarter of its width around 3x3/3x3 residual
                   pairs (in_conv, resnets, out_conv), and one more halving block repeats the last width: n + 1 maps

Unlike a ControlNet the adapter sees neither the latents nor the timestep, so its features are computed once and
reused at every step. They go to UNet.forward's down_intrablock_additional_residuals (diffusers' name), times the
adapter's conditioning scale. Module paths are diffusers' T2IAdapter's (`adapter.conv_in`, `adapter.body.0.resnets.0
.block1`, ...), so a diffusers T2IAdapter folder (config.json + diffusion_pytorch_model.safetensors, e.g.
TencentARC/t2iadapter_canny_sd15v2) loads with a strict key check.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import _check, _check_fields
from .ldm_keys import CheckpointError

__all__ = ["T2IAdapter", "T2IAdapterConfig", "load_t2i_adapter"]

ADAPTER_TYPES = ("full_adapter", "light_adapter")


@dataclass(frozen=True)
class T2IAdapterConfig:
    """diffusers' T2IAdapter config: control image channels (3, or 1 for canny / sketch), the width of each block,
    residual pairs a block, the PixelUnshuffle factor (8: the VAE's, so feature 0 has the latents' size)."""
    in_channels: int = 3
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    downscale_factor: int = 8
    adapter_type: str = "full_adapter"

    def __post_init__(self):
        _check_fields(self, {"in_channels": 16, "num_res_blocks": 64, "downscale_factor": 64})
        name = "T2IAdapterConfig"
        _check(self.adapter_type != "full_adapter_xl", name,
               "adapter_type 'full_adapter_xl' is an SDXL T2I-Adapter: not supported (Backdrop runs SD 1.x/2.x)")
        _check(self.adapter_type in ADAPTER_TYPES, name,
               f"adapter_type {self.adapter_type!r} is not supported: 'full_adapter' or 'light_adapter'")
        _check(self.in_channels >= 1 and self.downscale_factor >= 1, name,
               "in_channels and downscale_factor must be positive")
        least = 4 if self.adapter_type == "light_adapter" else 1  # a light block narrows to a quarter of its width
        _check(min(self.channels) >= least, name, f"channels {self.channels}: each must be at least {least}")

    @property
    def feature_channels(self) -> tuple[int, ...]:
        """The channels of each feature map forward returns (the light adapter repeats its last width once)."""
        return self.channels + (self.channels[-1],) * (self.adapter_type == "light_adapter")

    @classmethod
    def from_diffusers(cls, cfg: dict, source: str = "adapter/config.json") -> "T2IAdapterConfig":
        """Read a diffusers T2IAdapter config; refuse what we do not implement, naming the file and the field."""
        name = cfg.get("_class_name", "T2IAdapter")
        if name == "MultiAdapter":
            raise ValueError(f"{source}: _class_name 'MultiAdapter': give each adapter's own T2IAdapter folder "
                             "(adapter/, adapter_1/, ...) instead")
        if name != "T2IAdapter":
            raise ValueError(f"{source}: _class_name {name!r}: not a T2IAdapter")
        channels = cfg.get("channels", (320, 640, 1280, 1280))
        try:
            return cls(cfg.get("in_channels", 3), tuple(channels) if isinstance(channels, list) else channels,
                       cfg.get("num_res_blocks", 2), cfg.get("downscale_factor", 8),
                       cfg.get("adapter_type", "full_adapter"))
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None


class AdapterResnetBlock(nn.Module):
    """x + block2(relu(block1(x))): block1 a 3x3 conv, block2 a 1x1 (full adapter) or 3x3 (light adapter) conv."""

    def __init__(self, channels: int, kernel2: int):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.block2 = nn.Conv2d(channels, channels, kernel2, padding=kernel2 // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block2(F.relu(self.block1(x)))


class AdapterBlock(nn.Module):
    """One level of the full adapter: optional 2x average pool (ceil: odd sides round up), a 1x1 in_conv where the
    width changes, then num_res_blocks residual pairs."""

    def __init__(self, c_in: int, c_out: int, num_res_blocks: int, down: bool):
        super().__init__()
        self.down = down
        self.in_conv = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None
        self.resnets = nn.Sequential(*[AdapterResnetBlock(c_out, 1) for _ in range(num_res_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            x = F.avg_pool2d(x, 2, ceil_mode=True)  # (B, C, ceil(H/2), ceil(W/2))
        if self.in_conv is not None:
            x = self.in_conv(x)
        return self.resnets(x)


class LightAdapterBlock(nn.Module):
    """One level of the light adapter: optional 2x average pool (ceil), a 1x1 in_conv to a quarter of c_out,
    num_res_blocks 3x3/3x3 residual pairs at that width, and a 1x1 out_conv to c_out."""

    def __init__(self, c_in: int, c_out: int, num_res_blocks: int, down: bool):
        super().__init__()
        self.down = down
        self.in_conv = nn.Conv2d(c_in, c_out // 4, 1)
        self.resnets = nn.Sequential(*[AdapterResnetBlock(c_out // 4, 3) for _ in range(num_res_blocks)])
        self.out_conv = nn.Conv2d(c_out // 4, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            x = F.avg_pool2d(x, 2, ceil_mode=True)  # (B, C, ceil(H/2), ceil(W/2))
        return self.out_conv(self.resnets(self.in_conv(x)))


class Adapter(nn.Module):
    """The `adapter` module of diffusers' T2IAdapter (its FullAdapter or LightAdapter): conv_in (full only), body."""

    def __init__(self, cfg: T2IAdapterConfig):
        super().__init__()
        c, n, f = cfg.channels, cfg.num_res_blocks, cfg.downscale_factor
        c_in = cfg.in_channels * f * f  # after PixelUnshuffle
        if cfg.adapter_type == "full_adapter":
            self.conv_in = nn.Conv2d(c_in, c[0], 3, padding=1)
            self.body = nn.ModuleList([AdapterBlock(c[max(i - 1, 0)], c[i], n, down=i > 0) for i in range(len(c))])
        else:
            self.conv_in = None
            widths = (c_in,) + c + (c[-1],)  # block i: widths[i] -> widths[i + 1]
            self.body = nn.ModuleList([LightAdapterBlock(widths[i], widths[i + 1], n, down=i > 0)
                                       for i in range(len(c) + 1)])


class T2IAdapter(nn.Module):
    """forward(x (B, C_in, H, W) in [0, 1]) -> [(B, feature_channels[i], H/f/2^i, W/f/2^i)] (f: downscale_factor;
    halved sides round up), one map per UNet down level from the first, for UNet.forward's
    down_intrablock_additional_residuals."""

    def __init__(self, cfg: T2IAdapterConfig):
        super().__init__()
        self.cfg = cfg
        self.adapter = Adapter(cfg)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c, f = self.cfg.in_channels, self.cfg.downscale_factor
        if x.dim() != 4 or x.shape[1] != c:
            raise ValueError(f"T2IAdapter.forward: the control image must be (B, {c}, H, W), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if H % f or W % f:
            raise ValueError(f"T2IAdapter.forward: the control image's size {H}x{W} (HxW) is not a multiple of the "
                             f"adapter's downscale_factor {f}")
        h = F.pixel_unshuffle(x, f)  # (B, C_in*f*f, H/f, W/f)
        if self.adapter.conv_in is not None:
            h = self.adapter.conv_in(h)  # (B, channels[0], H/f, W/f)
        features = []
        for block in self.adapter.body:
            h = block(h)  # (B, feature_channels[i], H/f/2^i, W/f/2^i)
            features.append(h)
        return features


def load_t2i_adapter(path, dtype: torch.dtype = torch.float32, device="cpu", variant: str | None = None) -> T2IAdapter:
    """A diffusers T2IAdapter folder (config.json + diffusion_pytorch_model[.variant].safetensors, or a model folder's
    adapter/ subfolder), every key and shape checked (CheckpointError naming the file and the keys). Pickle weights
    are never read."""
    from .component_folder import read_component

    folder = Path(path)
    if folder.is_file():
        raise CheckpointError(f"{folder}: a single file; a T2I-Adapter is read from a diffusers T2IAdapter folder "
                              "(config.json + diffusion_pytorch_model.safetensors, e.g. "
                              "TencentARC/t2iadapter_canny_sd15v2), not from the original .pth files")
    return read_component(folder, "adapter", "T2I-Adapter", "T2IAdapter", T2IAdapterConfig.from_diffusers,
                          T2IAdapter, dtype, device, variant=variant, pickle_option=False)
