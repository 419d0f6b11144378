"""CLIP: the text encoder (SD's prompt context), the vision tower, and the two joined for contrastive training.

Module attribute paths are transformers' CLIP key layout, so a diffusers `text_encoder/model.safetensors` loads with
a strict `load_state_dict` (the loader drops the legacy `position_ids` buffer key; we compute positions on the fly).
Both towers are pre-LayerNorm transformers built from the one `EncoderLayer` (Radford et al. 2021, "Learning
Transferable Visual Models From Natural Language Supervision"; upstream: openai/CLIP clip/model.py and
transformers models/clip/modeling_clip.py). Attention goes through `backdrop.kernels.attention` only.

Not supported, on purpose: padding attention masks (SD1/SD2 never pass one, so their context includes the pad
positions exactly as trained; under the causal mask the positions up to the first EOS, and so the pooled state,
never see the padding anyway) and position-embedding interpolation for other image sizes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import attention
from .config import TextConfig, VisionConfig

__all__ = [
    "EncoderLayer", "Encoder", "TextTransformer", "TextEncoder", "VisionTransformer", "VisionTower", "CLIP",
    "vision_config_from_transformers", "clip_preprocess", "CLIP_MEAN", "CLIP_STD",
]

# The per-channel statistics CLIP was trained with, for inputs in [0, 1] (openai/CLIP clip/clip.py `_transform`;
# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP paper sec. 2.5: learnable temperature initialised to 0.07
LOGIT_SCALE_MAX = 100.0               # ... and clipped so logits are never scaled by more than 100


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): the sigmoid approximation of GELU OpenAI CLIP was trained with (clip/model.py)."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}  # F.gelu default is the exact erf form (OpenCLIP ViT-H)


def _on_host(t: torch.Tensor) -> bool:
    """Values checks that read `t` cost nothing on the CPU; on CUDA they wait for the GPU (a host sync)."""
    return t.device.type == "cpu" and t.numel() > 0


def _eager() -> bool:
    """False under torch.jit tracing (legacy ONNX export) and torch.compile/torch.export (is_compiling covers
    both): checks that read tensor values (a host sync, data-dependent control flow) are skipped there."""
    return not (torch.jit.is_tracing() or torch.compiler.is_compiling())


def _normal(module: nn.Module, std: float) -> None:
    """Initialise a Linear/Conv/Embedding weight ~ N(0, std²) and zero its bias (transformers' CLIP _init_weights)."""
    nn.init.normal_(module.weight, std=std)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (transformers' CLIPAttention layout)."""

    def __init__(self, cfg: TextConfig | VisionConfig):
        super().__init__()
        c = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.out_proj = nn.Linear(c, c)
        # GPT-2 style depth scaling of the residual inputs, as in transformers' CLIP init
        in_std = c ** -0.5 * (2 * cfg.num_layers) ** -0.5
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            _normal(proj, in_std)
        _normal(self.out_proj, c ** -0.5)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        b, s, c = x.shape
        h = self.num_heads
        # (B, S, C) -> (B, S, H, D) -> (B, H, S, D)
        q, k, v = (p(x).view(b, s, h, c // h).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = attention(q, k, v, causal=causal)  # (B, H, S, D); scale D^-0.5 as in CLIP
        return self.out_proj(out.transpose(1, 2).reshape(b, s, c))  # (B, S, H, D) -> (B, S, C)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig | VisionConfig):
        super().__init__()
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        _normal(self.fc1, (2 * cfg.hidden_size) ** -0.5)
        _normal(self.fc2, cfg.hidden_size ** -0.5 * (2 * cfg.num_layers) ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LN transformer block shared by both towers: x + attn(LN1(x)), then x + mlp(LN2(x))."""

    def __init__(self, cfg: TextConfig | VisionConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: TextConfig | VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor, causal: bool, num_layers: int | None = None) -> torch.Tensor:
        """The output of the first `num_layers` layers (all of them by default). x (B, S, C) -> (B, S, C)."""
        for layer in self.layers[:num_layers]:
            x = layer(x, causal)
        return x


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        _normal(self.token_embedding, 0.02)
        _normal(self.position_embedding, 0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,): no position_ids buffer
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, L, C)


class TextTransformer(nn.Module):
    """transformers' CLIPTextTransformer (= transformers 5's CLIPTextModel): causal, final LayerNorm, EOS pooling."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        cfg = self.cfg
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be integer token ids shaped (B, L), got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens; the text encoder has "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        vocab = self.embeddings.token_embedding.num_embeddings  # cfg.vocab_size plus any textual inversion tokens
        # ids on the host only: on an accelerator the test would wait for it (a training step per batch)
        if _eager() and _on_host(input_ids) and (input_ids.min() < 0 or input_ids.max() >= vocab):
            raise ValueError(f"input_ids hold values in [{int(input_ids.min())}, {int(input_ids.max())}], "
                             f"outside the vocabulary [0, {vocab})")

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 0) -> torch.Tensor:
        """input_ids (B, L) -> final_layer_norm(output of layer -1-clip_skip)  (B, L, C).

        clip_skip follows diffusers' StableDiffusionPipeline.encode_prompt: it takes
        `hidden_states[-(clip_skip + 1)]` (hidden_states[0] is the embedding output, [i] the output of layer i)
        and applies final_layer_norm, so clip_skip=0 is the plain last_hidden_state and clip_skip=num_layers is
        the normalised embeddings.
        """
        n = self.cfg.num_layers
        if not 0 <= clip_skip <= n:
            raise ValueError(f"clip_skip={clip_skip} is out of range for a {n}-layer text encoder (0..{n})")
        self._check_ids(input_ids)
        x = self.embeddings(input_ids)  # (B, L, C)
        x = self.encoder(x, causal=True, num_layers=n - clip_skip)
        return self.final_layer_norm(x)

    def pool(self, context: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The hidden state at each row's first EOS token: context (B, L, C), input_ids (B, L) -> (B, C).

        "First", because SD1 pads with the EOS id itself. Configs with eos_token_id == 2 predate transformers
        PR #24773 and take the position of the largest token id instead (the EOT token is the last in CLIP's
        vocabulary); transformers keeps that legacy branch, and so do we, to give the same pooler_output.
        """
        eos = self.cfg.eos_token_id
        if eos == 2:
            index = input_ids.argmax(dim=-1)  # (B,)
        else:
            is_eos = input_ids == eos  # (B, L)
            if _eager() and _on_host(is_eos) and not bool(is_eos.any(dim=-1).all()):
                rows = (~is_eos.any(dim=-1)).nonzero().flatten().tolist()
                raise ValueError(f"input_ids rows {rows} contain no EOS token (eos_token_id={eos}); "
                                 "pooling reads the hidden state at the first EOS")
            index = is_eos.int().argmax(dim=-1)  # (B,): argmax returns the first maximum
        return context[torch.arange(context.shape[0], device=context.device), index]  # (B, C)


class TextEncoder(nn.Module):
    """transformers' CLIPTextModel (`text_model.*` keys, as in SD checkpoints), or CLIPTextModelWithProjection."""

    def __init__(self, cfg: TextConfig, with_projection: bool = False):
        super().__init__()
        self.cfg = cfg
        self.text_model = TextTransformer(cfg)
        if with_projection:
            self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)
            _normal(self.text_projection, cfg.hidden_size ** -0.5)

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 0) -> torch.Tensor:
        """input_ids (B, L) -> context (B, L, C): the UNet's cross-attention input (see TextTransformer.forward)."""
        return self.text_model(input_ids, clip_skip=clip_skip)

    def encode(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, L) -> (context (B, L, C), pooled (B, C)) = transformers' (last_hidden_state, pooler_output)."""
        context = self.text_model(input_ids)
        return context, self.text_model.pool(context, input_ids)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled (B, C) -> text_embeds (B, projection_dim), unnormalised."""
        if not hasattr(self, "text_projection"):
            raise ValueError("this TextEncoder was built with with_projection=False; it has no text_projection")
        return self.text_projection(pooled)

    def text_embeds(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, L) -> CLIPTextModelWithProjection's text_embeds (B, projection_dim)."""
        return self.project(self.encode(input_ids)[1])


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        c, p = cfg.hidden_size, cfg.patch_size
        self.class_embedding = nn.Parameter(torch.empty(c))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, c, kernel_size=p, stride=p, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // p) ** 2 + 1, c)  # patches + the class token
        nn.init.normal_(self.class_embedding, std=c ** -0.5)
        _normal(self.patch_embedding, 0.02)
        _normal(self.position_embedding, 0.02)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, C, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, C), N = (H/p)(W/p), row-major patches
        cls = self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype)  # (B, 1, C)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (B, N + 1, C)


