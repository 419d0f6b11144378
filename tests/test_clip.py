"""CLIP text encoder, vision tower and CLIPModel: same random weights as transformers' CLIP, same outputs.

Reference weights are transformers' own init, then every parameter is nudged off it (`_perturb`) so LayerNorm
gains, biases and the temperature are not the trivial ones/zeros that would hide a miswired term.
"""
import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

from backdrop.nn.clip import CLIP, TextEncoder, TextTransformer, VisionTower, clip_preprocess
from backdrop.nn.config import PRESETS, TextConfig, VisionConfig

# SD1-shaped: OpenAI CLIP ViT-L text tower in miniature (quick_gelu, pads with EOS 49407, real vocabulary)
SD1_TINY = TextConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, projection_dim=24)
# SD2-shaped: OpenCLIP ViT-H text tower in miniature (exact gelu, pads with 0 = "!")
SD2_TINY = TextConfig(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, hidden_act="gelu",
                      projection_dim=48, pad_token_id=0)
VISION_TINY = VisionConfig(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96, num_layers=2,
                           num_heads=4, projection_dim=24)  # 16 patches + class token
TEXT_CONFIGS = {"sd1": SD1_TINY, "sd2": SD2_TINY}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def _vision_dict(cfg: VisionConfig) -> dict:
    """The transformers CLIPVisionConfig equivalent of our VisionConfig."""
    return dict(image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=cfg.num_channels,
                hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, hidden_act=cfg.hidden_act,
                layer_norm_eps=cfg.layer_norm_eps, projection_dim=cfg.projection_dim, attention_dropout=0.0)


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = 0.1 if p.dim() <= 1 else 0.02  # LayerNorm/bias/temperature get a visible offset
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def _ids(cfg: TextConfig, words: list[int], length: int = 77, seed: int = 0) -> torch.Tensor:
    """Tokenizer-shaped rows: BOS, `n` random word ids, EOS, then padding to `length`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(words), length), cfg.pad_token_id)
    for row, n in enumerate(words):
        ids[row, 0] = cfg.bos_token_id
        ids[row, 1:n + 1] = torch.randint(0, min(cfg.bos_token_id, cfg.eos_token_id), (n,), generator=g)
        ids[row, n + 1] = cfg.eos_token_id
    return ids


WORDS = [3, 20, 75]  # short, medium, and 75 words = a full 77-token row with no padding


def _hf_text(cfg: TextConfig, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return _perturb(cls(CLIPTextConfig(**cfg.to_transformers())))


def _load_text(ours: TextEncoder, ref) -> None:
    """transformers 5's CLIPTextModel drops the `text_model.` prefix SD checkpoints carry; 4.x keeps it."""
    sd = {k.removeprefix("text_model."): v for k, v in ref.state_dict().items()}
    ours.text_model.load_state_dict(sd, strict=True)


@pytest.mark.parametrize("family", list(TEXT_CONFIGS))
def test_text_encoder_matches_transformers(family):
    cfg = TEXT_CONFIGS[family]
    ref = _hf_text(cfg)
    ours = TextEncoder(cfg).eval()
    hf_keys = {k.removeprefix("text_model.") for k in ref.state_dict()}
    assert set(ours.text_model.state_dict()) == hf_keys  # no position_ids buffer, nothing extra or missing
    assert set(TextTransformer(cfg).state_dict()) == hf_keys
    _load_text(ours, ref)

    ids = _ids(cfg, WORDS)
    with torch.no_grad():
        out = ref(input_ids=ids)
        context, pooled = ours.encode(ids)
        assert rel_err(context, out.last_hidden_state) < 1e-4
        assert rel_err(pooled, out.pooler_output) < 1e-4
        assert torch.equal(ours(ids), context)
        short = ids[:, :40].clone()  # shorter rows use the first 40 positions; a truncated row still needs EOS
        short[2, -1] = cfg.eos_token_id
        assert rel_err(ours(short), ref(input_ids=short).last_hidden_state) < 1e-4


@pytest.mark.parametrize("family", list(TEXT_CONFIGS))
def test_text_projection_matches_transformers(family):
    cfg = TEXT_CONFIGS[family]
    ref = _hf_text(cfg, with_projection=True)
    ours = TextEncoder(cfg, with_projection=True).eval()
    # the exact key set of CLIPTextModelWithProjection, and without the projection, of SD's text_encoder files
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert set(TextEncoder(cfg).state_dict()) == set(ref.state_dict()) - {"text_projection.weight"}
    ours.load_state_dict(ref.state_dict(), strict=True)

    ids = _ids(cfg, WORDS, seed=1)
    with torch.no_grad():
        out = ref(input_ids=ids)
        assert rel_err(ours(ids), out.last_hidden_state) < 1e-4
        assert rel_err(ours.text_embeds(ids), out.text_embeds) < 1e-4
        assert rel_err(ours.project(ours.encode(ids)[1]), out.text_embeds) < 1e-4


