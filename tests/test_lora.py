"""LoRA files merged into our weights (nn/lora.py, Pipeline.load_lora_weights, --lora) against diffusers as the oracle.

One random LoRA on a tiny SD1 model: every UNet attention projection (to_q/k/v/out.0, self and cross), a 3x3 resnet
conv (LoCon) at rank 2 and SD1's 1x1-conv proj_in, and every text-encoder projection (q/k/v/out_proj), with
per-module alphas. Written in the diffusers/PEFT layout (alphas in PEFT's metadata header, as save_lora_weights
writes them) and in kohya-ss's (alphas as tensors), both are loaded by diffusers (load_lora_weights +
fuse_lora(lora_scale=0.7)) and by us; merged weights, UNet / text-encoder outputs and generated images must agree.
The older diffusers layouts give bit-identical weights to the PEFT one; unload restores bit-exactly; bad files are
refused naming file and key with the model untouched; the CLI takes --lora PATH[:SCALE].
"""
import argparse
import json
import math
from dataclasses import dataclass, replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from backdrop.cli import lora_spec, main
from backdrop.diffusion.pipeline import Pipeline
from backdrop.nn.checkpoint import CheckpointError, init_model, load_model, save_model
from backdrop.nn.ldm_keys import folder_key
from backdrop.nn.lora import COMPONENTS, fuse_lora, unfuse_lora

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread")]  # tests/conftest.py

SCALE = 0.7
TOL = 2e-3  # max abs on [0, 1] "np" images, as tests/test_pipeline.py: float32 rounding, well under 1/255
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "down_blocks.0.resnets.0.conv1", "proj_in")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
RANK, CONV_RANK = 4, 2
UNET_ALPHA, TEXT_ALPHA = 8.0, 2.0       # PEFT lora_alpha: factors alpha / rank = 2 and 0.5
PATTERN_ALPHA = 1.0                     # PEFT alpha_pattern for one module (PATTERN_MODULE)
PATTERN_MODULE = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
CONV_MODULE = "down_blocks.0.resnets.0.conv1"


@dataclass(frozen=True)
class Module:
    component: str
    name: str             # ours (= diffusers' for the UNet; transformers' with `text_model.` for the text encoder)
    down: torch.Tensor    # (rank, in[, kh, kw])
    up: torch.Tensor      # (out, rank[, 1, 1])
    alpha: float

    @property
    def file_name(self) -> str:
        """The name diffusers' save_lora_weights writes (transformers >= 5: no `text_model.`)."""
        return self.name.removeprefix("text_model.")


def random_lora(model, seed: int = 0) -> list[Module]:
    g, out = torch.Generator().manual_seed(seed), []
    for c, targets in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS)):
        for n, w in getattr(model, c).named_parameters():
            name = n.removesuffix(".weight")
            if not n.endswith(".weight") or not name.endswith(targets):
                continue
            rank = CONV_RANK if name == CONV_MODULE else RANK
            kernel = w.shape[2:]
            down = torch.randn(rank, w.shape[1], *kernel, generator=g) / math.sqrt(w[0].numel())
            up = torch.randn(w.shape[0], rank, *(1,) * len(kernel), generator=g) * 0.5 / math.sqrt(rank)
            alpha = TEXT_ALPHA if c == "text_encoder" else PATTERN_ALPHA if name == PATTERN_MODULE else UNET_ALPHA
            out.append(Module(c, name, down, up, alpha))
    return out


def peft_file(lora: list[Module], path, text_model: bool = False):
    """diffusers/PEFT layout, alphas in the lora_adapter_metadata header as save_lora_weights writes it."""
    tensors = {}
    for m in lora:
        name = m.name if text_model else m.file_name
        tensors |= {f"{m.component}.{name}.lora_A.weight": m.down, f"{m.component}.{name}.lora_B.weight": m.up}
    unet = {"r": RANK, "lora_alpha": UNET_ALPHA, "rank_pattern": {CONV_MODULE: CONV_RANK},
            "alpha_pattern": {PATTERN_MODULE: PATTERN_ALPHA},
            "target_modules": sorted({m.name for m in lora if m.component == "unet"})}
    text = {"r": RANK, "lora_alpha": TEXT_ALPHA, "target_modules": list(TEXT_TARGETS)}
    meta = {f"{c}.{k}": v for c, cfg in (("unet", unet), ("text_encoder", text)) for k, v in cfg.items()}
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    return path