class VisionTransformer(nn.Module):
    """transformers' CLIPVisionModel body: ViT with the class token pooled (pre_layrnorm is upstream's spelling)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values (B, 3, S, S), CLIP-normalised -> (last_hidden_state (B, N + 1, C), pooled (B, C))."""
        x = self.hidden_state(pixel_values)  # (B, N + 1, C)
        return x, self.post_layernorm(x[:, 0])

    def hidden_state(self, pixel_values: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """pixel_values (B, 3, S, S) -> transformers' hidden_states[layer] (B, N + 1, C): 0 is the embeddings after
        pre_layrnorm, i the output of encoder layer i, -1 the last (last_hidden_state), -2 the penultimate
        (IP-Adapter Plus' input); post_layernorm is never applied (it is the pooled state's only)."""
        cfg = self.cfg
        want = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"pixel_values must be (B, {', '.join(map(str, want))}), got "
                             f"{tuple(pixel_values.shape)}; resize with clip_preprocess(images, {cfg.image_size})")
        n = cfg.num_layers
        if not -n - 1 <= layer <= n:
            raise ValueError(f"layer={layer} is out of range for a {n}-layer vision tower ({-n - 1}..{n})")
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        return self.encoder(x, causal=False, num_layers=layer % (n + 1))


class VisionTower(nn.Module):
    """transformers' CLIPVisionModelWithProjection: pixel_values -> image_embeds (unnormalised)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = VisionTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)
        _normal(self.visual_projection, cfg.hidden_size ** -0.5)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, S, S) -> image_embeds (B, projection_dim)."""
        return self.visual_projection(self.vision_model(pixel_values)[1])