def test_clip_skip_matches_diffusers_semantics():
    """diffusers' encode_prompt(clip_skip=k) = final_layer_norm(hidden_states[-(k + 1)]); [0] is the embeddings.

    (diffusers 0.42 reaches the LayerNorm as text_encoder.text_model.final_layer_norm, which transformers 5's
    CLIPTextModel no longer has, so we apply those semantics to transformers' hidden states directly.)
    """
    cfg = SD1_TINY
    ref = _hf_text(cfg)
    ours = TextEncoder(cfg).eval()
    _load_text(ours, ref)
    ids = _ids(cfg, WORDS, seed=2)
    with torch.no_grad():
        out = ref(input_ids=ids, output_hidden_states=True)
        assert len(out.hidden_states) == cfg.num_layers + 1
        final_ln = getattr(ref, "text_model", ref).final_layer_norm
        results = []
        for k in range(cfg.num_layers + 1):
            results.append(ours(ids, clip_skip=k))
            assert rel_err(results[-1], final_ln(out.hidden_states[-(k + 1)])) < 1e-4, k
        assert rel_err(results[1], results[0]) > 1e-2  # skipping a layer really changes the context
    for bad in (-1, cfg.num_layers + 1):
        with pytest.raises(ValueError, match="clip_skip"):
            ours(ids, clip_skip=bad)


def test_legacy_eos_token_id_2_pools_like_transformers():
    """eos_token_id == 2 (pre transformers PR #24773 configs) pools at the largest id, not at the first EOS."""
    cfg = TextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     pad_token_id=1, bos_token_id=0, eos_token_id=2)
    ref = _hf_text(cfg)
    ours = TextEncoder(cfg).eval()
    _load_text(ours, ref)
    ids = torch.tensor([[0, 500, 999, 7, 2, 1, 1, 1], [0, 998, 3, 2, 1, 1, 1, 1]])  # largest id != EOS position
    with torch.no_grad():
        out = ref(input_ids=ids)
        context, pooled = ours.encode(ids)
    assert rel_err(pooled, out.pooler_output) < 1e-4
    assert rel_err(pooled, context[:, [4, 3]].diagonal().t()) > 1e-2  # not the first-EOS rule


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_vision_tower_matches_transformers(act):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = dataclasses.replace(VISION_TINY, hidden_act=act)
    torch.manual_seed(0)
    ref = _perturb(CLIPVisionModelWithProjection(CLIPVisionConfig(**_vision_dict(cfg))))
    ours = VisionTower(cfg).eval()
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)

    pixels = -0.3 + torch.randn(3, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = ref(pixel_values=pixels)
        assert rel_err(ours(pixels), out.image_embeds) < 1e-4
        assert rel_err(ours.vision_model(pixels)[0], out.last_hidden_state) < 1e-4


def _hf_clip(text: TextConfig, vision: VisionConfig):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    return CLIPModel(CLIPConfig(text_config=text.to_transformers(), vision_config=_vision_dict(vision),
                                projection_dim=text.projection_dim))


def test_clip_model_logits_loss_and_gradients_match_transformers():
    ref = _perturb(_hf_clip(SD1_TINY, VISION_TINY))
    ours = CLIP(SD1_TINY, VISION_TINY).eval()
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)

    ids = _ids(SD1_TINY, [3, 9, 20, 75], seed=4)
    pixels = 0.2 + torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    out = ref(input_ids=ids, pixel_values=pixels, return_loss=True)
    logits_per_image, logits_per_text = ours(ids, pixels)
    assert rel_err(logits_per_image, out.logits_per_image) < 1e-4
    assert rel_err(logits_per_text, out.logits_per_text) < 1e-4
    assert rel_err(ours.encode_text(ids), out.text_embeds) < 1e-4
    assert rel_err(ours.encode_image(pixels), out.image_embeds) < 1e-4

    loss = ours.contrastive_loss(ids, pixels)
    assert abs(loss.item() - out.loss.item()) < 1e-5 * max(1.0, out.loss.item())
    loss.backward()
    out.loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():  # training from scratch sees the same gradients
        if name.endswith("k_proj.bias"):  # softmax ignores the shift q·b_k common to a query's logits: the true
            assert p.grad.abs().max() < 1e-6  # gradient is 0, both sides hold rounding noise
            continue
        assert rel_err(p.grad, ref_params[name].grad) < 1e-3, name

    with torch.no_grad():  # the temperature cap (CLIP paper sec. 2.5): exp(logit_scale) = 200 acts as 100
        ref.logit_scale.fill_(math.log(200.0))
        ours.logit_scale.fill_(math.log(200.0))
        assert rel_err(ours(ids, pixels)[1], ref(input_ids=ids, pixel_values=pixels).logits_per_text / 2) < 1e-4


