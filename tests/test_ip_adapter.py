"""IP-Adapter (nn/ip_adapter.py): random weights in the published file layout (h94/IP-Adapter's models/ folder: the
adapter's .safetensors beside a transformers CLIPVisionModelWithProjection image encoder) give the images diffusers'
pipelines give after their load_ip_adapter; every bad file or call is named."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from backdrop.nn.checkpoint import CheckpointError
from backdrop.nn.ip_adapter import cross_attentions

from pipeline_helpers import PROMPTS, TOL, generators, images, max_diff, rect_masks

pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # diffusers' numpy-2 __array__ notices

WEIGHTS = "ip-adapter_sd15.safetensors"


def ip_adapter_folder(root: Path, unet, seed: int = 0) -> Path:
    """root/models/{WEIGHTS, image_encoder/}: a tiny image encoder (32 px, projection 24) and an IP-Adapter with
    random weights for `unet`, keyed as the published files are."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    g = torch.Generator().manual_seed(seed)
    cfg = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, projection_dim=24)
    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(cfg).save_pretrained(root / "models" / "image_encoder")
    cross = unet.cfg.cross_attention_dim
    state = {"image_proj.proj.weight": 0.2 * torch.randn(4 * cross, 24, generator=g),
             "image_proj.proj.bias": 0.1 * torch.randn(4 * cross, generator=g),
             "image_proj.norm.weight": 1 + 0.1 * torch.randn(cross, generator=g),
             "image_proj.norm.bias": 0.1 * torch.randn(cross, generator=g)}
    for i, (_, t2d) in enumerate(cross_attentions(unet)):
        inner = t2d.transformer_blocks[0].attn2.to_q.out_features
        for kv in ("k", "v"):
            state[f"ip_adapter.{2 * i + 1}.to_{kv}_ip.weight"] = 0.3 * torch.randn(inner, cross, generator=g)
    save_file(state, str(root / "models" / WEIGHTS))
    return root


@pytest.fixture(scope="module")
def adapters(models, tmp_path_factory):
    """{model name: IP-Adapter folder} for the tiny SD1 and SD1-inpainting models."""
    return {name: ip_adapter_folder(tmp_path_factory.mktemp(f"ip-{name}"), models[name].pipe.backend.model.unet)
            for name in ("sd1", "sd1-inpaint")}


def style_image(seed: int = 9, size=(32, 32)) -> Image.Image:
    return images(1, *size, seed=seed)[0]


def loaded(pipe, folder, scale=None, weight=WEIGHTS):
    pipe.load_ip_adapter(str(folder), subfolder="models", weight_name=weight)
    if scale is not None:
        pipe.set_ip_adapter_scale(scale)
    return pipe


def diffusers_txt2img(ref, adapters, prompt, noise, image, steps=3, scale=None):
    """diffusers' StableDiffusionPipeline (euler, guidance 7.5) on the tiny SD1 after its load_ip_adapter."""
    pipe = loaded(ref("sd1", "txt2img", "euler"), adapters["sd1"], scale)
    try:
        return pipe(prompt, num_inference_steps=steps, guidance_scale=7.5, latents=noise.clone(), height=64,
                    width=64, ip_adapter_image=image, output_type="np").images
    finally:
        pipe.unload_ip_adapter()


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_generate_with_an_image_prompt_equals_diffusers(models, ref, adapters, scale):
    pipe, noise = models["sd1"].pipe, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = diffusers_txt2img(ref, adapters, PROMPTS, noise, style_image(), steps=4, scale=scale)
    plain = pipe.generate(PROMPTS, steps=4, sampler="euler", latents=noise, output_type="np", progress=False).images
    loaded(pipe, adapters["sd1"], scale)
    try:
        ours = pipe.generate(PROMPTS, steps=4, sampler="euler", latents=noise, output_type="np", progress=False,
                             ip_adapter_image=style_image()).images
    finally:
        pipe.unload_ip_adapter()
    assert max_diff(ours, theirs) <= TOL and max_diff(ours, plain) > 10 * TOL
    again = pipe.generate(PROMPTS, steps=4, sampler="euler", latents=noise, output_type="np", progress=False).images
    assert np.array_equal(again, plain)  # unloaded: the text alone, bit-exactly


