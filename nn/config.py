"""Frozen configs for every component, named PRESETS, and conversion to/from the diffusers/transformers config.json.

Field names follow diffusers where it has one name for one thing. Where diffusers is ambiguous we are precise:
SD1.5's `attention_head_dim: 8` really means 8 *heads* per level (diffusers keeps the misnomer for compatibility),
so ours is `num_heads`, one entry per UNet level.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, replace

__all__ = [
    "UNetConfig", "VAEConfig", "TextConfig", "VisionConfig", "SchedulerConfig", "ModelConfig",
    "PRESETS", "get_preset",
]

PREDICTION_TYPES = ("epsilon", "v_prediction")
ACTIVATIONS = ("quick_gelu", "gelu")


def _check(cond: bool, cls: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{cls}: {msg}")


MAX_INT = 1 << 16   # the largest int a config field holds unless its class says otherwise (channels, sizes, ids)
MAX_LEVELS = 8      # entries of a per-level tuple (SD: 4)


def _check_fields(config, limits: dict[str, int] | None = None) -> None:
    """Every field of the type its annotation names (an int not a bool or a string, a finite float, a tuple of
    1..MAX_LEVELS entries) and every int in [0, limits.get(name, MAX_INT)]: generous for any real model, and small
    enough that a config.json beside third-party weights cannot make the loader build millions of layers or a
    pipeline allocate terabytes before a single weight is checked."""
    cls, limits = type(config).__name__, limits or {}

    def check(name: str, kind: str, value) -> None:
        if kind.endswith(" | None"):
            if value is not None:
                check(name, kind.removesuffix(" | None"), value)
        elif kind.startswith("tuple["):
            _check(isinstance(value, tuple) and 1 <= len(value) <= MAX_LEVELS, cls,
                   f"{name} must be a list of 1 to {MAX_LEVELS} entries, got {value!r:.80}")
            for v in value:
                check(name, kind[len("tuple["):-len(", ...]")], v)
        elif kind == "int":
            _check(type(value) is int and 0 <= value <= limits.get(name, MAX_INT), cls,
                   f"{name} = {value!r:.80} is not an integer in [0, {limits.get(name, MAX_INT)}]")
        elif kind == "float":
            _check(type(value) in (int, float) and math.isfinite(value), cls,
                   f"{name} = {value!r:.80} is not a finite number")
        elif kind in ("bool", "str"):
            _check(type(value) is {"bool": bool, "str": str}[kind], cls, f"{name} = {value!r:.80} is not a {kind}")

    for f in dataclasses.fields(config):
        check(f.name, f.type, getattr(config, f.name))


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4                  # 9 for inpainting: 4 noisy latents + 1 mask + 4 masked-image latents
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    attention_levels: tuple[bool, ...] = (True, True, True, False)  # cross-attention in down level i / mirrored up
    num_heads: tuple[int, ...] = (8, 8, 8, 8)  # per level; SD1.5: head dims 40/80/160, SD2: (5,10,20,20) -> 64
    layers_per_block: int = 2             # resnets per down level (up levels have one more)
    cross_attention_dim: int = 768        # width of the text context: 768 SD1 (ViT-L), 1024 SD2 (OpenCLIP ViT-H)
    use_linear_projection: bool = False   # proj_in/out are Linear (SD2) or 1x1 Conv (SD1)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    time_embed_dim_mult: int = 4          # time embedding width = 4 * block_out_channels[0] (DDPM)
    sample_size: int = 64                 # default latent size (image size / 8)

    def __post_init__(self):
        _check_fields(self, {"layers_per_block": 64, "num_heads": 1024, "sample_size": 1024,
                             "time_embed_dim_mult": 16})  # sample_size in latent px: 8192 px images
        n, o = len(self.block_out_channels), self.out_channels
        _check(n >= 1, "UNetConfig", "block_out_channels must not be empty")
        _check(self.in_channels in (o, 2 * o + 1), "UNetConfig", f"in_channels {self.in_channels}: not a text-to-image "
               f"({o}) or inpainting ({2 * o + 1}) UNet (InstructPix2Pix's have 8, depth-to-image's 5): not supported")
        _check(len(self.attention_levels) == n, "UNetConfig",
               f"attention_levels has {len(self.attention_levels)} entries, block_out_channels has {n}")
        _check(len(self.num_heads) == n, "UNetConfig",
               f"num_heads has {len(self.num_heads)} entries, block_out_channels has {n}")
        for c, h, attn in zip(self.block_out_channels, self.num_heads, self.attention_levels):
            _check(c % self.norm_num_groups == 0, "UNetConfig",
                   f"channels {c} not divisible by norm_num_groups {self.norm_num_groups}")
            _check(not attn or c % h == 0, "UNetConfig", f"channels {c} not divisible by num_heads {h}")
        _check(self.block_out_channels[-1] % self.num_heads[-1] == 0, "UNetConfig",
               "the mid block's channels must divide by the last level's num_heads")
        _check(self.in_channels > 0, "UNetConfig", "in_channels must be positive")

    @property
    def is_inpaint(self) -> bool:
        return self.in_channels == 9

    @property
    def head_dims(self) -> tuple[int, ...]:
        return tuple(c // h for c, h in zip(self.block_out_channels, self.num_heads))

    def to_diffusers(self) -> dict:
        """The `unet/config.json` diffusers' UNet2DConditionModel reads."""
        return {
            "_class_name": "UNet2DConditionModel",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.attention_levels],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.attention_levels)],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            # diffusers' historical name: these are head *counts* (see the module docstring)
            "attention_head_dim": list(self.num_heads) if len(set(self.num_heads)) > 1 else self.num_heads[0],
            "layers_per_block": self.layers_per_block,
            "cross_attention_dim": self.cross_attention_dim,
            "use_linear_projection": self.use_linear_projection,
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "act_fn": "silu",
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "downsample_padding": 1,
            "mid_block_scale_factor": 1,
            "center_input_sample": False,
            "sample_size": self.sample_size,
        }

    @classmethod
    def from_diffusers(cls, cfg: dict, source: str = "unet/config.json") -> "UNetConfig":
        """Read a diffusers UNet2DConditionModel config; refuse options our UNet does not implement."""
        unsupported = {  # field: the only value we implement
            "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
            "mid_block_scale_factor": 1, "center_input_sample": False, "class_embed_type": None,
            "addition_embed_type": None, "encoder_hid_dim": None, "time_embedding_type": "positional",
            "resnet_time_scale_shift": "default", "only_cross_attention": False, "dual_cross_attention": False,
            "num_class_embeds": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
            "mid_block_type": "UNetMidBlock2DCrossAttn", "transformer_layers_per_block": 1,
            "reverse_transformer_layers_per_block": None, "attention_type": "default",
            "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "timestep_post_act": None,
            "projection_class_embeddings_input_dim": None, "time_embedding_dim": None,
            "time_embedding_act_fn": None, "mid_block_only_cross_attention": None,
            "class_embeddings_concat": False, "cross_attention_norm": None,
        }
        for key, want in unsupported.items():
            got = cfg.get(key, want)
            if isinstance(got, list) and len(set(map(str, got))) == 1:
                got = got[0]
            if got != want and not (key == "only_cross_attention" and got in (False, [False])):
                hint = ("; an LCM-distilled UNet (its guidance embedding): use the base model with its LCM-LoRA "
                        "and sampler lcm instead") if key == "time_cond_proj_dim" else ""
                raise ValueError(f"{source}: {key}={got!r} is not supported (Backdrop implements {want!r}){hint}")
        down = cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
        up = cfg.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
        for t in down:
            if t not in ("CrossAttnDownBlock2D", "DownBlock2D"):
                raise ValueError(f"{source}: down_block_types entry {t!r} is not supported")
        levels = tuple(t == "CrossAttnDownBlock2D" for t in down)
        up_levels = tuple(t == "CrossAttnUpBlock2D" for t in reversed(up))
        if up_levels != levels:
            raise ValueError(f"{source}: up_block_types {up} do not mirror down_block_types {down}")
        n = len(down)
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        heads = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * n
        def one(key: str, default):  # diffusers takes a value or a list of them (per level, or (h, w)): one here
            v = default if cfg.get(key) is None else cfg[key]
            if isinstance(v, (list, tuple)) and len(set(v)) != 1:
                raise ValueError(f"{source}: {key} {v}: different values per level or side are not supported")
            return v[0] if isinstance(v, (list, tuple)) else v
        return cls(
            in_channels=cfg.get("in_channels", 4),
            out_channels=cfg.get("out_channels", 4),
            block_out_channels=tuple(cfg.get("block_out_channels", (320, 640, 1280, 1280))),
            attention_levels=levels,
            num_heads=heads,
            layers_per_block=one("layers_per_block", 2),
            cross_attention_dim=one("cross_attention_dim", 1280),
            use_linear_projection=bool(cfg.get("use_linear_projection", False)),
            norm_num_groups=cfg.get("norm_num_groups", 32),
            norm_eps=cfg.get("norm_eps", 1e-5),
            sample_size=one("sample_size", 64),
        )


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # image is downsampled 2^(levels-1) = 8x
    layers_per_block: int = 2             # resnets per encoder level (decoder levels have one more)
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215       # latents * scaling_factor ~ unit variance (LDM paper, SD1/SD2)
    sample_size: int = 512
    # Asymmetric VQGAN (Zhu et al. 2023; diffusers' AsymmetricAutoencoderKL): the decoder also sees the known
    # pixels of an inpainting task (a condition encoder over the masked image), and may be wider/deeper than the
    # encoder. None: the decoder has the encoder's widths / resnets a level (AutoencoderKL).
    mask_conditioned: bool = False
    decoder_block_out_channels: tuple[int, ...] | None = None
    decoder_layers_per_block: int | None = None

    def __post_init__(self):
        _check_fields(self, {"layers_per_block": 64, "decoder_layers_per_block": 64, "sample_size": 8192})
        for c in self.block_out_channels + (self.decoder_block_out_channels or ()):
            _check(c % self.norm_num_groups == 0, "VAEConfig",
                   f"channels {c} not divisible by norm_num_groups {self.norm_num_groups}")
        _check(self.scaling_factor > 0, "VAEConfig", "scaling_factor must be positive")
        if self.decoder_block_out_channels is not None:
            _check(len(self.decoder_block_out_channels) == len(self.block_out_channels), "VAEConfig",
                   f"decoder_block_out_channels {self.decoder_block_out_channels} must have one entry per encoder "
                   f"level ({len(self.block_out_channels)}): both sides scale by the same factor")
        _check(self.mask_conditioned or (self.decoder_block_out_channels is None
                                         and self.decoder_layers_per_block is None), "VAEConfig",
               "a decoder shaped unlike the encoder is an AsymmetricAutoencoderKL: set mask_conditioned=True")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        return self.decoder_block_out_channels or self.block_out_channels

    @property
    def decoder_layers(self) -> int:  # resnets a decoder level has, less one (diffusers' layers_per_block)
        return self.decoder_layers_per_block or self.layers_per_block

    def to_diffusers(self) -> dict:
        n = len(self.block_out_channels)
        if self.mask_conditioned:
            return {
                "_class_name": "AsymmetricAutoencoderKL",
                "in_channels": self.in_channels,
                "out_channels": self.out_channels,
                "latent_channels": self.latent_channels,
                "down_block_types": ["DownEncoderBlock2D"] * n,
                "down_block_out_channels": list(self.block_out_channels),
                "layers_per_down_block": self.layers_per_block,
                "up_block_types": ["UpDecoderBlock2D"] * n,
                "up_block_out_channels": list(self.decoder_channels),
                "layers_per_up_block": self.decoder_layers,
                "block_out_channels": list(self.decoder_channels),  # what diffusers' __init__ registers too
                "norm_num_groups": self.norm_num_groups,
                "act_fn": "silu",
                "force_upcast": False,
                "scaling_factor": self.scaling_factor,
                "sample_size": self.sample_size,
            }
        return {
            "_class_name": "AutoencoderKL",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "latent_channels": self.latent_channels,
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "layers_per_block": self.layers_per_block,
            "norm_num_groups": self.norm_num_groups,
            "act_fn": "silu",
            "scaling_factor": self.scaling_factor,
            "sample_size": self.sample_size,
        }

    @classmethod
    def from_diffusers(cls, cfg: dict, source: str = "vae/config.json") -> "VAEConfig":
        for key, want in {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
                          "mid_block_add_attention": True, "shift_factor": None}.items():
            if cfg.get(key, want) != want:
                raise ValueError(f"{source}: {key}={cfg[key]!r} is not supported (Backdrop implements {want!r})")
        if cfg.get("_class_name") == "AsymmetricAutoencoderKL":
            for key in ("down_block_types", "up_block_types"):
                want = "DownEncoderBlock2D" if key.startswith("down") else "UpDecoderBlock2D"
                if any(t != want for t in cfg.get(key, (want,))):
                    raise ValueError(f"{source}: {key}={cfg[key]!r} is not supported (Backdrop implements {want})")
            enc, dec = tuple(cfg.get("down_block_out_channels", (64,))), tuple(cfg.get("up_block_out_channels", (64,)))
            layers, dec_layers = cfg.get("layers_per_down_block", 1), cfg.get("layers_per_up_block", 1)
            return cls(
                in_channels=cfg.get("in_channels", 3),
                out_channels=cfg.get("out_channels", 3),
                latent_channels=cfg.get("latent_channels", 4),
                block_out_channels=enc,
                layers_per_block=layers,
                decoder_block_out_channels=None if dec == enc else dec,  # None: as the encoder
                decoder_layers_per_block=None if dec_layers == layers else dec_layers,
                mask_conditioned=True,
                norm_num_groups=cfg.get("norm_num_groups", 32),
                scaling_factor=cfg.get("scaling_factor", 0.18215),
                sample_size=cfg.get("sample_size", 32),
            )
        return cls(
            in_channels=cfg.get("in_channels", 3),
            out_channels=cfg.get("out_channels", 3),
            latent_channels=cfg.get("latent_channels", 4),
            block_out_channels=tuple(cfg.get("block_out_channels", (64,))),
            layers_per_block=cfg.get("layers_per_block", 1),
            norm_num_groups=cfg.get("norm_num_groups", 32),
            scaling_factor=cfg.get("scaling_factor", 0.18215),
            sample_size=cfg.get("sample_size", 512),
        )


