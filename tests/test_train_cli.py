"""`backdrop train`: help, one-line errors with exit status 2, the whole chain clip -> vae -> cache -> pretrain ->
inpaint -> inpaint --masks product through the CLI ending in a model the Pipeline runs, a stop/resume that ends
where a straight run does, and two processes under torchrun."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from backdrop.cli import main
from backdrop.nn.checkpoint import load_model

# the CPU on any machine: the resume test wants bit-identical weights (cuDNN's weight gradients may use atomics),
# and two torchrun processes on a one-GPU machine would both need cuda:0 and cuda:1
FAST = ["--size", "32", "--batch-size", "4", "--quiet", "--log-every", "1", "--device", "cpu"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: tiny models gain little from two, and on a busy shared CPU two spin-wait (see
    test_stages.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(*args) -> int:
    return main(["train", *map(str, args)])


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(s in out for s in ("clip", "vae", "pretrain", "inpaint", "cache", "--init runs/vae/final"))
    for stage, options in {"pretrain": ("--snr-gamma", "--resume", "--data", "--gradient-checkpointing"),
                           "inpaint": ("--masks", "--caption-dropout", "--precision"),
                           "clip": ("--vision-width", "--ema-decay"),
                           "vae": ("--ssim-weight", "--warmup", "--decoder-only"),
                           "cache": ("--shard-size", "--no-images")}.items():
        with pytest.raises(SystemExit) as e:
            main(["train", stage, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert all(o in out for o in options), (stage, out)


def test_bad_data_spec_exits_2_with_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "backdrop", "train", "pretrain", "--data", "synthetic:lots",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("backdrop train: error:") and "synthetic:lots" in lines[0], p.stderr


@pytest.mark.parametrize("args, message", [
    (["vae", "--data", "/nonexistent/images"], "/nonexistent/images"),
    (["pretrain", "--data", "synthetic:4", "--init", "/nonexistent/model"], "/nonexistent/model"),
    (["pretrain", "--data", "synthetic:4", "--zero-terminal-snr"], "v-prediction"),
    (["pretrain", "--data", "synthetic:4", "--preset", "huge"], "unknown preset"),
    (["clip", "--data", "synthetic:4", "--size", "30"], "--size 30"),
    (["vae", "--data", "synthetic:4", "--decoder-only"], "--init"),
])
def test_user_errors_are_one_line(args, message, tmp_path, capsys):
    assert run(*args, "--out", tmp_path / "o", "--quiet") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_chain_through_the_cli(tmp_path):
    from backdrop import Pipeline

    d = tmp_path
    assert run("clip", "--data", "synthetic:8", "--out", d / "clip", "--steps", 2, "--vision-width", 32,
               "--vision-layers", 1, "--vision-heads", 2, *FAST) == 0
    assert run("vae", "--data", "synthetic:8", "--out", d / "vae", "--init", d / "clip/final", "--steps", 2,
               *FAST) == 0
    assert run("cache", "--data", "synthetic:8", "--out", d / "cache", "--init", d / "vae/final", "--size", 32,
               "--quiet") == 0
    assert run("vae", "--data", d / "cache", "--out", d / "x", "--steps", 1, *FAST) == 2  # a cache cannot train a VAE
    assert run("pretrain", "--data", d / "cache", "--out", d / "pre", "--init", d / "vae/final", "--steps", 2,
               "--snr-gamma", 5, "--ema-decay", 0.9, *FAST) == 0
    assert run("inpaint", "--data", d / "cache", "--out", d / "inp", "--init", d / "pre/final", "--steps", 2,
               *FAST) == 0
    assert run("inpaint", "--data", "synthetic:8", "--out", d / "prod", "--init", d / "inp/final", "--steps", 2,
               "--masks", "product", *FAST) == 0

    clip, vae, pre, prod = (load_model(d / s / "final") for s in ("clip", "vae", "pre", "prod"))
    # each stage replaced its component and kept the others
    assert torch.equal(vae.text_encoder.text_model.final_layer_norm.weight,
                       clip.text_encoder.text_model.final_layer_norm.weight)
    assert not torch.equal(vae.vae.decoder.conv_out.weight, clip.vae.decoder.conv_out.weight)
    assert vae.config.scaling_factor != clip.config.scaling_factor  # re-measured by the vae stage
    assert torch.equal(pre.vae.decoder.conv_out.weight, vae.vae.decoder.conv_out.weight)
    assert pre.config.scaling_factor == vae.config.scaling_factor
    assert prod.config.unet.in_channels == 9 and pre.config.unet.in_channels == 4
    assert (d / "prod/final/image_encoder/model.safetensors").is_file()  # carried along the chain
    assert [json.loads(x)["step"] for x in (d / "prod/log.jsonl").read_text().splitlines()] == [1, 2]
    assert run("vae", "--data", "synthetic:8", "--out", d / "dec", "--init", d / "prod/final", "--steps", 2,
               "--decoder-only", *FAST) == 0
    dec = load_model(d / "dec/final")  # a new decoder on the same latent space: the inpainting UNet still fits it
    assert not torch.equal(dec.vae.decoder.conv_out.weight, prod.vae.decoder.conv_out.weight)
    assert torch.equal(dec.vae.encoder.conv_in.weight, prod.vae.encoder.conv_in.weight)
    assert torch.equal(dec.unet.conv_in.weight, prod.unet.conv_in.weight)
    assert dec.config.scaling_factor == prod.config.scaling_factor and dec.config.unet.in_channels == 9

    pipe = Pipeline.from_pretrained(d / "prod/final", device="cpu", dtype=torch.float32)
    image = torch.rand(32, 32, 3).numpy()
    product = (torch.rand(32, 32) > 0.7).numpy()
    out = pipe.inpaint(image, product_mask=product, prompt="a mug on sand", steps=2, seed=0, progress=False,
                       output_type="np")
    assert out.images.shape == (1, 32, 32, 3)


def test_resume_through_the_cli_equals_a_straight_run(tmp_path, capsys):
    args = ["--data", "synthetic:12", "--steps", 4, "--save-every", 2, "--caption-dropout", 0.5,
            "--noise-offset", 0.05, *FAST]
    assert run("pretrain", "--out", tmp_path / "a", *args) == 0
    assert run("pretrain", "--out", tmp_path / "b", *args) == 0
    # stop after step 2: drop what the run wrote later
    shutil.rmtree(tmp_path / "b/checkpoints/step-00000004")
    shutil.rmtree(tmp_path / "b/final")
    capsys.readouterr()
    assert run("pretrain", "--out", tmp_path / "b", *args) == 2  # refuses to overwrite a run ...
    assert "--resume" in capsys.readouterr().err
    assert run("pretrain", "--out", tmp_path / "b", "--resume", tmp_path / "b", *args) == 0  # ... resumes it
    a = load_file(tmp_path / "a/final/unet/diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "b/final/unet/diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "backdrop", "train", "pretrain", "--data", "synthetic:8", "--out", str(tmp_path / "ddp"),
           "--steps", "2", *map(str, FAST)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / "ddp/args.json").read_text())["world_size"] == 2
    log = [json.loads(x) for x in (tmp_path / "ddp/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert load_model(tmp_path / "ddp/final").config.unet.in_channels == 4