def inpaint_pair(models, ref, folder, steps: int, weight: str = WEIGHTS):
    """(ours, diffusers') 9-channel inpainting images of two requests with the IP-Adapter `weight` of `folder` and
    one image prompt, made as diffusers makes them (no dilation, no paste-back, its mask reading)."""
    from backdrop.diffusion import masks as M
    from backdrop.diffusion import pixels as P

    pipe, x0, masks, seeds = models["sd1-inpaint"].pipe, images(2, seed=4), rect_masks(2, seed=4), [7, 8]
    masked = M.masked_image(P.image_to_tensor(x0), M.to_repaint_mask(mask=masks))
    theirs_pipe = loaded(ref("sd1-inpaint", "inpaint", "dpmpp-2m"), folder, weight=weight)
    try:
        theirs = theirs_pipe(prompt=PROMPTS, image=x0, mask_image=masks, height=64, width=64,
                             num_inference_steps=steps, guidance_scale=7.5, generator=generators(seeds),
                             masked_image_latents=pipe.backend.vae_encode(masked) * pipe.config.scaling_factor,
                             ip_adapter_image=style_image(3), output_type="np").images
    finally:
        theirs_pipe.unload_ip_adapter()
    loaded(pipe, folder, weight=weight)
    try:
        ours = pipe.inpaint(x0, masks, PROMPTS, seed=seeds, steps=steps, sampler="dpmpp-2m", mask_dilate=0,
                            paste_back=False, mask_mode="diffusers", output_type="np", progress=False,
                            ip_adapter_image=style_image(3)).images
    finally:
        pipe.unload_ip_adapter()
    return ours, theirs


def test_inpaint_with_an_image_prompt_equals_diffusers(models, ref, adapters):
    ours, theirs = inpaint_pair(models, ref, adapters["sd1-inpaint"], steps=5)
    assert max_diff(ours, theirs) <= TOL
    pipe, x0, masks = models["sd1-inpaint"].pipe, images(2, seed=4), rect_masks(2, seed=4)
    loaded(pipe, adapters["sd1-inpaint"])
    try:
        kept = pipe.inpaint(x0, masks, PROMPTS, seed=[7, 8], steps=5, progress=False, ip_adapter_image=style_image(3))
    finally:
        pipe.unload_ip_adapter()
    for out, img, mask in zip(kept.images, x0, masks):  # the product's pixels are kept, image prompt or not
        keep = np.asarray(mask) == 0
        assert np.array_equal(np.asarray(out)[keep], np.asarray(img)[keep])


def test_one_image_prompt_per_request_equals_each_request_alone(models, adapters):
    """A list of image prompts is one per request, as every other argument (diffusers takes one per IP-Adapter):
    each request's images, in a batch or with k images each, are the ones it gives alone with its seeds."""
    pipe, refs = models["sd1"].pipe, [style_image(9), style_image(3)]
    run = dict(steps=3, sampler="euler-a", output_type="np", progress=False)
    loaded(pipe, adapters["sd1"])
    try:
        both = pipe.generate(PROMPTS, seed=[5, 8], num_images_per_prompt=2, ip_adapter_image=refs, **run).images
        alone = [pipe.generate(p, seed=s, num_images_per_prompt=2, ip_adapter_image=r, **run).images
                 for p, s, r in zip(PROMPTS, [5, 8], refs)]
        swapped = pipe.generate(PROMPTS, seed=[5, 8], num_images_per_prompt=2, ip_adapter_image=refs[::-1],
                                **run).images
    finally:
        pipe.unload_ip_adapter()
    assert max_diff(both, np.concatenate(alone)) <= TOL
    assert max_diff(both[:2], swapped[:2]) > 10 * TOL  # the image prompt counts, per request


def test_inpaint_takes_one_image_prompt_per_request_past_items_with_nothing_to_repaint(models, adapters):
    pipe, x0 = models["sd1-inpaint"].pipe, images(3, seed=4)
    masks = rect_masks(3, seed=4)
    masks[1] = Image.new("L", masks[1].size)  # nothing to repaint: returned as given, its image prompt unused
    refs = [style_image(9), style_image(3), style_image(5, size=(45, 70))]  # two sizes: two image encoder calls
    prompts = ["a red cube", "a cat", "a blue ball"]
    run = dict(steps=3, progress=False, output_type="np", paste_back=False)  # floats, not rounded to 8 bits
    loaded(pipe, adapters["sd1-inpaint"])
    try:
        out = pipe.inpaint(x0, masks, prompts, seed=[1, 2, 3], ip_adapter_image=refs, **run)
        alone = [pipe.inpaint(x0[i], masks[i], prompts[i], seed=i + 1, ip_adapter_image=refs[i], **run).images[0]
                 for i in (0, 2)]
    finally:
        pipe.unload_ip_adapter()
    assert out.unchanged == [1] and max_diff(out.images[[0, 2]], np.stack(alone)) <= TOL