class CLIP(nn.Module):
    """transformers' CLIPModel: both towers, their projections into one space, and a learnable temperature."""

    def __init__(self, text: TextConfig, vision: VisionConfig):
        super().__init__()
        if text.projection_dim != vision.projection_dim:
            raise ValueError(f"CLIP: text.projection_dim {text.projection_dim} != vision.projection_dim "
                             f"{vision.projection_dim}; both towers project into one embedding space")
        self.text_model = TextTransformer(text)
        self.vision_model = VisionTransformer(vision)
        self.visual_projection = nn.Linear(vision.hidden_size, vision.projection_dim, bias=False)
        self.text_projection = nn.Linear(text.hidden_size, text.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        _normal(self.visual_projection, vision.hidden_size ** -0.5)
        _normal(self.text_projection, text.hidden_size ** -0.5)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, L) -> unit-norm text embeddings (B, projection_dim)."""
        pooled = self.text_model.pool(self.text_model(input_ids), input_ids)
        return F.normalize(self.text_projection(pooled), dim=-1)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, S, S), CLIP-normalised -> unit-norm image embeddings (B, projection_dim)."""
        return F.normalize(self.visual_projection(self.vision_model(pixel_values)[1]), dim=-1)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, embeddings: bool = False) -> tuple:
        """-> (logits_per_image (B_img, B_txt), logits_per_text (B_txt, B_img)): scaled cosine similarities;
        embeddings=True: (text (B, P), image (B, P), scale) instead, for a loss over embeddings gathered from
        several processes (train/stages/clip.py).

        The scale exp(logit_scale) is capped at 100 (CLIP paper sec. 2.5) here rather than by clamping the
        parameter after each step; below the cap this is exactly transformers' CLIPModel.
        """
        text, image = self.encode_text(input_ids), self.encode_image(pixel_values)
        scale = self.logit_scale.exp().clamp(max=LOGIT_SCALE_MAX)
        if embeddings:
            return text, image, scale
        logits_per_text = scale * text @ image.t()  # (B_txt, B_img)
        return logits_per_text.t(), logits_per_text

    def contrastive_loss(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE over a batch of matching (text i, image i) pairs (CLIP paper, Figure 3 pseudocode)."""
        if input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError(f"contrastive_loss needs matching pairs: {input_ids.shape[0]} texts, "
                             f"{pixel_values.shape[0]} images")
        logits_per_image, logits_per_text = self(input_ids, pixel_values)
        labels = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
        return (F.cross_entropy(logits_per_text, labels) + F.cross_entropy(logits_per_image, labels)) / 2


def vision_config_from_transformers(d: dict, source: str = "image_encoder/config.json") -> VisionConfig:
    """The VisionConfig of a transformers CLIPVisionConfig (config.json of a CLIPVisionModelWithProjection); a
    ValueError naming `source` for a missing or bad field."""
    try:
        return VisionConfig(image_size=d["image_size"], patch_size=d["patch_size"],
                            num_channels=d.get("num_channels", 3), hidden_size=d["hidden_size"],
                            intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
                            num_heads=d["num_attention_heads"], hidden_act=d.get("hidden_act", "quick_gelu"),
                            layer_norm_eps=d.get("layer_norm_eps", 1e-5), projection_dim=d["projection_dim"])
    except KeyError as e:
        raise ValueError(f"{source}: missing field {e.args[0]!r}") from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: {e}") from None


def clip_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """Images in [-1, 1] (the pipeline's and the VAE's range), (B, 3, H, W) -> CLIP pixel_values (B, 3, size, size).

    The tensor twin of OpenAI's `_transform` / transformers' CLIPImageProcessor: resize the shortest side to
    `size` (bicubic, antialiased like PIL; the long side is int(size * long / short)), center-crop size x size,
    then normalise with CLIP_MEAN / CLIP_STD. Differs from the PIL path only by PIL's uint8 rounding.
    """
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"clip_preprocess expects float images shaped (B, 3, H, W) in [-1, 1], got "
                         f"{images.dtype} {tuple(images.shape)}")
    h, w = images.shape[-2:]
    short, long = min(h, w), max(h, w)
    new_long = int(size * long / short)
    new_hw = (size, new_long) if h <= w else (new_long, size)
    x = (images.float() + 1) / 2  # [-1, 1] -> [0, 1]
    x = F.interpolate(x, size=new_hw, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
    x = x[:, :, top:top + size, left:left + size]  # (B, 3, size, size)
    mean = x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).to(images.dtype)