def kohya_file(lora: list[Module], path):
    """kohya-ss sd-scripts layout: lora_unet_/lora_te_ flat names, alphas as tensors."""
    tensors = {}
    for m in lora:
        flat = ("lora_unet_" if m.component == "unet" else "lora_te_") + m.name.replace(".", "_")
        tensors |= {f"{flat}.lora_down.weight": m.down, f"{flat}.lora_up.weight": m.up,
                    f"{flat}.alpha": torch.tensor(m.alpha)}
    save_file(tensors, str(path))
    return path


UNET_PROCESSOR = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}  # LoRAAttnProcessor's


def old_diffusers_file(lora: list[Module], path):
    """diffusers < 0.27: the UNet's attention processors (to_q_lora, ...; without the `unet.` prefix, as the oldest
    files), LoRACompatibleConv's .lora, the text encoder's processor names and lora_linear_layer; alphas as
    network_alphas-style .alpha tensors."""
    tensors = {}
    for m in lora:
        proj = next((p for p in UNET_PROCESSOR if m.name.endswith("." + p)), None)
        if m.component == "unet" and proj:
            keys = [f"{m.name.removesuffix('.' + proj)}.processor.{UNET_PROCESSOR[proj]}_lora.{r}.weight"
                    for r in ("down", "up")]
        elif m.component == "unet":
            keys = [f"unet.{m.name}.lora.{r}.weight" for r in ("down", "up")]
        elif m.name.endswith(("q_proj", "out_proj")):
            attn, _, proj = m.file_name.rpartition(".")
            keys = [f"text_encoder.{attn}.to_{proj.removesuffix('_proj')}_lora.{r}.weight" for r in ("down", "up")]
        else:
            keys = [f"text_encoder.{m.file_name}.lora_linear_layer.{r}.weight" for r in ("down", "up")]
        tensors |= {keys[0]: m.down, keys[1]: m.up, f"{m.component}.{m.file_name}.alpha": torch.tensor(m.alpha)}
    save_file(tensors, str(path))
    return path


def merged(model, lora: list[Module], scale: float = SCALE) -> dict[str, torch.Tensor]:
    """The formula by hand, in float32: W + scale * alpha / rank * up @ down, for every weight the LoRA touches."""
    out = {}
    for m in lora:
        w = getattr(model, m.component).get_parameter(m.name + ".weight").detach().float()
        delta = (m.up.flatten(1) @ m.down.flatten(1)).view(w.shape)
        out[f"{m.component}.{m.name}.weight"] = w + delta * (scale * (m.alpha / m.down.shape[0]))
    return out


def state(model) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.clone() for c in (*COMPONENTS, "vae") for k, v in getattr(model, c).state_dict().items()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def lora_files(root) -> SimpleNamespace:
    """A tiny model folder, a random LoRA for it and that LoRA as PEFT and kohya files, under `root`."""
    folder = save_model(init_model("tiny", seed=1), root / "model")
    lora = random_lora(load_model(folder))
    return SimpleNamespace(root=root, folder=folder, lora=lora, peft=peft_file(lora, root / "peft.safetensors"),
                           kohya=kohya_file(lora, root / "kohya.safetensors"))


@pytest.fixture(scope="module")
def files(tmp_path_factory, one_thread):
    return lora_files(tmp_path_factory.mktemp("lora"))