@dataclass(frozen=True)
class TextConfig:
    """CLIP text transformer. The UNet's context is final_layer_norm(output of the last *built* layer, or of the
    layer `clip_skip` before it).

    SD1 (CLIP ViT-L/14): 12 layers, quick_gelu, pad with <|endoftext|> (49407).
    SD2 (OpenCLIP ViT-H/14): the penultimate of 24 layers then the final LayerNorm, so we build 23 layers
    (exactly as diffusers' SD2 text_encoder/config.json does); gelu; pad with 0 ("!").
    """
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768             # text_projection width (CLIP training and scoring; SD does not use it)
    pad_token_id: int = 49407
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    def __post_init__(self):
        _check_fields(self, {"num_layers": 256, "num_heads": 1024, "vocab_size": 1 << 20, "pad_token_id": 1 << 20,
                             "bos_token_id": 1 << 20, "eos_token_id": 1 << 20})
        _check(self.hidden_size % self.num_heads == 0, "TextConfig",
               f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        _check(self.hidden_act in ACTIVATIONS, "TextConfig", f"hidden_act must be one of {ACTIVATIONS}")
        _check(0 <= self.pad_token_id < self.vocab_size, "TextConfig", "pad_token_id out of the vocabulary")

    def to_transformers(self) -> dict:
        """The `text_encoder/config.json` transformers' CLIPTextModel reads."""
        return {
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            "projection_dim": self.projection_dim,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "attention_dropout": 0.0,
            "dropout": 0.0,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
        }

    @classmethod
    def from_transformers(cls, cfg: dict, source: str = "text_encoder/config.json",
                          pad_token_id: int = 49407) -> "TextConfig":
        """The config's own pad_token_id is ignored (SD1.5's says 1, which nothing uses): the pad id is the
        tokenizer's, so the loader passes the one named in tokenizer/special_tokens_map.json."""
        act = cfg.get("hidden_act", "quick_gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"{source}: hidden_act={act!r} is not supported (one of {ACTIVATIONS})")
        return cls(
            vocab_size=cfg.get("vocab_size", 49408),
            max_position_embeddings=cfg.get("max_position_embeddings", 77),
            hidden_size=cfg.get("hidden_size", 512),
            intermediate_size=cfg.get("intermediate_size", 2048),
            num_layers=cfg.get("num_hidden_layers", 12),
            num_heads=cfg.get("num_attention_heads", 8),
            hidden_act=act,
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
            projection_dim=cfg.get("projection_dim", 512),
            pad_token_id=pad_token_id,
            bos_token_id=cfg.get("bos_token_id", 49406),
            eos_token_id=cfg.get("eos_token_id", 49407),
        )


@dataclass(frozen=True)
class VisionConfig:
    """CLIP vision tower (ViT). Used to train a tiny CLIP alongside the text tower and to score images."""
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768

    def __post_init__(self):
        _check_fields(self, {"num_layers": 256, "num_heads": 1024})
        _check(self.image_size % self.patch_size == 0, "VisionConfig", "image_size must divide by patch_size")
        _check(self.hidden_size % self.num_heads == 0, "VisionConfig", "hidden_size must divide by num_heads")
        _check(self.hidden_act in ACTIVATIONS, "VisionConfig", f"hidden_act must be one of {ACTIVATIONS}")


@dataclass(frozen=True)
class SchedulerConfig:
    """The training noise schedule and inference defaults (diffusers' scheduler_config.json names)."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # SD: linspace in sqrt(beta) then squared
    steps_offset: int = 1
    timestep_spacing: str | None = None   # None: each sampler takes diffusers' default for that scheduler
    rescale_betas_zero_snr: bool = False
    clip_sample: bool = False
    set_alpha_to_one: bool | None = False  # None (a scheduler_config.json without it): diffusers' default for the
    #                                        sampler's class: DDIM true (its last step lands on x0), PNDM false

    def __post_init__(self):
        _check_fields(self, {"num_train_timesteps": 10000})
        _check(self.beta_schedule in ("scaled_linear", "linear", "squaredcos_cap_v2"), "SchedulerConfig",
               f"beta_schedule {self.beta_schedule!r} is not one of scaled_linear, linear, squaredcos_cap_v2")
        _check(self.timestep_spacing in (None, "leading", "trailing", "linspace"), "SchedulerConfig",
               f"timestep_spacing {self.timestep_spacing!r} is not one of leading, trailing, linspace")

    def to_diffusers(self, prediction_type: str = "epsilon") -> dict:
        d = {"_class_name": "PNDMScheduler", "prediction_type": prediction_type}
        d |= {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("timestep_spacing", "set_alpha_to_one"):
            if d[name] is None:
                del d[name]
        return d

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "SchedulerConfig":
        if cfg.get("trained_betas") is not None:  # diffusers' schedulers then ignore beta_schedule
            raise ValueError("scheduler_config.json lists trained_betas, which Backdrop does not take (it would "
                             "silently sample another noise schedule); its beta_schedule must describe the betas")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{"set_alpha_to_one": None} | {k: v for k, v in cfg.items() if k in names})


@dataclass(frozen=True)
class ModelConfig:
    """A whole model: its components' configs, what the UNet predicts, and the sampling defaults."""
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    prediction_type: str = "epsilon"      # "epsilon" (SD1, SD2-base) or "v_prediction" (SD2.x 768)
    image_size: int = 512                 # native resolution in pixels

    def __post_init__(self):
        _check_fields(self, {"image_size": 8192})
        _check(self.prediction_type in PREDICTION_TYPES, "ModelConfig",
               f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        _check(self.unet.cross_attention_dim == self.text.hidden_size, "ModelConfig",
               f"unet.cross_attention_dim {self.unet.cross_attention_dim} != text.hidden_size {self.text.hidden_size}")
        _check(self.unet.out_channels == self.vae.latent_channels, "ModelConfig",
               f"unet.out_channels {self.unet.out_channels} != vae.latent_channels {self.vae.latent_channels}")

    @property
    def scaling_factor(self) -> float:
        return self.vae.scaling_factor

    @property
    def family(self) -> str:
        return "sd2" if self.text.pad_token_id == 0 else "sd1"


_SD2_TEXT = TextConfig(hidden_size=1024, intermediate_size=4096, num_layers=23, num_heads=16, hidden_act="gelu",
                       projection_dim=1024, pad_token_id=0)
_SD2_UNET = UNetConfig(num_heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)

# Small enough to train on a laptop CPU: 64 px images -> 8x8 latents (VAE downsamples 8x); the tokenizer is the
# real CLIP vocabulary, so the text tower keeps its 49408-row embedding.
_TINY_TEXT = TextConfig(hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4, projection_dim=64)
_TINY_UNET = UNetConfig(block_out_channels=(32, 64, 64, 64), num_heads=(2, 4, 4, 4), layers_per_block=1,
                        cross_attention_dim=64, norm_num_groups=8, sample_size=8)
_TINY_VAE = VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8, sample_size=64)

PRESETS: dict[str, ModelConfig] = {
    "sd15": ModelConfig(),
    "sd15-inpaint": ModelConfig(unet=UNetConfig(in_channels=9)),
    "sd2-base": ModelConfig(unet=_SD2_UNET, text=_SD2_TEXT),
    "sd2-inpaint": ModelConfig(unet=replace(_SD2_UNET, in_channels=9), text=_SD2_TEXT),
    "sd21-v": ModelConfig(unet=replace(_SD2_UNET, sample_size=96), text=_SD2_TEXT,
                          prediction_type="v_prediction", image_size=768,
                          scheduler=SchedulerConfig(timestep_spacing=None)),
    "tiny": ModelConfig(unet=_TINY_UNET, vae=_TINY_VAE, text=_TINY_TEXT, image_size=64),
    "tiny-inpaint": ModelConfig(unet=replace(_TINY_UNET, in_channels=9), vae=_TINY_VAE, text=_TINY_TEXT,
                                image_size=64),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