def test_scale_zero_is_the_text_alone_and_a_resized_image_prompt_is_close_to_diffusers(models, ref, adapters):
    pipe, noise = models["sd1"].pipe, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    run = dict(steps=3, sampler="euler", latents=noise, output_type="np", progress=False)
    plain = pipe.generate("a cat", **run).images
    loaded(pipe, adapters["sd1"], scale=[0.0])
    try:
        assert np.array_equal(pipe.generate("a cat", ip_adapter_image=style_image(), **run).images, plain)
        pipe.set_ip_adapter_scale(1.0)
        wide = style_image(5, size=(45, 70))  # resized (shortest side to 32) and centre-cropped by both
        ours = pipe.generate("a cat", ip_adapter_image=wide, **run).images
    finally:
        pipe.unload_ip_adapter()
    theirs = diffusers_txt2img(ref, adapters, "a cat", noise, wide)
    assert max_diff(ours, theirs) <= 5e-3  # PIL's bicubic on uint8 vs ours on floats: the encoder sees ~1/255


def test_bad_ip_adapter_files_and_calls_are_named(models, adapters, tmp_path):
    pipe, folder = models["sd1"].pipe, adapters["sd1"]
    with pytest.raises(ValueError, match=r"ip_adapter_image= needs an IP-Adapter: load_ip_adapter"):
        pipe.generate("a cat", steps=1, progress=False, ip_adapter_image=style_image())
    with pytest.raises(ValueError, match=r"no IP-Adapter is loaded"):
        pipe.set_ip_adapter_scale(0.5)
    with pytest.raises(TypeError, match=r"generate\(\) does not take diffusers' ip_adapter_image_embeds="):
        pipe.generate("a cat", ip_adapter_image_embeds=[torch.zeros(2, 1, 24)])
    loaded(pipe, folder)
    try:
        for call, error, message in [
                (lambda: pipe.generate("a cat", steps=1, progress=False), ValueError,
                 r"an IP-Adapter is loaded: give ip_adapter_image="),
                (lambda: pipe.generate(PROMPTS, steps=1, progress=False, ip_adapter_image=[style_image()] * 3),
                 ValueError, r"ip_adapter_image has 3 values and prompt 2"),
                (lambda: pipe.generate("a cat", steps=1, progress=False, ip_adapter_image=[[style_image()] * 2]),
                 ValueError, r"ip_adapter_image: a nested list \(diffusers' several images for one IP-Adapter\)"),
                (lambda: loaded(pipe, folder), ValueError, r"an IP-Adapter is loaded already"),
                (lambda: pipe.set_ip_adapter_scale([0.5, 0.5]), ValueError, r"2 values for the 1 IP-Adapter"),
                (lambda: pipe.set_ip_adapter_scale(float("nan")), ValueError, r"ip_adapter scale must be a finite")]:
            with pytest.raises(error, match=message):
                call()
    finally:
        pipe.unload_ip_adapter()
    from safetensors.torch import load_file

    good = load_file(str(folder / "models" / WEIGHTS))
    bad = tmp_path / "bad" / "models"
    (bad / "image_encoder").mkdir(parents=True)
    for f in (folder / "models" / "image_encoder").iterdir():
        (bad / "image_encoder" / f.name).write_bytes(f.read_bytes())
    cases = [({**good, "image_proj.proj.3.weight": torch.zeros(64)}, r"an IP-Adapter Full Face file"),
             ({k: v for k, v in good.items() if k != "ip_adapter.3.to_v_ip.weight"}, r"1 missing: ip_adapter.3.to_v"),
             ({**good, "ip_adapter.1.to_k_ip.weight": torch.zeros(5, 64)}, r"ip_adapter.1.to_k_ip.weight: file "
              r"\(5, 64\) vs model \(32, 64\)"),
             ({**good, "ip_adapter.99.to_k_ip.weight": torch.zeros(1)}, r"1 unexpected: ip_adapter.99"),
             ({**good, "image_proj.proj.weight": torch.zeros(4 * 64, 23)}, r"image_proj.proj.weight is 256x23, which "
              r"does not fit this model")]
    for state, message in cases:
        save_file(state, str(bad / WEIGHTS))
        with pytest.raises(CheckpointError, match=message):
            loaded(pipe, bad.parent)
        assert pipe._ip is None
    with pytest.raises(FileNotFoundError, match=r"no such folder, nor a repo id in the local Hugging Face cache"):
        pipe.load_ip_adapter("h94/not-cached", subfolder="models", weight_name=WEIGHTS)
    with pytest.raises(FileNotFoundError, match=r"elsewhere: no such file"):
        pipe.load_ip_adapter(str(folder), subfolder="elsewhere", weight_name=WEIGHTS)
    with pytest.raises(FileNotFoundError, match=r"not an image encoder folder \(no config.json\)"):
        pipe.load_ip_adapter(str(folder), subfolder="models", weight_name=WEIGHTS, image_encoder_folder="gone")
    (bad / "ip-adapter_sd15.bin").write_bytes(b"a pickle")  # h94 ships both: only the .safetensors is read
    with pytest.raises(CheckpointError, match=r"ip-adapter_sd15.bin: a pickle file, which can run code when loaded, "
                                              r"and is not read here: use the .safetensors file published beside it"):
        pipe.load_ip_adapter(str(bad.parent), subfolder="models", weight_name="ip-adapter_sd15.bin")
    with pytest.raises(TypeError, match=r"load_ip_adapter takes one IP-Adapter: .* \(diffusers' lists of several "
                                        r"are not supported\), got str, str, list, str"):
        pipe.load_ip_adapter(str(folder), subfolder="models", weight_name=[WEIGHTS])


