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
from safetensors import safe_open
from safetensors.torch import load_file

from backdrop.cli import main
from backdrop.nn.checkpoint import load_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

# the CPU on any machine: the resume test wants bit-identical weights (cuDNN's weight gradients may use atomics),
# and two torchrun processes on a one-GPU machine would both need cuda:0 and cuda:1
FAST = ["--size", "32", "--batch-size", "4", "--quiet", "--log-every", "1", "--device", "cpu"]


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


def test_diffusers_and_accelerate_option_names_are_aliases():
    from backdrop.cli import build_parser

    ours = build_parser().parse_args(
        ["train", "pretrain", "--data", "d", "--out", "o", "--init", "m", "--size", "32", "--batch-size", "2",
         "--num-workers", "1", "--steps", "5", "--lr", "0.1", "--warmup", "1", "--weight-decay", "0.5",
         "--grad-clip", "2", "--grad-accum", "3", "--precision", "bf16", "--save-every", "4", "--keep-last", "1",
         "--resume", "latest", "--prediction", "v_prediction", "--caption-dropout", "0.2"])
    theirs = build_parser().parse_args(
        ["train", "pretrain", "--train-data-dir", "d", "--output-dir", "o", "--pretrained-model-name-or-path", "m",
         "--resolution", "32", "--train-batch-size", "2", "--dataloader-num-workers", "1", "--max-train-steps", "5",
         "--learning-rate", "0.1", "--lr-warmup-steps", "1", "--adam-weight-decay", "0.5", "--max-grad-norm", "2",
         "--gradient-accumulation-steps", "3", "--mixed-precision", "bf16", "--checkpointing-steps", "4",
         "--checkpoints-total-limit", "1", "--resume-from-checkpoint", "latest", "--prediction-type",
         "v_prediction", "--proportion-empty-prompts", "0.2"])
    assert vars(ours) == vars(theirs)
    # as diffusers' scripts spell them, with underscores and =; --center_crop is what we always do
    spelled = build_parser().parse_args(
        ["train", "pretrain", "--train_data_dir=d", "--output_dir", "o", "--pretrained_model_name_or_path=m",
         "--resolution=32", "--train_batch_size=2", "--dataloader_num_workers=1", "--max_train_steps=5",
         "--learning_rate=0.1", "--lr_warmup_steps=1", "--adam_weight_decay=0.5", "--max_grad_norm=2",
         "--gradient_accumulation_steps=3", "--mixed_precision=bf16", "--checkpointing_steps=4",
         "--checkpoints_total_limit=1", "--resume_from_checkpoint=latest", "--prediction_type=v_prediction",
         "--proportion_empty_prompts=0.2", "--center_crop=True", "--enable_xformers_memory_efficient_attention",
         "--local_rank=0"])
    assert vars(spelled) == vars(ours)


