"""IP-Adapter edges (diffusion/image_prompt.py, nn/ip_adapter.py, nn/clip.py's hidden_state, cli.py's IP-Adapter
options) that the parity tests do not pin: which images go through the image encoder together and which rows get
them, transparency of every PIL mode, nested image lists, the file shapes read_ip_adapter refuses or infers, every
layer of VisionTransformer.hidden_state, and the command-line checks."""
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from backdrop.cli import CLIError, check_ip_adapter_options, load_ip_adapter
from backdrop.diffusion import pixels as P
from backdrop.diffusion.image_prompt import image_prompt
from backdrop.nn.checkpoint import CheckpointError

from pipeline_helpers import images
from test_ip_adapter import WEIGHTS, ip_adapter_folder
from test_ip_adapter_plus import PLUS, plus_folder, plus_state

pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


class Spy:
    """An IPAdapter's tokens() stand-in: an image's tokens are its mean colour (1 token, 3 wide), its unconditional
    tokens minus that (so that a row taken from the wrong image shows); `calls` records each batch's shape."""

    def __init__(self):
        self.calls = []

    def tokens(self, x: torch.Tensor):
        self.calls.append(tuple(x.shape))
        mean = x.mean((2, 3))[:, None, :]  # (B, 1, 3)
        return mean, -mean


def alone(picture) -> torch.Tensor:
    return Spy().tokens(P.image_to_tensor([picture]))[0]


# ------------------------------------------------------------------------------ diffusion/image_prompt.py

def test_each_distinct_image_prompt_is_encoded_once_with_the_others_of_its_size_and_reaches_its_rows():
    a, b = images(1, 32, 32, seed=1)[0], images(1, 32, 32, seed=2)[0]
    tall = images(1, 48, 32, seed=3)[0]  # as wide as a and b: grouped by both sides
    spy, links = Spy(), {"a link": 1}
    ip = image_prompt((spy, links), [a, b, a, tall])
    assert ip.lengths == {"ip_adapter_image": 4}
    tokens, uncond, got_links = ip.tokens(4, 2)  # 4 requests x 2 images each: rows i * 2 + j are request i's
    assert sorted(spy.calls) == [(1, 3, 48, 32), (2, 3, 32, 32)]  # a once (given twice), a and b in one call
    want = torch.cat([alone(p) for p in (a, a, b, b, a, a, tall, tall)])
    assert torch.equal(tokens, want) and torch.equal(uncond, -want) and got_links is links

    spy = Spy()
    tokens, uncond, _ = image_prompt((spy, links), b).tokens(3, 1)  # one image for every request
    assert spy.calls == [(1, 3, 32, 32)] and torch.equal(tokens, alone(b).expand(3, -1, -1))


@pytest.mark.parametrize("mode", ["LA", "PA", "P", "RGBa"])
def test_a_transparent_image_prompt_of_any_mode_is_seen_on_white(mode):
    """Not RGBA alone: a grey+alpha or palette image with transparent pixels shows the encoder white there, as
    transformers' CLIP image processor does."""
    rgba = Image.new("RGBA", (32, 32), (200, 10, 10, 0))  # all transparent, a red colour kept
    if mode == "P":  # a palette image whose one colour is transparent
        picture = Image.new("P", (32, 32), 0)
        picture.putpalette([200, 10, 10] * 256)
        picture.info["transparency"] = 0
    else:
        picture = rgba.convert(mode)
    tokens, _, _ = image_prompt((Spy(), {}), picture).tokens(1, 1)
    assert torch.allclose(tokens, torch.ones(1, 1, 3)), (mode, tokens)  # white: +1 in [-1, 1]


def test_nested_image_prompts_are_refused_as_lists_or_tuples_anywhere_in_the_list():
    a, b = images(2, 32, 32, seed=1)
    for nested in ([(a, b)], [a, [a, b]], [a, (b,)]):
        with pytest.raises(ValueError, match=r"ip_adapter_image: a nested list \(diffusers' several images"):
            image_prompt((Spy(), {}), nested)


# ------------------------------------------------------------------------------ nn/ip_adapter.py: files

@pytest.fixture(scope="module")
def files(models, tmp_path_factory):
    """(base folder, Plus folder) for the tiny SD1 model."""
    unet = models["sd1"].pipe.backend.model.unet
    return (ip_adapter_folder(tmp_path_factory.mktemp("edge-base"), unet),
            plus_folder(tmp_path_factory.mktemp("edge-plus"), unet))


def copy_encoder(src, root):
    """root/models/image_encoder: the image encoder of `src` (a folder made by ip_adapter_folder or plus_folder)."""
    (root / "models" / "image_encoder").mkdir(parents=True)
    for f in (src / "models" / "image_encoder").iterdir():
        (root / "models" / "image_encoder" / f.name).write_bytes(f.read_bytes())
    return root