def test_to_moves_the_ip_adapter_with_the_model(models, adapters):
    from backdrop.diffusion.pipeline import Pipeline

    pipe = loaded(Pipeline.from_pretrained(models["sd1"].folder, device="cpu", dtype=torch.float32), adapters["sd1"])
    pipe.to(torch.bfloat16)
    assert {p.dtype for p in pipe._ip[0].parameters()} == {torch.bfloat16}
    out = pipe.generate("a cat", steps=2, progress=False, output_type="np", ip_adapter_image=style_image()).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_cli_image_prompt(models, adapters, capsys, tmp_path):
    from backdrop import __version__
    from backdrop.cli import main

    model, weights = models["sd1"], adapters["sd1"] / "models" / WEIGHTS
    style_image().save(tmp_path / "style.png")
    base = ["generate", "--model", model.folder, "--prompt", "a cat", "--seed", "5", "--steps", "3", "--quiet",
            "--out", str(tmp_path / "out"), "--overwrite"]
    assert main(base + ["--ip-adapter", str(weights), "--ip-adapter-image", str(tmp_path / "style.png"),
                        "--ip-adapter-scale", "0.5"]) == 0
    loaded(model.pipe, adapters["sd1"], 0.5)
    try:
        want = model.pipe.generate("a cat", seed=5, steps=3, progress=False, ip_adapter_image=style_image()).images[0]
    finally:
        model.pipe.unload_ip_adapter()
    with Image.open(capsys.readouterr().out.split()[0]) as im:
        assert np.array_equal(np.asarray(im), np.asarray(want))
        assert im.info["parameters"].endswith(f'IP-Adapter: "{weights}:0.5", IP-Adapter image: '
                                              f"{tmp_path / 'style.png'}, Backdrop: {__version__}")
    for args, said in [(["--ip-adapter", str(weights)], "--ip-adapter needs --ip-adapter-image"),
                       (["--ip-adapter-image", str(tmp_path / "style.png")], "--ip-adapter-image needs --ip-adapter"),
                       (["--ip-adapter", str(tmp_path / "gone.safetensors"), "--ip-adapter-image",
                         str(tmp_path / "style.png")], "gone.safetensors: no such file (an IP-Adapter's .safetensors)"),
                       (["--ip-adapter", str(weights), "--ip-adapter-image", str(tmp_path / "nope.png")],
                        "--ip-adapter-image " + str(tmp_path / "nope.png") + ": no such file"),
                       (["--ip-adapter", str(weights), "--ip-adapter-image", str(tmp_path / "style.png"),
                         "--ip-adapter-scale", "-1"], "--ip-adapter-scale -1 must be finite and >= 0")]:
        assert main(base + args) == 2
        assert said in capsys.readouterr().err


