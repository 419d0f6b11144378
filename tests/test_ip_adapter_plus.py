"""IP-Adapter Plus (nn/ip_adapter.py's Resampler): random weights in the published layout (h94/IP-Adapter's
ip-adapter-plus_sd15.safetensors beside a transformers CLIPVisionModelWithProjection image encoder) give the tokens
and images diffusers gives after its load_ip_adapter; every bad file is named."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from backdrop.nn.checkpoint import CheckpointError
from backdrop.nn.ip_adapter import Resampler, cross_attentions

from pipeline_helpers import PROMPTS, TOL, images, max_diff

pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # diffusers' numpy-2 __array__ notices

PLUS = "ip-adapter-plus_sd15.safetensors"
ENCODER_WIDTH = 32  # the tiny image encoder's hidden size: what the Resampler's proj_in reads


def plus_state(unet, in_dim=ENCODER_WIDTH, tokens=4, width=64, heads=2, depth=4, seed=0) -> dict:
    """An IP-Adapter Plus state dict for `unet` with random weights, keyed as the published files are: a Resampler
    of `tokens` latents `width` wide, `depth` layers of `heads` 64-wide heads (diffusers reads the heads off to_q's
    rows / 64, and always builds 4 layers), over image hidden states `in_dim` wide."""
    g = torch.Generator().manual_seed(seed)
    cross, inner = unet.cfg.cross_attention_dim, heads * 64

    def rand(*shape, scale=0.2, mean=0.0):
        return mean + scale * torch.randn(*shape, generator=g)

    def norm(key, n):
        return {f"{key}.weight": rand(n, scale=0.1, mean=1.0), f"{key}.bias": rand(n, scale=0.1)}

    state = {"image_proj.latents": rand(1, tokens, width, scale=width ** -0.5),
             "image_proj.proj_in.weight": rand(width, in_dim), "image_proj.proj_in.bias": rand(width, scale=0.1),
             "image_proj.proj_out.weight": rand(cross, width), "image_proj.proj_out.bias": rand(cross, scale=0.1),
             **norm("image_proj.norm_out", cross)}
    for i in range(depth):
        at, ff = f"image_proj.layers.{i}.0", f"image_proj.layers.{i}.1"
        state |= {**norm(f"{at}.norm1", width), **norm(f"{at}.norm2", width), **norm(f"{ff}.0", width),
                  f"{at}.to_q.weight": rand(inner, width), f"{at}.to_kv.weight": rand(2 * inner, width),
                  f"{at}.to_out.weight": rand(width, inner), f"{ff}.1.weight": rand(4 * width, width, scale=0.1),
                  f"{ff}.3.weight": rand(width, 4 * width, scale=0.1)}
    for i, (_, t2d) in enumerate(cross_attentions(unet)):
        rows = t2d.transformer_blocks[0].attn2.to_q.out_features
        state |= {f"ip_adapter.{2 * i + 1}.to_{kv}_ip.weight": rand(rows, cross, scale=0.3) for kv in "kv"}
    return state


def plus_folder(root: Path, unet, seed: int = 0) -> Path:
    """root/models/{PLUS, image_encoder/}: a tiny 3-layer image encoder (32 px, hidden 32) and a Plus adapter."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=ENCODER_WIDTH, intermediate_size=64,
                           num_hidden_layers=3, num_attention_heads=2, projection_dim=24)
    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(cfg).save_pretrained(root / "models" / "image_encoder")
    save_file(plus_state(unet, seed=seed), str(root / "models" / PLUS))
    return root


@pytest.fixture(scope="module")
def adapters(models, tmp_path_factory):
    """{model name: IP-Adapter Plus folder} for the tiny SD1 and SD1-inpainting models."""
    return {name: plus_folder(tmp_path_factory.mktemp(f"plus-{name}"), models[name].pipe.backend.model.unet)
            for name in ("sd1", "sd1-inpaint")}


def style_image(seed: int = 9):
    return images(1, 32, 32, seed=seed)[0]


def loaded(pipe, folder, scale=None):
    pipe.load_ip_adapter(str(folder), subfolder="models", weight_name=PLUS)
    if scale is not None:
        pipe.set_ip_adapter_scale(scale)
    return pipe


def test_generate_with_a_plus_image_prompt_equals_diffusers(models, ref, adapters):
    pipe, noise = models["sd1"].pipe, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    run = dict(num_inference_steps=4, guidance_scale=7.5, height=64, width=64, output_type="np")
    theirs_pipe = loaded(ref("sd1", "txt2img", "euler"), adapters["sd1"], 0.7)
    try:
        theirs = theirs_pipe(PROMPTS, latents=noise.clone(), ip_adapter_image=style_image(), **run).images
    finally:
        theirs_pipe.unload_ip_adapter()
    ours_run = dict(steps=4, sampler="euler", latents=noise, output_type="np", progress=False)
    plain = pipe.generate(PROMPTS, **ours_run).images
    loaded(pipe, adapters["sd1"], 0.7)
    try:
        ours = pipe.generate(PROMPTS, ip_adapter_image=style_image(), **ours_run).images
    finally:
        pipe.unload_ip_adapter()
    assert max_diff(ours, theirs) <= TOL and max_diff(ours, plain) > 10 * TOL