def test_the_lora_covers_what_it_should(files):
    """Attention in both towers, a 3x3 conv at another rank, SD1's 1x1-conv proj_in: the cases worth testing."""
    names = {(m.component, m.name) for m in files.lora}
    assert ("unet", PATTERN_MODULE) in names and ("unet", CONV_MODULE) in names
    assert any(m.down.dim() == 4 and m.down.shape[2:] == (1, 1) for m in files.lora)  # proj_in
    assert sum(m.component == "text_encoder" for m in files.lora) == 4 * 2  # 4 projections x 2 layers
    assert sum(n.endswith("to_out.0") for _, n in names) == 2 * 10  # self + cross in 10 blocks: 3 down, mid, 6 up


# --------------------------------------------------------------------------------------- parity with diffusers

@pytest.fixture(scope="module")
def diffusers_pipe(files):
    import diffusers

    def load(path):
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(files.folder, safety_checker=None,
                                                                 feature_extractor=None, requires_safety_checker=False)
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        if path is not None:
            pipe.load_lora_weights(str(path))
            pipe.fuse_lora(lora_scale=SCALE)
        return pipe
    return load


def diffusers_weights(pipe) -> dict[str, torch.Tensor]:
    """diffusers' fused weights (PEFT keeps them as `<module>.base_layer.weight`) under our names."""
    return {f"{c}.{folder_key(c, k.replace('.base_layer', ''))}": v
            for c in COMPONENTS for k, v in getattr(pipe, c).state_dict().items() if ".lora_" not in k}


@pytest.mark.filterwarnings("ignore:The following alpha_pattern keys did not match")  # diffusers' kohya bug, below
@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_merged_weights_equal_diffusers_fuse_lora(files, diffusers_pipe, fmt):
    model = load_model(files.folder)
    base, want = state(model), merged(model, files.lora)
    fused = fuse_lora(model, getattr(files, fmt), SCALE)
    assert sorted(fused.targets) == sorted(want)
    ours, theirs = state(model), diffusers_weights(diffusers_pipe(getattr(files, fmt)))
    # diffusers 0.42 loses a kohya file's per-module UNet alphas: its alpha_pattern keeps the old processor names
    # (`...attn2.processor.to_k_lora.down.weight`), which PEFT matches to nothing ("alpha_pattern keys did not match
    # any targeted module"), so that one module gets the common alpha. Ours follows sd-scripts: each its own.
    wrong = {f"unet.{PATTERN_MODULE}.weight"} if fmt == "kohya" else set()
    for weights in (ours, theirs):  # exactly the LoRA's weights changed, to the formula's values
        assert {k for k in weights if not torch.equal(weights[k], base[k])} == set(want)
        assert all((weights[k] - w).abs().max() <= 1e-6 for k, w in want.items()
                   if weights is ours or k not in wrong)


def test_outputs_and_images_equal_diffusers(files, diffusers_pipe):
    """Text encoder and UNet outputs, and a guided 3-step DDIM image, with the LoRA fused at 0.7 on both sides."""
    theirs = diffusers_pipe(files.peft)
    pipe = Pipeline.from_pretrained(files.folder, device="cpu", dtype=torch.float32)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(steps=3, sampler="ddim", latents=noise, output_type="np", progress=False)
    before = pipe.generate("a red bottle", **kwargs).images
    pipe.load_lora_weights(files.peft, lora_scale=SCALE)
    model, ids = pipe.backend.model, pipe.backend.tokenizer(["a red bottle"])
    with torch.no_grad():
        context = model.text_encoder(ids)
        assert (context - theirs.text_encoder(ids)[0]).abs().max() <= 1e-4
        x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 500])
        ctx = context.expand(2, -1, -1)
        assert (model.unet(x, t, ctx) - theirs.unet(x, t, encoder_hidden_states=ctx).sample).abs().max() <= 1e-4
    ours = pipe.generate("a red bottle", **kwargs).images
    ref = theirs("a red bottle", num_inference_steps=3, latents=noise.clone(), output_type="np", height=64,
                 width=64).images
    assert np.abs(ours - ref).max() <= TOL
    assert np.abs(ours - before).max() > 0.05  # the LoRA matters: the test has teeth


