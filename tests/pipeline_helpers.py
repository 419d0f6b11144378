"""What the pipeline tests share: tiny random models in the real layouts, the diffusers pipelines that are their
oracle, and test images and masks. The fixtures `models` and `ref` (tests/conftest.py) build them once a module."""
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from backdrop.diffusion import pixels as P
from backdrop.diffusion.pipeline import Pipeline
from backdrop.nn.checkpoint import init_model, save_model
from backdrop.nn.config import PRESETS, SchedulerConfig

from scheduler_refs import diffusers_scheduler

PROMPTS = ["a red bottle on a marble table", "a cat"]
TOL = 2e-3  # max abs on [0, 1] "np" outputs: a diffusers-vs-ours float32 rounding budget, well under 1/255


@dataclass
class Tiny:
    folder: str
    pipe: Pipeline


def sd2_tiny():
    """SD2's shapes at tiny size: OpenCLIP-style text (gelu, pad "!" = 0), linear proj_in/out, v-prediction, and a
    non-default scheduler (zero terminal SNR, trailing spacing: SD2.1-style fine-tunes) that both sides must read
    from scheduler_config.json."""
    t = PRESETS["tiny"]
    return replace(t, text=replace(t.text, hidden_act="gelu", pad_token_id=0),
                   unet=replace(t.unet, use_linear_projection=True, num_heads=(1, 2, 2, 2)),
                   prediction_type="v_prediction",
                   scheduler=SchedulerConfig(timestep_spacing="trailing", rescale_betas_zero_snr=True))


def tiny_models(tmp_path_factory) -> dict[str, Tiny]:
    """SD1, SD1-inpainting and SD2-shaped tiny random models, saved in the diffusers layout and loaded."""
    out = {}
    for name, cfg in {"sd1": PRESETS["tiny"], "sd1-inpaint": PRESETS["tiny-inpaint"], "sd2": sd2_tiny()}.items():
        folder = save_model(init_model(cfg, seed=1), tmp_path_factory.mktemp(name) / "model")
        out[name] = Tiny(str(folder), Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float32))
    return out


def diffusers_ref(models: dict[str, Tiny]):
    """ref(model, kind, sampler): a diffusers pipeline over the components loaded once from our folder."""
    import diffusers

    loaded = {}

    def get(model: str, kind: str, sampler: str):
        if model not in loaded:
            cls = diffusers.StableDiffusionInpaintPipeline if model == "sd1-inpaint" else \
                diffusers.StableDiffusionPipeline
            loaded[model] = cls.from_pretrained(models[model].folder, safety_checker=None, feature_extractor=None,
                                                requires_safety_checker=False)
        parts = dict(loaded[model].components, requires_safety_checker=False)
        cls = {"txt2img": diffusers.StableDiffusionPipeline, "img2img": diffusers.StableDiffusionImg2ImgPipeline,
               "inpaint": diffusers.StableDiffusionInpaintPipeline}[kind]
        pipe = cls(**parts)
        pipe.scheduler = diffusers_scheduler(sampler, pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return get


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def images(n, h=64, w=64, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):  # smooth colour ramps plus noise: VAE latents of real-looking variety
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([yy, xx, 1 - yy], -1) * rng.uniform(100, 255, 3)
        out.append(Image.fromarray(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)))
    return out


def rect_masks(n, h=64, w=64, seed=0, soft=True):
    """'L' masks, white = repaint: a random rectangle with an anti-aliased rim (values strictly between 0, 255)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        m = np.zeros((h, w), np.uint8)
        y, x = rng.integers(4, h // 3), rng.integers(4, w // 3)
        m[y:y + h // 2, x:x + w // 2] = 255
        if soft:
            m[y - 1, x:x + w // 2] = 128
            m[y:y + h // 2, x - 1] = 77
        out.append(Image.fromarray(m))
    return out


def latents_of(pipe, imgs):
    """The scaled image latents our pipeline samples from: the VAE posterior mean times the scaling factor."""
    return pipe.backend.vae_encode(P.image_to_tensor(imgs)) * pipe.config.scaling_factor


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def u8(img) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


# ------------------------------------------------------------------------------------------------- ControlNet

CONTROL_EMBED = (8, 16, 16, 32)  # the conditioning embedding's widths: three stride-2 convs, 8x as the real ones


def edges(seed: int, h: int = 64, w: int = 64) -> Image.Image:
    """An edge-map-like control image: white lines on black."""
    rng, a = np.random.default_rng(seed), np.zeros((h, w, 3), np.uint8)
    for _ in range(4):
        a[rng.integers(0, h), :] = 255
        a[:, rng.integers(0, w)] = 255
    return Image.fromarray(a)


def controlnet_folder(unet_cfg, folder, seed: int, tune=None) -> str:
    """A diffusers ControlNetModel folder with random weights (its zero convs too) for a UNet of `unet_cfg` (its
    in_channels: the latents'); tune(model) may reweigh them first."""
    import diffusers

    from backdrop.nn.controlnet import ControlNetConfig
    from backdrop.nn.testing import randomize_

    ref = diffusers.ControlNetModel.from_config(ControlNetConfig(unet_cfg, CONTROL_EMBED).to_diffusers()).eval()
    randomize_(ref, seed)
    if tune is not None:
        with torch.no_grad():
            tune(ref)
    ref.save_pretrained(folder)
    return str(folder)


def cli_files(root) -> dict:
    """What the CLI tests run on: the tiny SD1 and SD1-inpainting model folders ("tiny", "tiny-inpaint"), a 67x45
    product photo ("product") and its product mask ("mask", white = keep), under `root` ("root")."""
    out = {name: str(save_model(init_model(name, seed=1), root / name)) for name in ("tiny", "tiny-inpaint")}
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (45, 67, 3), dtype=np.uint8)).save(root / "product.png")
    product = np.zeros((45, 67), np.uint8)
    product[10:35, 20:45] = 255  # white = the product to keep
    Image.fromarray(product).save(root / "product-mask.png")
    return out | {"root": root, "product": str(root / "product.png"), "mask": str(root / "product-mask.png")}