def test_inpaint_with_a_plus_image_prompt_equals_diffusers(models, ref, adapters):
    from test_ip_adapter import inpaint_pair

    ours, theirs = inpaint_pair(models, ref, adapters["sd1-inpaint"], steps=4, weight=PLUS)
    assert max_diff(ours, theirs) <= TOL


def test_resampler_tokens_equal_diffusers_and_each_row_is_its_image_alone(models, ref, adapters):
    """The tokens and the unconditional tokens (of all-zero pixel_values, as diffusers' encode_image) vs
    transformers' hidden_states[-2] through diffusers' IPAdapterPlusImageProjection on the converted weights."""
    from transformers import CLIPVisionModelWithProjection

    from backdrop.diffusion import pixels as P
    from backdrop.nn.clip import clip_preprocess

    pipe, folder = models["sd1"].pipe, adapters["sd1"]
    loaded(pipe, folder)
    try:
        adapter = pipe._ip[0]
        two = P.image_to_tensor([style_image(9), style_image(3)])  # (2, 3, 32, 32) in [-1, 1]
        cond, uncond = adapter.tokens(two)
        alone = [adapter.tokens(two[i:i + 1]) for i in range(2)]
    finally:
        pipe.unload_ip_adapter()
    assert isinstance(adapter.image_proj, Resampler) and adapter.image_proj.num_tokens == 4
    assert cond.shape == uncond.shape == (2, 4, 64) and cond.dtype == uncond.dtype == torch.float32
    for i, (c, u) in enumerate(alone):
        torch.testing.assert_close(cond[i:i + 1], c, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(uncond[i:i + 1], u, rtol=1e-4, atol=1e-5)
    assert (cond[0] - cond[1]).abs().max() > 1e-2  # two images, two sets of tokens

    encoder = CLIPVisionModelWithProjection.from_pretrained(folder / "models" / "image_encoder").eval()
    state = {k.removeprefix("image_proj."): v for k, v in load_file(str(folder / "models" / PLUS)).items()
             if k.startswith("image_proj.")}
    theirs_proj = ref("sd1", "txt2img", "euler").unet._convert_ip_adapter_image_proj_to_diffusers(
        state, low_cpu_mem_usage=False).eval()
    with torch.no_grad():
        pixels = clip_preprocess(two, 32)
        want = [theirs_proj(encoder(px, output_hidden_states=True).hidden_states[-2])
                for px in (pixels, torch.zeros_like(pixels))]
    for ours, theirs in zip((cond, uncond), want):
        assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-4


def test_bad_plus_files_are_named(models, adapters, tmp_path):
    pipe, folder = models["sd1"].pipe, adapters["sd1"]
    unet = pipe.backend.model.unet
    good = load_file(str(folder / "models" / PLUS))
    bad = tmp_path / "bad" / "models"
    (bad / "image_encoder").mkdir(parents=True)
    for f in (folder / "models" / "image_encoder").iterdir():
        (bad / "image_encoder" / f.name).write_bytes(f.read_bytes())
    full_face = {"image_proj.proj.0.weight": torch.zeros(8, 24), "image_proj.proj.3.weight": torch.zeros(64)}
    cases = [(plus_state(unet, in_dim=48), r"image_proj.proj_in.weight is \(64, 48\), which does not fit this image "
              r"encoder: IP-Adapter Plus reads its hidden states, 32 wide, so \(D, 32\) was expected"),
             ({k: v for k, v in good.items() if k != "image_proj.layers.1.0.to_kv.weight"},
              r"does not match an IP-Adapter Plus \(a Resampler of 4 layers, 2 heads\) for this UNet \(10 "
              r"cross-attentions\): 1 missing: image_proj.layers.1.0.to_kv.weight"),
             ({**good, "image_proj.layers.2.1.1.weight": torch.zeros(128, 64)}, r"1 with the wrong shape: "
              r"image_proj.layers.2.1.1.weight: file \(128, 64\) vs model \(256, 64\)"),
             ({**good, "image_proj.layers.4.0.to_q.weight": torch.zeros(128, 64)}, r"a Resampler of 5 layers, 2 "
              r"heads.*missing: image_proj.layers.4.0.norm1.weight"),
             ({**good, "image_proj.proj_out.weight": torch.zeros(768, 64)}, r"image_proj.proj_out.weight: file "
              r"\(768, 64\) vs model \(64, 64\)"),  # for another UNet's cross-attention width
             ({**good, "image_proj.proj.weight": torch.zeros(256, 24)}, r"1 unexpected: image_proj.proj.weight"),
             ({**good, "image_proj.latents": torch.zeros(4, 64)}, r"image_proj.latents is \(4, 64\), not \(1, N, "
              r"width\)"),
             ({**good, **full_face}, r"an IP-Adapter Full Face file: only the base IP-Adapter \(ip-adapter_sd15 and "
              r"its _light version\) and IP-Adapter Plus \(ip-adapter-plus_sd15, ip-adapter-plus-face_sd15\) are "
              r"supported"),
             ({**good, "image_proj.perceiver_resampler.proj_in.weight": torch.zeros(1)}, r"an IP-Adapter FaceID Plus "
              r"file: only the base")]
    for state, message in cases:
        save_file(state, str(bad / PLUS))
        with pytest.raises(CheckpointError, match=message) as raised:
            loaded(pipe, bad.parent)
        assert str(bad / PLUS) in str(raised.value) and pipe._ip is None