def test_a_lora_diffusers_saved_merges_as_diffusers_merges_it(files, diffusers_pipe, tmp_path):
    """The file diffusers' train_text_to_image_lora.py writes: PEFT adapters on diffusers' own attention modules
    through convert_state_dict_to_diffusers (the UNet's as .lora.down/up, the text encoder's as lora_linear_layer),
    both LoraConfigs in the metadata (here with an alpha_pattern matched by suffix, and rsLoRA), saved by
    save_lora_weights into a folder. (Conv targets are left out: diffusers 0.42 writes those as lora_A/B in the same
    file and then, judging the format by the first key alone, drops the attention LoRAs when loading it back.)"""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe, g, layers = diffusers_pipe(None), torch.Generator().manual_seed(3), {}
    configs = {"unet": LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                  alpha_pattern={"attn2.to_k": 2}),
               "text_encoder": LoraConfig(r=2, lora_alpha=4, target_modules=list(TEXT_TARGETS), use_rslora=True)}
    for c, config in configs.items():
        getattr(pipe, c).add_adapter(config)
        with torch.no_grad():  # PEFT starts lora_B at zero: make every delta count
            for n, p in getattr(pipe, c).named_parameters():
                if ".lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        layers[c] = convert_state_dict_to_diffusers(get_peft_model_state_dict(getattr(pipe, c)))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers["unet"],
                                              text_encoder_lora_layers=layers["text_encoder"],
                                              unet_lora_adapter_metadata=configs["unet"].to_dict(),
                                              text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict())
    model = load_model(files.folder)
    base = state(model)
    fuse_lora(model, tmp_path, SCALE)
    ours, theirs = state(model), diffusers_weights(diffusers_pipe(tmp_path))
    changed = {k for k in ours if not torch.equal(ours[k], base[k])}
    assert len(changed) == 4 * 2 + 4 * 20  # q/k/v/out: the text encoder's 2 layers, the UNet's 20 attentions
    assert changed == {k for k in theirs if not torch.equal(theirs[k], base[k])}
    assert all((ours[k] - theirs[k]).abs().max() <= 1e-6 for k in changed)


# ------------------------------------------------------------------------------------------- formats agree

def test_every_format_gives_the_same_weights(files, tmp_path):
    """kohya-ss, the older diffusers layouts and PEFT with transformers < 5 names: bit-identical to PEFT's."""
    base = load_model(files.folder)
    fuse_lora(base, files.peft, SCALE)
    want = state(base)
    for path in (files.kohya, old_diffusers_file(files.lora, tmp_path / "old.safetensors"),
                 peft_file(files.lora, tmp_path / "text_model.safetensors", text_model=True)):
        model = load_model(files.folder)
        fuse_lora(model, path, SCALE)
        assert_same(state(model), want)


def test_a_diffusers_lora_folder_loads_like_its_file(files, tmp_path):
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(files.peft.read_bytes())
    a, b = load_model(files.folder), load_model(files.folder)
    fuse_lora(a, tmp_path, SCALE)
    fuse_lora(b, files.peft, SCALE)
    assert_same(state(a), state(b))


# ------------------------------------------------------------------------------------------- stacking, undo

def test_stacked_loras_unload_bit_exactly(files):
    pipe = Pipeline.from_pretrained(files.folder, device="cpu", dtype=torch.float32)
    before = state(pipe.backend.model)
    pipe.load_lora_weights(files.peft, lora_scale=SCALE)
    pipe.load_lora_weights(files.kohya, lora_scale=-0.3)  # overlapping targets, a negative scale
    pipe.set_adapters(["default_0", "default_1"])  # as in diffusers, the last one loaded was the only one active
    got, want = state(pipe.backend.model), merged(load_model(files.folder), files.lora, SCALE - 0.3)
    assert all((got[k] - w).abs().max() <= 1e-5 for k, w in want.items())
    pipe.unload_lora_weights()
    assert_same(state(pipe.backend.model), before)
    pipe.unload_lora_weights()  # nothing loaded: a no-op