def test_odd_ip_adapter_file_shapes_are_refused_by_what_is_wrong(models, files, tmp_path):
    pipe, (base, plus) = models["sd1"].pipe, files
    unet = pipe.backend.model.unet
    good_base, good_plus = load_file(str(base / "models" / WEIGHTS)), load_file(str(plus / "models" / PLUS))
    bad_base, bad_plus = copy_encoder(base, tmp_path / "base"), copy_encoder(plus, tmp_path / "plus")
    no_layer_2 = {k: v for k, v in good_plus.items() if not k.startswith("image_proj.layers.2.")}
    no_layers = {k: v for k, v in good_plus.items() if not k.startswith("image_proj.layers.")}
    cases = [(bad_base, WEIGHTS, {**good_base, "image_proj.proj.weight": torch.zeros(4 * 64 + 1, 24)},
              r"image_proj.proj.weight is 257x24, which does not fit this model \(N x 64 text width"),
             (bad_plus, PLUS, {**good_plus, "image_proj.latents": torch.zeros(2, 4, 64)},
              r"image_proj.latents is \(2, 4, 64\), not \(1, N, width\)"),
             (bad_plus, PLUS, {**good_plus, "image_proj.latents": torch.zeros(1, 4, 64, 1)},
              r"image_proj.latents is \(1, 4, 64, 1\), not \(1, N, width\)"),
             (bad_plus, PLUS, no_layer_2, r"a Resampler of 4 layers, 2 heads\).*missing: image_proj.layers.2.0"),
             (bad_plus, PLUS, no_layers, r"a Resampler of 1 layers.*missing: image_proj.layers.0.0"),
             (bad_plus, PLUS, {**good_plus, "image_proj.perceiver_resampler.proj_in.weight": torch.zeros(1),
                               "image_proj.proj.0.weight": torch.zeros(1)}, r"an IP-Adapter FaceID Plus file")]
    for root, name, state, message in cases:
        save_file(state, str(root / "models" / name))
        with pytest.raises(CheckpointError, match=message):
            pipe.load_ip_adapter(str(root), subfolder="models", weight_name=name)
        assert pipe._ip is None

    save_file(plus_state(unet, heads=1, depth=2, tokens=3), str(bad_plus / "models" / PLUS))  # heads read off
    pipe.load_ip_adapter(str(bad_plus), subfolder="models", weight_name=PLUS)
    try:
        cfg = pipe._ip[0].image_proj.cfg
        assert (cfg.heads, cfg.depth, cfg.num_tokens) == (1, 2, 3)
        cond, uncond = pipe._ip[0].tokens(P.image_to_tensor(images(2, 32, 32, seed=5)))
        assert cond.shape == uncond.shape == (2, 3, 64)
    finally:
        pipe.unload_ip_adapter()


# ------------------------------------------------------------------------------ nn/clip.py: hidden_state

def test_vision_hidden_state_is_transformers_hidden_states_at_every_layer(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from backdrop.nn.clip import clip_preprocess
    from backdrop.nn.ip_adapter import read_image_encoder

    cfg = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=2, projection_dim=24)
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(cfg).save_pretrained(tmp_path / "encoder")
    theirs = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "encoder").eval()
    ours = read_image_encoder(tmp_path / "encoder", torch.float32, "cpu").eval().vision_model
    pixels = clip_preprocess(P.image_to_tensor(images(2, 32, 32, seed=1)), 32)
    with torch.no_grad():
        want = theirs(pixels, output_hidden_states=True).hidden_states  # 4: the embeddings, then each layer's
        for layer in range(-4, 4):
            got = ours.hidden_state(pixels, layer=layer)
            torch.testing.assert_close(got, want[layer], rtol=1e-4, atol=1e-5, msg=f"layer {layer}")
    for layer in (-5, 4):
        with pytest.raises(ValueError, match=rf"layer={layer} is out of range for a 3-layer vision tower \(-4..3\)"):
            ours.hidden_state(pixels, layer=layer)


# ------------------------------------------------------------------------------ cli.py

def ip_args(ip_adapter=None, scale=1.0, backend="torch"):
    return SimpleNamespace(ip_adapter=ip_adapter, ip_adapter_scale=scale, backend=backend)


def test_ip_adapter_option_checks(files, tmp_path):
    weights = str(files[0] / "models" / WEIGHTS)
    for args in (ip_args(), ip_args(scale=0.0), ip_args(weights, 0.0), ip_args(weights, 2.5)):
        check_ip_adapter_options(args)  # 0 is allowed: the text alone
    for scale in (-1.0, float("inf"), float("nan")):
        for ip_adapter in (None, weights):  # the scale is checked with or without --ip-adapter
            with pytest.raises(CLIError, match=r"--ip-adapter-scale .* must be finite and >= 0"):
                check_ip_adapter_options(ip_args(ip_adapter, scale))
    with pytest.raises(CLIError, match=r"--ip-adapter .*models: no such file \(an IP-Adapter's .safetensors\)"):
        check_ip_adapter_options(ip_args(str(files[0] / "models")))  # a folder is no file


def test_load_ip_adapter_expands_the_home_folder_and_names_a_bad_file(models, files, tmp_path, monkeypatch):
    pipe, base = models["sd1"].pipe, files[0]
    monkeypatch.setenv("HOME", str(base))
    load_ip_adapter(pipe, f"~/models/{WEIGHTS}", 0.5)
    try:
        assert pipe.ip_adapter_loaded and {link.scale for link in pipe._ip[1].values()} == {0.5}
    finally:
        pipe.unload_ip_adapter()
    load_ip_adapter(pipe, None, 0.5)  # no --ip-adapter: nothing loaded
    assert not pipe.ip_adapter_loaded
    bad = copy_encoder(base, tmp_path / "bad") / "models" / WEIGHTS
    save_file({"image_proj.proj.weight": torch.zeros(256, 23)}, str(bad))  # a CheckpointError, a ValueError
    with pytest.raises(CLIError, match=rf"--ip-adapter {bad}: .*image_proj.proj.weight is 256x23"):
        load_ip_adapter(pipe, str(bad), 1.0)
    assert not pipe.ip_adapter_loaded