def test_per_level_scales_equal_diffusers_instantstyle(models, ref, adapters):
    """InstantStyle's dicts: the tiny UNet's levels with attention are down block_0..2 (1 layer each) and up
    block_1..3 (2 each); what the dict leaves out is 0."""
    pipe, noise = models["sd1"].pipe, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    run = dict(steps=3, sampler="euler", latents=noise, output_type="np", progress=False)
    plain = pipe.generate("a cat", **run).images
    style = {"up": {"block_1": [0.0, 1.0]}, "down": {"block_2": 0.5}, "mid": [0.3]}
    theirs = diffusers_txt2img(ref, adapters, "a cat", noise, style_image(), scale=style)
    loaded(pipe, adapters["sd1"], style)
    try:
        ours = pipe.generate("a cat", ip_adapter_image=style_image(), **run).images
        links = pipe._ip[1]
        scales = [links[t2d].scale for _, t2d in cross_attentions(pipe.backend.model.unet)]
        assert scales == [0.0, 0.0, 0.5, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.3]  # down 0-2, up 1-3 (2 each), mid
        pipe.set_ip_adapter_scale({"up": 0.0})
        assert np.array_equal(pipe.generate("a cat", ip_adapter_image=style_image(), **run).images, plain)
        for scale, message in [({"up": {"block_0": [0.0, 1.0, 0.0]}}, r"up block_0 has no attention layers in this "
                                r"UNet; its up levels with attention are block_1, block_2, block_3"),
                               ({"up": {"block_1": [1.0, 0.0, 1.0]}}, r"up block_1 has 2 attention layers, got 3"),
                               ({"mid": [1.0, 1.0]}, r"mid has one attention layer, got 2"),
                               ({"middle": 1.0}, r"unknown key 'middle'"),
                               ({"down": {"block_1": "x"}}, r"ip_adapter scale must be a finite number")]:
            with pytest.raises(ValueError, match=message):
                pipe.set_ip_adapter_scale(scale)
    finally:
        pipe.unload_ip_adapter()
    assert max_diff(ours, theirs) <= TOL and max_diff(ours, plain) > 10 * TOL


def test_a_transparent_image_prompt_is_seen_on_white_as_diffusers_sees_it(models, ref, adapters):
    """transformers' CLIPImageProcessor composites transparency onto white; dropping the alpha band instead showed
    the encoder whatever colour the transparent pixels held."""
    pipe, noise = models["sd1"].pipe, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    rgba = np.asarray(style_image()).copy()
    rgba = np.dstack([rgba, np.where(np.arange(32)[None, :] < 16, 0, 255).repeat(32, 0).astype(np.uint8)])
    cutout = Image.fromarray(rgba, "RGBA")  # the left half transparent, its colours kept
    theirs = diffusers_txt2img(ref, adapters, "a cat", noise, cutout)
    loaded(pipe, adapters["sd1"])
    try:
        ours = pipe.generate("a cat", steps=3, sampler="euler", latents=noise, output_type="np", progress=False,
                             ip_adapter_image=cutout).images
    finally:
        pipe.unload_ip_adapter()
    assert max_diff(ours, theirs) <= TOL


def test_a_call_keeps_the_ip_adapter_it_started_with(models, adapters):
    """A text-only call overlapping load_ip_adapter in another thread gives the text-only image (it read its last
    text tokens as image tokens), and the UNet called directly never splits its context."""
    import threading

    pipe, noise = models["sd1"].pipe, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    run = dict(steps=4, sampler="euler", latents=noise, output_type="np", progress=False)
    plain = pipe.generate("a cat", **run).images
    started, done = threading.Event(), threading.Event()

    def hold(i, x):
        if i == 0:
            started.set()
            assert done.wait(30)

    def load():
        assert started.wait(30)
        loaded(pipe, adapters["sd1"])
        done.set()

    other = threading.Thread(target=load)
    other.start()
    try:
        racing = pipe.generate("a cat", callback=hold, **run).images
        other.join()
        unet, x = pipe.backend.model.unet, torch.randn(1, 4, 8, 8)
        context = torch.randn(1, 77, unet.cfg.cross_attention_dim)
        with torch.no_grad():
            attached = unet(x, 500, context)
        pipe.unload_ip_adapter()
        with torch.no_grad():
            assert torch.equal(unet(x, 500, context), attached)
    finally:
        other.join()
        pipe.unload_ip_adapter()
    assert np.array_equal(racing, plain)