@pytest.mark.parametrize("args, message", [
    (["pretrain", "--lr_scheduler", "constant"], "--lr_scheduler (diffusers' option) is not taken: the schedule is "
                                                 "linear warm-up (--warmup) then cosine"),  # named as typed
    (["inpaint", "--random-flip"], "--random-flip (diffusers' option) is not taken: training never flips"),
    (["pretrain", "--caption_column", "prompt"], "--caption_column (diffusers' option) is not taken: captions are "
                                                 "the \"text\" of metadata.jsonl / metadata.csv"),
    (["pretrain", "--push_to_hub"], "--push_to_hub (diffusers' option) is not taken: the trained model is OUT/final"),
    (["pretrain", "--adam_beta2=0.99"], "AdamW uses betas (0.9, 0.999) and eps 1e-8"),
])
def test_diffusers_options_we_lack_say_what_instead(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", *args, "--data", "synthetic:4", "--out", "o"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err


def test_bad_data_spec_exits_2_with_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "backdrop", "train", "pretrain", "--data", "synthetic:lots",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("backdrop train pretrain: error:"), p.stderr
    assert "synthetic:lots" in lines[0]


@pytest.mark.parametrize("args, message", [
    (["vae", "--data", "/nonexistent/images"], "--data /nonexistent/images"),
    (["pretrain", "--data", "synthetic:4", "--init", "/nonexistent/model"], "--init /nonexistent/model: model "
                                                                           "'/nonexistent/model': no such file"),
    (["pretrain", "--data", "synthetic:4", "--zero-terminal-snr"], "v-prediction"),
    (["pretrain", "--data", "synthetic:4", "--preset", "huge"], "unknown preset"),
    (["clip", "--data", "synthetic:4", "--size", "30"], "--size 30"),
    (["vae", "--data", "synthetic:4", "--decoder-only"], "--init"),
    # values that used to crash with a traceback (log-every, num-workers, size -8) or be taken silently
    (["pretrain", "--data", "synthetic:4", "--log-every", "0"], "--log-every 0: must be >= 1"),
    (["pretrain", "--data", "synthetic:4", "--num-workers", "-1"], "--num-workers -1"),
    (["pretrain", "--data", "synthetic:4", "--size", "-8"], "--size -8"),
    (["pretrain", "--data", "synthetic:4", "--size", "0"], "--size 0"),
    (["pretrain", "--data", "synthetic:4", "--ema-decay", "1.5"], "--ema-decay 1.5"),
    (["pretrain", "--data", "synthetic:4", "--ema-decay", "0", "--use-ema"], "--use-ema with --ema-decay 0"),
    (["pretrain", "--data", "synthetic:4", "--keep-last", "-1"], "--keep-last -1"),
    (["pretrain", "--data", "synthetic:4", "--warmup", "-2"], "--warmup -2"),
    (["pretrain", "--data", "synthetic:4", "--learning_rate", "-1"], "--learning_rate -1: must be > 0"),
    (["pretrain", "--data", "synthetic:4", "--caption-dropout", "2"], "--caption-dropout 2"),
    (["pretrain", "--data", "synthetic:4", "--device", "gpu7"], "--device 'gpu7'"),
    (["cache", "--data", "synthetic:4", "--size", "30"], "--size 30"),  # a cache no stage could train on
    (["clip", "--data", "synthetic:4", "--vision-width", "0"], "--vision-width 0: must be >= 1"),
    (["inpaint", "--data", "synthetic:4", "--masks", "product", "--product-prob", "1.5"],
     "--product-prob 1.5: must be in [0, 1]"),
    (["inpaint", "--data", "synthetic:4", "--product-prob", "0.5"], "applies with --masks product only"),
    (["vae", "--data", "synthetic:4", "--kl-weight", "-1"], "--kl-weight -1: must be >= 0"),
    (["clip", "--data", "synthetic:4", "--size", "32", "--vision-patch", "5"], "--vision-patch 5 at --size 32"),
])
def test_user_errors_are_one_line(args, message, tmp_path, capsys):
    assert run(*args, "--out", tmp_path / "o", "--quiet") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()  # a refused run leaves nothing behind


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    for stage in ("pretrain", "cache"):
        assert run(stage, "--data", "synthetic:4", "--out", tmp_path / stage, "--device", "cuda", "--quiet") == 2
        assert "--device cuda: no CUDA GPU" in capsys.readouterr().err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished one-step runs, pretrain/ and vae/; tests copy them before changing anything."""
    d = tmp_path_factory.mktemp("runs")
    torch.set_num_threads(1)
    # pretrain with diffusers' and accelerate's spellings of EMA on and fp32
    assert run("pretrain", "--data", "synthetic:4", "--out", d / "pretrain", "--steps", 1, "--use-ema",
               "--mixed-precision", "no", *FAST) == 0
    assert run("vae", "--data", "synthetic:4", "--out", d / "vae", "--steps", 1, *FAST) == 0
    return d


def _copy(runs, name, tmp_path):
    return shutil.copytree(runs / name, tmp_path / name)


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_out_holding_another_run_is_refused_and_left_alone(runs, tmp_path, capsys):
    pre, vae = _copy(runs, "pretrain", tmp_path), _copy(runs, "vae", tmp_path)
    before = _snapshot(vae)
    args = ("--data", "synthetic:4", "--steps", 2, *FAST)
    # resuming pretrain into the vae run's folder used to overwrite its final/ and prune its checkpoints
    assert run("pretrain", "--out", vae, "--resume", pre, *args) == 2
    assert "holds another run" in capsys.readouterr().err
    shutil.rmtree(vae / "checkpoints")  # a finished run whose checkpoints were deleted to save space
    before = _snapshot(vae)
    assert run("vae", "--out", vae, *args) == 2
    assert "already holds a run (final, log.jsonl)" in capsys.readouterr().err
    assert _snapshot(vae) == before
    (tmp_path / "file").write_text("x")
    assert run("vae", "--out", tmp_path / "file", *args) == 2  # used to be a FileExistsError traceback
    assert "--out" in capsys.readouterr().err
    # a folder of other files (the photos themselves; a user's own args.json) is no run's --out: refused, untouched
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "args.json").write_text('{"my": "notes"}')
    (photos / "0.png").write_bytes(b"png")
    assert run("vae", "--out", photos, *args) == 2
    assert "--out " + str(photos) + " holds 0.png, args.json, which a run did not write" in capsys.readouterr().err
    # the args.json a refused run of ours left there does not block the same command again
    leftover = tmp_path / "leftover"
    leftover.mkdir()
    shutil.copy(vae / "args.json", leftover / "args.json")
    assert run("vae", "--out", leftover, "--steps", 1, "--data", "synthetic:4", *FAST) == 0


def test_resume_refuses_another_stage_and_names_changed_options(runs, tmp_path, capsys):
    pre, vae = _copy(runs, "pretrain", tmp_path), _copy(runs, "vae", tmp_path)
    capsys.readouterr()
    # a vae checkpoint in the inpaint stage used to end in load_state_dict's traceback listing every key
    assert run("inpaint", "--out", vae, "--resume", vae, "--data", "synthetic:4", "--steps", 2, *FAST) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a checkpoint of `backdrop train vae`" in err[0], err
    args = json.loads((pre / "args.json").read_text())  # --use-ema --mixed-precision no, recorded as ours
    assert (args["ema_decay"], args["precision"], "use_ema" in args) == (0.9999, "fp32", False), args
    assert any(k.startswith("ema.") for k in safe_open(next((pre / "checkpoints").iterdir()) / "state.safetensors",
                                                        "pt").keys())
    assert run("pretrain", "--out", pre, "--resume", "latest", "--data", "synthetic:4", "--max_train_steps", 2,
               "--learning-rate", "1e-2", "--ema-decay", 0.9999, *FAST) == 0  # the same run as --use-ema
    warning = capsys.readouterr().err  # (--mixed-precision no): no warning about those; options named as typed
    assert "--learning-rate 1e-2 (was 0.0001)" in warning and "--max_train_steps 2 (was 1)" in warning, warning
    assert "ema" not in warning and "precision" not in warning, warning
    assert run("pretrain", "--out", pre, "--resume", pre, "--data", "synthetic:4", "--steps", 1, *FAST) == 2
    assert "past this run's last step 1" in capsys.readouterr().err
    # diffusers' --resume_from_checkpoint names a checkpoint of its --output_dir
    assert run("pretrain", "--output_dir", pre, "--resume_from_checkpoint", "step-00000002", "--data", "synthetic:4",
               "--steps", 3, "--ema-decay", 0.9999, *FAST) == 0
    assert run("pretrain", "--out", tmp_path / "x", "--init", pre / "checkpoints/step-00000002",
               "--data", "synthetic:4", *FAST) == 2
    assert "is a training checkpoint" in capsys.readouterr().err


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_earlier_ones(tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    from backdrop.train import checkpointing

    real, calls = checkpointing.save_file, []

    def full_disk(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) > 1:
            real(tensors, path, *a, **k)  # a partial file, then the error safetensors gives on ENOSPC
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(checkpointing, "save_file", full_disk)
    out = tmp_path / "o"
    assert run("pretrain", "--out", out, "--data", "synthetic:4", "--steps", 2, "--save-every", 1, *FAST) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and f"--resume {out}" in err[0], err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]  # and no half-written one


def test_init_takes_a_built_in_models_name_and_a_resume_its_runs(tmp_path, capsys):
    """--init backdrop-tiny, as generate/serve/export take the name: fine-tune the built-in model. A resume that
    leaves --init out takes the run's (its checkpoint holds only the UNet): random text encoder and VAE weights
    used to be trained against and shipped in final/."""
    from backdrop.nn.resolve import resolve_model

    out = tmp_path / "o"
    args = ("--data", "synthetic:4", "--out", out, "--masks", "product", *FAST)
    assert run("inpaint", "--init", "backdrop-tiny", "--steps", 1, *args) == 0
    assert load_model(out / "final").config.unet.in_channels == 9
    capsys.readouterr()
    (out / "notes.txt").write_text("mine")  # a run's own folder may hold notes: its resume writes beside them
    assert run("inpaint", "--resume", "latest", "--steps", 2, *args) == 0
    assert "--init backdrop-tiny, its run's model" in capsys.readouterr().err
    base, final = load_model(resolve_model("backdrop-tiny")), load_model(out / "final")
    for part in ("text_encoder", "vae"):
        want, got = getattr(base, part).state_dict(), getattr(final, part).state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want), part


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
    # a cache without the pixels: random masks need them; keeping the product takes the cached product latents
    assert run("cache", "--data", "synthetic:8", "--out", d / "lean", "--init", d / "vae/final", "--size", 32,
               "--no-images", "--quiet") == 0
    assert run("inpaint", "--data", d / "lean", "--out", d / "x", "--init", d / "inp/final", "--steps", 1,
               *FAST) == 2
    assert run("inpaint", "--data", d / "lean", "--out", d / "lean-prod", "--init", d / "inp/final", "--steps", 1,
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
    # the stopped run had logged steps 3 and 4: the resumed one logged them again, once
    assert [json.loads(x)["step"] for x in (tmp_path / "b/log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    # the run's command stays in args.json, the resume's goes beside it
    assert json.loads((tmp_path / "b/args.json").read_text())["resume"] is None
    assert json.loads((tmp_path / "b/args-resume-2.json").read_text())["resume"] == str(tmp_path / "b")


def test_torchrun_two_processes_then_a_resume_with_one(tmp_path, capsys):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["pretrain", "--data", "synthetic:24", "--out", str(tmp_path / "ddp"), "--save-every", "2", *map(str, FAST)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "backdrop", "train", *args, "--steps", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / "ddp/args.json").read_text())["world_size"] == 2
    log = [json.loads(x) for x in (tmp_path / "ddp/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert load_model(tmp_path / "ddp/final").config.unet.in_channels == 4
    # the job goes on with one process: the 16 items the two ranks took are not taken again
    shutil.rmtree(tmp_path / "ddp/final")
    capsys.readouterr()
    assert run(*args, "--steps", 3, "--resume", tmp_path / "ddp") == 0
    err = capsys.readouterr().err
    assert "written by 2 processes, this run has 1: the data goes on from item 16 of its stream (epoch 0)" in err
    assert "a step trains on 4 images (was 8); --grad-accum 2 keeps 8" in err
    assert [json.loads(x)["step"] for x in (tmp_path / "ddp/log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert load_model(tmp_path / "ddp/final").config.unet.in_channels == 4


def test_a_failed_write_says_what_the_run_can_go_on_from(tmp_path):
    """A run stopped by a write it could not make (a full disk) points at its newest checkpoint, or says there is
    none: --resume on a run without one would only fail."""
    from backdrop.train import checkpointing
    from backdrop.train.run_folder import what_is_kept

    assert what_is_kept(tmp_path) == ("no checkpoint was written before it (--save-every K writes them along the "
                                      "way): run the command again to start over")
    for step in (2, 4):
        checkpointing.save_checkpoint(tmp_path / "checkpoints", step, {"w": torch.ones(1)}, {"step": step})
    assert what_is_kept(tmp_path).endswith(f"--resume {tmp_path} goes on from step-00000004")


def test_a_damaged_newest_checkpoint_names_the_one_before_it(tmp_path):
    from backdrop.train import checkpointing

    root = tmp_path / "checkpoints"
    for step in (2, 4):
        checkpointing.save_checkpoint(root, step, {"w": torch.ones(1)}, {"step": step})
    (root / "step-00000004/state.safetensors").write_bytes(b"\0" * 5)  # torn by a crashed copy
    with pytest.raises(ValueError, match=f"step-00000004: unreadable checkpoint .*the one before it can be: "
                                         f"--resume {root / 'step-00000002'}$"):
        checkpointing.load_checkpoint(tmp_path)
    (root / "step-00000002/state.safetensors").write_bytes(b"\0" * 5)
    with pytest.raises(ValueError, match=r"step-00000002: unreadable checkpoint \([^;]*\)$"):  # none before it
        checkpointing.load_checkpoint(root / "step-00000002")


def test_an_image_damaged_after_its_header_stops_the_cache_and_a_run_in_one_line(tmp_path, capsys):
    """The scan reads headers only; a truncated body fails at load time, in a DataLoader worker, whose re-raised
    error carries the worker's whole traceback: the command prints the error itself, naming the file."""
    import numpy as np
    from PIL import Image

    data = tmp_path / "photos"
    data.mkdir()
    for i in range(4):
        noise = np.random.default_rng(i).integers(0, 256, (48, 48, 3), dtype=np.uint8)
        Image.fromarray(noise).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a mug on sand")
    raw = (data / "2.png").read_bytes()
    (data / "2.png").write_bytes(raw[:len(raw) // 2])
    capsys.readouterr()
    cache, train = FAST[:5], FAST  # the cache command has no --log-every
    for args in (("cache", "--out", tmp_path / "cache", *cache), ("pretrain", "--out", tmp_path / "run", "--steps", 1,
                                                                 *train),
                 ("vae", "--out", tmp_path / "vae", "--steps", 1, *train)):  # vae reads images to calibrate first
        assert run(*args, "--data", data, "--num-workers", 1) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(data / "2.png") in err[0] and "Traceback" not in err[0], err


def test_a_run_interrupted_before_its_first_checkpoint_starts_over(tmp_path, capsys, monkeypatch):
    """Ctrl-C before any checkpoint leaves args.json and log.jsonl: --resume says there is nothing to go on from
    and how to start over, and the same command starts over (it used to refuse: 'already holds a run, --resume'),
    as the interrupt's own message says."""
    from backdrop.train.core import Trainer

    out, real = tmp_path / "o", Trainer.train_step

    def interrupted(self):
        if self.step == 1:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    args = ("pretrain", "--out", out, "--data", "synthetic:4", "--steps", 3, *FAST)
    assert run(*args) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 1; no checkpoint was written" in err and "run the command again" in err
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "log.jsonl"]
    assert run(*args, "--resume", out) == 2
    assert "nothing to go on from; run the command without --resume" in capsys.readouterr().err
    monkeypatch.setattr(Trainer, "train_step", real)
    assert run(*args) == 0
    assert "starting over" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_sigterm_stops_a_run_after_its_step_with_a_checkpoint_of_it(tmp_path):
    """SIGTERM is how schedulers preempt (SLURM, Kubernetes: then SIGKILL after a grace period). It killed the run
    with no word; now the run finishes its step, saves it, says how to resume and exits with status 143."""
    import re
    import signal
    import time

    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "backdrop", "train", "pretrain", "--out", str(out), "--data", "synthetic:8",
           "--steps", "100000", "--save-every", "100000", *FAST]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        end = time.monotonic() + 300
        while not (out / "log.jsonl").is_file() or not (out / "log.jsonl").read_text().strip():
            assert p.poll() is None and time.monotonic() < end, "no step was logged"
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        err = p.communicate(timeout=120)[1]
    finally:
        p.kill()
    assert p.returncode == 143, err
    step = int(re.search(r"terminated at step (\d+)", err)[1])
    assert f"--resume {out} goes on from step-{step:08d}" in err, err  # the step it stopped at, saved
    assert (out / "checkpoints" / f"step-{step:08d}").is_dir()


def test_a_folder_a_run_is_writing_is_refused_to_a_second_one(tmp_path, capsys):
    """A requeued job beside a still-running one (or a --resume of a live run) interleaved their logs and pruned each
    other's checkpoints: OUT/.lock, held by the running process, refuses the second, naming the first."""
    from backdrop.train.run_folder import LOCK, RunLock

    out = tmp_path / "o"
    assert run("pretrain", "--out", out, "--data", "synthetic:4", "--steps", 1, "--save-every", 1, *FAST) == 0
    assert not (out / LOCK).exists()  # released and removed at the end
    capsys.readouterr()
    (out / ".final.x1y2.tmp").mkdir()  # a final model a killed run was writing: the next run removes it
    held = RunLock(out)  # as a run still going would hold it
    assert not (out / ".final.x1y2.tmp").exists()
    try:
        assert run("pretrain", "--out", out, "--data", "synthetic:4", "--steps", 2, "--resume", out, *FAST) == 2
        err = capsys.readouterr().err
        assert "is in use by a run still going (pid" in err and str(os.getpid()) in err, err
    finally:
        held.release()
    assert run("pretrain", "--out", out, "--data", "synthetic:4", "--steps", 2, "--resume", out, *FAST) == 0


def test_clip_under_torchrun_contrasts_the_global_batch(tmp_path):
    """Two ranks x 4 pairs train as one process with 8 (open_clip's gathered negatives): each rank's captions and
    images are contrasted with every rank's. Contrasting each rank's own 4 left half the image tower's weights more
    than 1e-5 apart after two steps (max 1.1e-3); gathered, at most a few 1e-5 (float sums in another order)."""
    from safetensors.torch import load_file

    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["train", "clip", "--preset", "tiny", "--data", "synthetic:8", "--steps", "2", "--size", "32", "--quiet",
            "--device", "cpu"]
    one = subprocess.run([sys.executable, "-m", "backdrop", *args, "--batch-size", "8", "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "backdrop", *args, "--batch-size", "4", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    for part in ("image_encoder/model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(tmp_path / "one/final" / part), load_file(tmp_path / "two/final" / part)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 2e-4, part