def test_init_is_deterministic_and_follows_transformers_scales():
    text = TextConfig(vocab_size=1000, hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4,
                      projection_dim=32, pad_token_id=999, bos_token_id=998, eos_token_id=999)
    vision = dataclasses.replace(VISION_TINY, hidden_size=64, intermediate_size=256, projection_dim=32)
    torch.manual_seed(0)
    a = CLIP(text, vision).state_dict()
    torch.manual_seed(0)
    b = CLIP(text, vision).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(1)
    assert not torch.equal(CLIP(text, vision).state_dict()["text_projection.weight"], a["text_projection.weight"])

    ref = _hf_clip(text, vision).state_dict()  # transformers' own CLIP init, untouched
    for k, want in ref.items():
        got = a[k]
        if want.numel() == 1 or want.std() == 0:  # LayerNorm ones/zeros, zero biases, the temperature
            assert torch.allclose(got, want, atol=1e-4), k
        else:  # N(0, std²) weights: the sample std agrees within 4 standard errors (~sqrt(1/2n))
            ratio = (got.std() / want.std()).item()
            assert abs(ratio - 1) < 4 / math.sqrt(2 * want.numel()) + 0.01, (k, ratio)
            assert abs(got.mean().item()) < 4 * want.std().item() / math.sqrt(want.numel()), k


@pytest.mark.slow
def test_sd15_text_encoder_full_size():
    """The real SD1.5 text encoder shape (CLIP ViT-L/14: 12 layers, width 768, 49408 tokens), built on meta."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = PRESETS["sd15"].text
    torch.manual_seed(0)
    ref = CLIPTextModel(CLIPTextConfig(**cfg.to_transformers())).eval()
    with torch.device("meta"):
        ours = TextEncoder(cfg)
    sd = {k.removeprefix("text_model."): v for k, v in ref.state_dict().items()}
    ours.text_model.load_state_dict(sd, strict=True, assign=True)
    ours.eval()
    ids = _ids(cfg, [7, 75], seed=6)
    with torch.no_grad():
        out = ref(input_ids=ids)
        context, pooled = ours.encode(ids)
    assert context.shape == (2, 77, 768)
    assert rel_err(context, out.last_hidden_state) < 1e-4
    assert rel_err(pooled, out.pooler_output) < 1e-4


def test_bad_input_names_the_problem():
    enc = TextEncoder(SD1_TINY)
    ids = _ids(SD1_TINY, [3, 5])
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        enc(ids[None])
    with pytest.raises(ValueError, match="integer token ids"):
        enc(ids.float())
    with pytest.raises(ValueError, match="max_position_embeddings=77"):
        enc(torch.cat([ids, ids[:, :1]], dim=1))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        enc(ids + 1)
    no_eos = ids.clone()
    no_eos[1, 6:] = 5
    with pytest.raises(ValueError, match=r"rows \[1\] contain no EOS"):
        enc.encode(no_eos)
    with pytest.raises(ValueError, match="with_projection=False"):
        enc.project(torch.zeros(2, SD1_TINY.hidden_size))
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, 3, 32, 32\), got \(1, 3, 64, 64\)"):
        VisionTower(VISION_TINY)(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="projection_dim"):
        CLIP(SD1_TINY, dataclasses.replace(VISION_TINY, projection_dim=8))
    with pytest.raises(ValueError, match="2 texts, 3 images"):
        CLIP(SD1_TINY, VISION_TINY).contrastive_loss(ids, torch.zeros(3, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        clip_preprocess(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match=r"float images .* torch.uint8"):
        clip_preprocess(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


@pytest.mark.parametrize("size", [(200, 300), (300, 200)])  # (H, W): landscape and portrait
def test_preprocess_matches_transformers_image_processor(size):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    g = torch.Generator().manual_seed(7)  # a smooth photo-like image: upsampled coarse noise
    coarse = torch.rand(1, 3, 8, 12, generator=g)
    img = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)[0]
    pixels = (img * 255).round().to(torch.uint8)  # (3, H, W)
    pil = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    want = torch.as_tensor(np.asarray(CLIPImageProcessorPil()(images=pil, return_tensors="np")["pixel_values"]))

    got = clip_preprocess(pixels[None].float() / 127.5 - 1)  # uint8 -> [-1, 1]
    assert got.shape == want.shape == (1, 3, 224, 224)
    # left are PIL's uint8 rounding after the resize (1/255 / std ~ 0.015) and its fixed-point filter weights
    assert (got - want).abs().mean() < 0.01
    assert (got - want).abs().max() < 0.03