def test_a_lora_loaded_while_another_thread_unloads_leaves_the_base_weights(files, monkeypatch):
    """A web app loading a LoRA per request on one Pipeline from two threads: an unload running while the other
    thread's merge was half done saved and restored mixed weights, and the base model was lost for good. Weight
    changes take turns (diffusers_api.WEIGHT_CHANGES): the unload waits for the merge, then undoes it."""
    import threading

    import backdrop.diffusion.adapters as adapters

    pipe = Pipeline.from_pretrained(files.folder, device="cpu", dtype=torch.float32)
    before, merging, go = state(pipe.backend.model), threading.Event(), threading.Event()
    fuse = adapters.fuse_lora

    def slow_fuse(*args, **kwargs):  # the merge of thread A, held halfway until the test lets it go on
        merging.set()
        go.wait(10)
        return fuse(*args, **kwargs)

    monkeypatch.setattr(adapters, "fuse_lora", slow_fuse)
    a = threading.Thread(target=pipe.load_lora_weights, args=(files.peft,))
    a.start()
    assert merging.wait(10)
    b = threading.Thread(target=pipe.unload_lora_weights)
    b.start()
    b.join(0.3)
    assert b.is_alive()  # waiting for A's merge, not undoing half of it
    go.set()
    a.join(10)
    b.join(10)
    assert not pipe._adapters.merged and not pipe.get_list_adapters()
    assert_same(state(pipe.backend.model), before)


def test_bf16_merges_in_float32_and_restores_exactly(files):
    model = load_model(files.folder, dtype=torch.bfloat16)
    before, want = state(model), merged(model, files.lora)  # float32 from the bf16 weights: rounded once, at the end
    fused = fuse_lora(model, files.peft, SCALE)
    after = state(model)
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(after[k], w.bfloat16()) for k, w in want.items())
    unfuse_lora(fused)
    assert_same(state(model), before)


# ------------------------------------------------------------------------------------------------- refusals

def bad_files(files, root) -> dict:
    """name -> (path, the key or phrase the error must name). Each file also holds the whole valid LoRA."""
    good = load_file(str(files.peft))
    w = files.lora[0]
    return {
        "no module": (root / "no-module.safetensors", {
            **good, "unet.down_blocks.9.attentions.0.proj_in.lora_A.weight": w.down,
            "unet.down_blocks.9.attentions.0.proj_in.lora_B.weight": w.up}, "down_blocks.9.attentions.0.proj_in"),
        "wrong shape": (root / "shape.safetensors", {
            **good, f"unet.{w.name}.lora_B.weight": torch.zeros(w.up.shape[0] + 1, RANK)}, f"unet.{w.name}.lora_B"),
        "half a pair": (root / "half.safetensors", {
            **good, "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(RANK, 64)},
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"),
        "LoHa": (root / "loha.safetensors", {**good, "lora_unet_conv_in.hada_w1_a": torch.zeros(4, 4)},
                 "lora_unet_conv_in.hada_w1_a (not a plain LoRA"),
        "not a LoRA": (files.folder / "unet" / "diffusion_pytorch_model.safetensors", None, "not a LoRA file"),
        "an embedding": (root / "learned_embeds.safetensors", {"<cat-toy>": torch.zeros(64)},
                         "looks like a textual-inversion embedding: load it with Pipeline.load_textual_inversion"),
    }


def test_bad_files_name_file_and_key_and_change_nothing(files, tmp_path):
    model = load_model(files.folder)
    before = state(model)
    for name, (path, tensors, phrase) in bad_files(files, tmp_path).items():
        if tensors is not None:
            save_file(tensors, str(path), metadata={"format": "pt"})
        with pytest.raises(CheckpointError) as e:
            fuse_lora(model, path, SCALE)
        assert str(path) in str(e.value) and phrase in str(e.value), (name, str(e.value))
        assert_same(state(model), before)
    for path, phrase in ((tmp_path / "missing.safetensors", "no such file"), (tmp_path, "a folder without"),
                         (tmp_path / "lora.bin", "pickle")):
        if path.suffix == ".bin":
            path.write_bytes(b"\x80\x04")
        with pytest.raises(CheckpointError, match=phrase) as e:
            fuse_lora(model, path)
        assert isinstance(e.value, FileNotFoundError) == (phrase != "pickle")  # as a missing model is
    for scale in (float("nan"), True):
        with pytest.raises(ValueError, match="lora_scale"):
            fuse_lora(model, files.peft, scale)
    assert_same(state(model), before)


def test_a_lora_for_another_base_model_says_so(files, tmp_path):
    """An SD 2.x LoRA on an SD 1.x model: its text-encoder and cross-attention weights are wider (1024 vs 768); the
    refusal says it is probably made for another base model."""
    cfg = load_model(files.folder).config
    wide = replace(cfg, text=replace(cfg.text, hidden_size=2 * cfg.text.hidden_size),
                   unet=replace(cfg.unet, cross_attention_dim=2 * cfg.unet.cross_attention_dim))
    path = kohya_file(random_lora(init_model(wide, seed=1)), tmp_path / "sd2.safetensors")
    model = load_model(files.folder)
    before = state(model)
    with pytest.raises(CheckpointError, match=r"sd2.safetensors: does not match this model's UNet and text encoder "
                                              r"\(a LoRA for another base model\?.*with the wrong shape"):
        fuse_lora(model, path)
    assert_same(state(model), before)


def test_an_export_backend_is_refused(files):
    pipe = Pipeline.from_pretrained(files.folder, device="cpu", dtype=torch.float32)
    fake = SimpleNamespace(**{k: getattr(pipe.backend, k) for k in ("config", "tokenizer", "device", "encode_text",
                                                                     "unet", "vae_encode", "vae_decode")},
                           name="onnxruntime")
    with pytest.raises(ValueError, match="^a LoRA needs the torch backend, not onnxruntime: LoRAs are merged"):
        Pipeline(fake).load_lora_weights(files.peft)


# ------------------------------------------------------------------------------------------------------ CLI

def test_cli_lora_option(files, capsys, tmp_path):
    argv = ["generate", "--model", files.folder, "--steps", "2", "--quiet", "--seed", "3", "--prompt", "a lamp",
            "--out", tmp_path, "--lora", f"{files.peft}:{SCALE}", "--lora", files.kohya]
    assert main([str(a) for a in argv]) == 0
    path = capsys.readouterr().out.split()[0]
    pipe = Pipeline.from_pretrained(files.folder, device="cpu")
    pipe.load_lora_weights(files.peft, lora_scale=SCALE)
    pipe.load_lora_weights(files.kohya)
    pipe.set_adapters(["default_0", "default_1"])  # --lora stacks them
    want = pipe.generate("a lamp", steps=2, seed=3, progress=False).images[0]
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(want))


def test_lora_spec_splits_a_scale_off_paths_with_colons(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "style:2").write_bytes(b"")  # an existing file's whole name is a path, whatever it ends in
    assert [lora_spec(t) for t in ("C:/x.safetensors", "dir:with:colons/x.safetensors:0.5", "a/b:-1", "style:2",
                                   "other:2")] == [("C:/x.safetensors", 1.0), ("dir:with:colons/x.safetensors", 0.5),
                                                   ("a/b", -1.0), ("style:2", 1.0), ("other", 2.0)]
    for text, message in (("x.safetensors:", "ends in ':' without a SCALE"), ("x:inf", "must be a finite number")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            lora_spec(text)


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_cli_bad_lora_exits_2_with_one_line(files, capsys, tmp_path, command):
    if command == "serve":
        pytest.importorskip("uvicorn")
        argv = ["serve", files.folder, "--port", "0", "--lora", tmp_path / "missing.safetensors"]
    else:
        argv = ["generate", "--model", files.folder, "--prompt", "x", "--out", tmp_path, "--lora",
                tmp_path / "missing.safetensors"]
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "missing.safetensors: no such file" in err
