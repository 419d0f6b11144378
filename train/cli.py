"""`backdrop train {clip,vae,pretrain,inpaint,cache}`: the training stages from the command line.

Options every stage shares are defined once, in parent parsers (`_data_options`, `_training_options`,
`_diffusion_options`); a stage adds only its own. Each stage starts from `--init MODEL` (a model folder or file)
or from random weights of `--preset`, trains its component, and writes the whole model to OUT/final/ (a diffusers
folder), which the next stage takes as its --init. Progress goes to tqdm and OUT/log.jsonl, checkpoints to
OUT/checkpoints/ (resume with --resume OUT). Under torchrun every process trains on its own shard of the data
(gloo on CPU, nccl on GPU); --batch-size is per process.

Option names are short, with the names of diffusers' training scripts (train_text_to_image.py) and accelerate as
aliases where they exist: --steps / --max-train-steps, --lr / --learning-rate, --out / --output-dir, ... (also with
underscores, as those scripts spell them: backdrop/cli.py); their options we lack are refused with what to do
instead (DIFFUSERS_INSTEAD).

User errors (bad --data, unreadable model, mismatched cache, bad option values, an --out that holds another run, a
--resume checkpoint of another stage or model) are one line and exit status 2. Resuming with options other than
the checkpoint's is allowed (e.g. more --steps, a lower --lr) and listed in a warning.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from backdrop.cli import CLIError, as_typed, make_folder, one_line, parse_device
from backdrop.train.diffusers_options import ALWAYS_SO, DIFFUSERS_INSTEAD, AlwaysSo, Instead, resolve_aliases

__all__ = ["add_parser"]

STAGES = ("clip", "vae", "pretrain", "inpaint")
DEFAULT_LR = {"clip": 5e-4, "vae": 1e-4, "pretrain": 1e-4, "inpaint": 5e-5}
CALIBRATION_IMAGES = 64  # images the vae stage measures the latent scaling factor on

CHAIN = """the chain, each stage from the last one's OUT/final:
  backdrop train clip     --data synthetic:20000 --out runs/clip --preset tiny
  backdrop train vae      --data synthetic:20000 --out runs/vae --init runs/clip/final
  backdrop train cache    --data synthetic:20000 --out cache/tiny --init runs/vae/final
  backdrop train pretrain --data cache/tiny --out runs/pretrain --init runs/vae/final --snr-gamma 5
  backdrop train inpaint  --data cache/tiny --out runs/inpaint --init runs/pretrain/final --snr-gamma 5
  backdrop train inpaint  --data cache/tiny --out runs/product --init runs/inpaint/final --snr-gamma 5 \
                          --masks product
  backdrop train vae      --data synthetic:20000 --out runs/decoder --init runs/product/final --decoder-only
  backdrop train vae      --data synthetic:20000 --out runs/asym --init runs/decoder/final --decoder-only \\
                          --mask-conditioned
a stopped run continues with its command plus --resume OUT (or --resume latest)"""


def _data_options() -> argparse.ArgumentParser:
    from backdrop.nn.config import PRESETS

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("data and model")
    g.add_argument("--data", "--train-data-dir", required=True, metavar="SPEC",
                   help="'synthetic:N' (N images of the built-in procedural product world); a folder of images "
                        "(PNG, JPEG, WebP, BMP, TIFF) captioned by a metadata.jsonl or metadata.csv (file_name, "
                        "text, optional mask_file_name; also in a train/ folder below, as Hugging Face's "
                        "imagefolder) or by a NAME.txt beside each image (optional mask NAME.mask.png or "
                        "NAME_mask.png: white = product); such a metadata file itself; or a latent cache folder "
                        "made by `backdrop train cache` (pretrain and inpaint only)")
    g.add_argument("--out", "--output-dir", required=True, metavar="DIR",
                   help="a new or empty folder: the run writes log.jsonl, checkpoints/ and final/ there; a folder "
                        "that holds a run is refused unless --resume continues that run (the cache command: the "
                        "cache folder)")
    g.add_argument("--init", "--pretrained-model-name-or-path", metavar="MODEL",
                   help="start from this model folder or .safetensors file (usually the previous stage's "
                        "OUT/final; to continue a stopped run use --resume); default: random weights")
    g.add_argument("--preset", default="tiny", metavar="NAME",
                   help="model shape for random weights when there is no --init: " + ", ".join(PRESETS)
                        + " (default: %(default)s)")
    g.add_argument("--size", "--resolution", type=int, metavar="PX",
                   help="training images are PX x PX, a multiple of 8 (default: the model's native size, 64 for "
                        "tiny)")
    g.add_argument("--batch-size", "--train-batch-size", type=int, default=8, metavar="B",
                   help="images per step and process (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seeds the data order, the random draws and random "
                                                       "weights (default: %(default)s)")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if present, else cpu)")
    g.add_argument("--num-workers", "--dataloader-num-workers", type=int, default=0, metavar="N",
                   help="data loading processes; 0 loads in the training process (default: 0)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    for option in ALWAYS_SO:
        g.add_argument(option, action=AlwaysSo)
    return p


def _training_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("training")
    g.add_argument("--steps", "--max-train-steps", type=int, default=1000, metavar="N",
                   help="optimizer steps (default: %(default)s)")
    g.add_argument("--lr", "--learning-rate", type=float, metavar="LR",
                   help="peak learning rate of AdamW, reached after --warmup, then cosine decay to a tenth of it "
                        "at the last step (default: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    g.add_argument("--warmup", "--lr-warmup-steps", type=int, default=0, metavar="N",
                   help="linear warm-up steps (default: 0)")
    g.add_argument("--weight-decay", "--adam-weight-decay", type=float, default=1e-2, metavar="W",
                   help="AdamW weight decay, not applied to norms and biases (default: %(default)s)")
    g.add_argument("--grad-clip", "--max-grad-norm", type=float, default=1.0, metavar="NORM",
                   help="clip the gradient norm; 0 turns it off (default: %(default)s)")
    g.add_argument("--grad-accum", "--gradient-accumulation-steps", type=int, default=1, metavar="K",
                   help="accumulate K batches per step (default: 1)")
    g.add_argument("--precision", "--mixed-precision", choices=("fp32", "bf16", "fp16", "no"), default="fp32",
                   help="autocast precision; weights stay fp32; 'no' (accelerate's name) is fp32 (default: "
                        "%(default)s)")
    g.add_argument("--ema-decay", type=float, metavar="D", help="keep an EMA of the weights and ship it, e.g. "
                                                                "0.999; 0: off (default: 0, or 0.9999 with --use-ema)")
    g.add_argument("--use-ema", action="store_true", help="EMA with diffusers' decay, 0.9999 (a long run's: "
                                                          "short runs want --ema-decay 0.999)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, ~30%% slower")
    g.add_argument("--save-every", "--checkpointing-steps", type=int, default=500, metavar="K",
                   help="checkpoint every K steps, and at the end; 0: only at the end (default: %(default)s, as "
                        "diffusers' --checkpointing_steps)")
    g.add_argument("--keep-last", "--checkpoints-total-limit", type=int, default=2, metavar="N",
                   help="checkpoints to keep; 0 keeps all (default: 2)")
    g.add_argument("--log-every", type=int, default=10, metavar="K", help="log every K steps (default: 10)")
    g.add_argument("--resume", "--resume-from-checkpoint", metavar="DIR",
                   help="continue a stopped run: its OUT (the newest checkpoint), one OUT/checkpoints/step-N, or "
                        "'latest' (the newest in --out). Options that differ from the checkpoint's are listed in a "
                        "warning; a checkpoint of another stage or model shape is refused")
    for option in DIFFUSERS_INSTEAD:
        g.add_argument(option, action=Instead)
    return p


def _diffusion_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("diffusion loss")
    g.add_argument("--prediction", "--prediction-type", choices=("epsilon", "v_prediction"),
                   help="what the UNet predicts (default: the model's own, epsilon for SD1/tiny)")
    g.add_argument("--snr-gamma", type=float, default=0.0, metavar="G",
                   help="min-SNR-γ loss weighting (Hang et al. 2023); 5 is the recommended value, which the built-in "
                        "model was trained with (default: 0, off, as diffusers')")
    g.add_argument("--noise-offset", type=float, default=0.0, metavar="S",
                   help="offset noise scale, e.g. 0.05: lets the model make very dark or bright images; 0: off")
    g.add_argument("--input-perturbation", type=float, default=0.0, metavar="S",
                   help="input perturbation (Ning et al. 2023), e.g. 0.1; 0: off")
    g.add_argument("--zero-terminal-snr", action="store_true",
                   help="rescale the noise schedule to reach pure noise (Lin et al. 2023); needs --prediction "
                        "v_prediction")
    g.add_argument("--caption-dropout", "--proportion-empty-prompts", type=float, default=0.1, metavar="P",
                   help="train on the empty prompt with probability P, for classifier-free guidance "
                        "(default: %(default)s)")
    return p


def add_parser(subparsers) -> None:
    data, training, diffusion = _data_options(), _training_options(), _diffusion_options()
    train = subparsers.add_parser(
        "train", help="train a model, stage by stage (clip, vae, pretrain, inpaint) or build a latent cache",
        description="Train a model stage by stage. Each stage writes OUT/final/, a complete model folder.",
        epilog=CHAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = train.add_subparsers(dest="stage", metavar="STAGE", required=True)

    clip = stages.add_parser("clip", parents=[data, training], help="contrastive CLIP training of the text "
                             "encoder and a vision tower", description="Train the text encoder and a CLIP vision "
                             "tower together on image-caption pairs (writes final/image_encoder/ too).")
    v = clip.add_argument_group("vision tower (default: continue --init's image_encoder/, else 128 x 4 layers)")
    v.add_argument("--vision-width", type=int, metavar="W", help="ViT width (default: 128)")
    v.add_argument("--vision-layers", type=int, metavar="L", help="ViT layers (default: 4)")
    v.add_argument("--vision-heads", type=int, metavar="H", help="attention heads (default: 4)")
    v.add_argument("--vision-patch", type=int, metavar="P", help="patch size in pixels (default: 8)")

    vae = stages.add_parser("vae", parents=[data, training], help="train the autoencoder",
                            description="Train the VAE: L1 + SSIM reconstruction and a small KL term; the latent "
                                        "scaling factor is re-measured at the end.")
    vae.add_argument("--ssim-weight", type=float, default=0.84, metavar="A",
                     help="loss = (1-A) L1 + A (1-SSIM) + KL term (default: %(default)s, Zhao et al. 2017)")
    vae.add_argument("--kl-weight", type=float, default=1e-6, metavar="B", help="KL weight (default: %(default)s, "
                                                                                 "as LDM)")
    vae.add_argument("--decoder-only", action="store_true",
                     help="fine-tune only the decoder of --init's VAE: its latents and scaling factor stay, so a UNet "
                          "trained on them keeps working (as Stability's sd-vae-ft-mse)")
    vae.add_argument("--mask-conditioned", action="store_true",
                     help="with --decoder-only: give the decoder a view of the known pixels of an inpainting task "
                          "(Asymmetric VQGAN, diffusers' AsymmetricAutoencoderKL); sharper edges next to a kept "
                          "product. An --init VAE that already is one is trained so without this flag")
    vae.add_argument("--product-prob", type=float, default=0.5, metavar="P",
                     help="mask-conditioned: the share of product masks where the data has them, the rest random "
                          "(default: %(default)s)")

    stages.add_parser("pretrain", parents=[data, training, diffusion], help="text-to-image diffusion (UNet)",
                      description="Train the UNet for text-to-image on the frozen text encoder and VAE.")

    inpaint = stages.add_parser("inpaint", parents=[data, training, diffusion],
                                help="make and fine-tune a 9-channel inpainting UNet",
                                description="Turn the UNet into a 9-channel inpainting UNet (new channels start at "
                                            "zero) and fine-tune it on random or product masks.")
    inpaint.add_argument("--masks", choices=("random", "product"), default="random",
                         help="random: boxes, ellipses, brush strokes, 25%% whole-image; product: repaint "
                              "everything but the product (needs masks in the data) (default: %(default)s)")
    inpaint.add_argument("--product-prob", type=float, metavar="P",
                         help="with --masks product: the share of product masks, the rest random (default: 1)")
    inpaint.add_argument("--latent-mask", choices=("diffusers", "max"), default="max",
                         help="mask to latent size as Backdrop's pipeline samples (max: a latent pixel touching the "
                              "repainted region is repainted), or as diffusers' pipeline does (nearest), for a model "
                              "to run there (default: %(default)s)")

    for sub in (clip, vae, stages.choices["pretrain"], inpaint):
        sub.set_defaults(func=_run_stage)

    cache = stages.add_parser("cache", parents=[data], help="encode a dataset once for pretrain/inpaint",
                              description="Encode every image (VAE posterior) and caption (text encoder) of --data "
                                          "with --init's encoders into the folder --out; then pass that folder as "
                                          "--data to pretrain or inpaint. Training never flips images (mirrored "
                                          "logos and text), so one entry per image is enough.")
    cache.add_argument("--shard-size", type=int, default=512, metavar="N", help="items per shard file "
                                                                                "(default: %(default)s)")
    cache.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                       help="storage precision of latents and embeddings (default: %(default)s)")
    cache.add_argument("--no-images", action="store_true",
                       help="do not keep the pixels (much smaller): for pretrain, and for inpaint --masks product "
                            "--product-prob 1 (random masks need the pixels)")
    cache.set_defaults(func=_run_cache)


# ------------------------------------------------------------------------------------------------ running

FLAG_OF_FIELD = {"warmup_steps": "--warmup", "prediction_type": "--prediction"}  # config fields named otherwise


def _data_error(e: BaseException) -> str:
    """A data file's error on one line; raised in a DataLoader worker, torch re-raises it with the worker's whole
    traceback in the message, whose last line is the error itself."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and "Original Traceback" in lines[1]:
        return lines[-1].split(": ", 1)[-1]
    return one_line(e)


def _named(flag: str, value, e: BaseException) -> CLIError:
    """`flag value: message`, without saying the value twice when the message starts with it (a path)."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return CLIError(f"{flag} {msg}" if msg.startswith(str(value)) else f"{flag} {value}: {msg}")


@contextlib.contextmanager
def _options_named():
    """A config field out of range (train/core.py ConfigError) becomes an error naming the option."""
    from backdrop.train.core import ConfigError

    try:
        yield
    except ConfigError as e:
        flag = FLAG_OF_FIELD.get(e.field, "--" + e.field.replace("_", "-"))
        raise CLIError(f"{flag} {e.value}: must be {e.want}") from None


def _check_options(args) -> None:
    """Options no config class sees (TrainConfig and DiffusionOptions check theirs: see _configs)."""
    rules = [("--num-workers", args.num_workers, args.num_workers >= 0, ">= 0"),
             ("--size", args.size, args.size is None or args.size >= 8, "at least 8")]
    if args.stage == "cache":  # the cache has no TrainConfig
        rules += [("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
                  ("--shard-size", args.shard_size, args.shard_size >= 1, ">= 1")]
    if args.stage == "inpaint":
        if args.product_prob is not None and args.masks != "product":
            raise CLIError(f"--product-prob {args.product_prob}: applies with --masks product only (the share of "
                           "product masks, the rest random); --masks random uses random masks throughout")
        args.product_prob = 1.0 if args.product_prob is None else args.product_prob
    if args.stage in ("vae", "inpaint"):
        rules.append(("--product-prob", args.product_prob, 0 <= args.product_prob <= 1, "in [0, 1]"))
    if args.stage == "vae":
        rules += [("--ssim-weight", args.ssim_weight, 0 <= args.ssim_weight <= 1, "in [0, 1]"),
                  ("--kl-weight", args.kl_weight, args.kl_weight >= 0, ">= 0")]
    if args.stage == "clip":
        vision = {k: getattr(args, f"vision_{k}") for k in ("width", "layers", "heads", "patch")}
        rules += [(f"--vision-{k}", v, v is None or v >= 1, ">= 1") for k, v in vision.items()]
    for flag, value, ok, want in rules:
        if not ok:
            raise CLIError(f"{flag} {value}: must be {want}")


def _configs(args, name: str):
    """(TrainConfig, DiffusionOptions or None), built before anything is loaded, so a bad value fails at once."""
    from backdrop.train.core import TrainConfig
    from backdrop.train.stages.common import DiffusionOptions

    with _options_named():
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                          lr=args.lr if args.lr is not None else DEFAULT_LR[name], weight_decay=args.weight_decay,
                          warmup_steps=args.warmup, grad_clip=args.grad_clip, precision=args.precision,
                          ema_decay=args.ema_decay, gradient_checkpointing=args.gradient_checkpointing,
                          save_every=args.save_every, keep_last=args.keep_last, log_every=args.log_every,
                          seed=args.seed)
        options = None
        if name in ("pretrain", "inpaint"):
            options = DiffusionOptions(args.prediction, args.snr_gamma, args.noise_offset, args.input_perturbation,
                                       args.zero_terminal_snr, args.caption_dropout)
    return cfg, options


def _device(args):
    import torch

    if not args.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return parse_device(args.device)


def _distributed(args) -> tuple[int, int, object]:
    """(rank, world size, device); under torchrun it joins the process group (train/core.py)."""
    from backdrop.train.core import join_process_group

    try:
        return join_process_group(_device(args))
    except ValueError as e:  # more processes on a node than GPUs
        raise CLIError(f"{e} (--nproc_per_node), or --device cpu") from None


def _model(args):
    from backdrop.nn.checkpoint import init_model, load_model
    from backdrop.nn.resolve import resolve_model

    if not args.init:
        return init_model(args.preset, seed=args.seed)
    try:  # a built-in model's name too ("backdrop-tiny"), as the other commands take
        init = resolve_model(args.init)
    except FileNotFoundError as e:
        raise _named("--init", args.init, e) from None
    if not (init / "model_index.json").is_file() and (init / "final" / "model_index.json").is_file():
        raise CLIError(f"--init {init} is a training run's folder; its model is {init / 'final'}")
    if (init / "meta.json").is_file() and (init / "state.safetensors").is_file():
        raise CLIError(f"--init {init} is a training checkpoint, not a model: continue its run with --resume, or "
                       "start from the run's final/")
    try:
        return load_model(init)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        raise _named("--init", init, e) from None


def _image_size(args, model) -> int:
    """--size, or the model's native size; a positive multiple of the VAE's downsampling factor."""
    size = args.size if args.size is not None else model.config.image_size
    f = model.config.vae.downsample_factor
    if size < f or size % f:
        raise CLIError(f"--size {size}: must be a multiple of {f}, the VAE's downsampling factor")
    return size


def _dataset(args, stage: str, size: int, model):
    from backdrop.train.cache import LatentCache, is_cache
    from backdrop.train.data import make_dataset

    if is_cache(args.data):
        if stage not in ("pretrain", "inpaint"):
            raise CLIError(f"--data {args.data} is a latent cache; the {stage} stage trains an encoder the cache "
                           "stands in for, so give it images (synthetic:N or an image folder)")
        data = LatentCache(args.data)
        data.check(model, size)
        if stage == "inpaint" and not data.has_images and not (
                args.masks == "product" and args.product_prob == 1 and data.has_product_latents):
            raise CLIError(f"--data {args.data}: cache built with --no-images, " + (
                "so random masks cannot be encoded; only --masks product --product-prob 1 trains without the "
                "pixels" if data.has_product_latents else "and without product latents (its data had no product "
                "masks, or the cache predates them); rebuild it without --no-images"))
    else:
        # Only the stages that read product masks load (and check) a folder's: its masks are all or none there.
        masks = stage == "cache" or (stage == "inpaint" and args.masks == "product") or (
            stage == "vae" and (args.mask_conditioned or model.config.vae.mask_conditioned))
        try:  # Synthetic data is World(0), the world the evaluator holds its seeds out from; --seed orders the data.
            data = make_dataset(args.data, size, seed=0, masks=masks)
        except (ValueError, OSError) as e:
            raise _named("--data", args.data, e) from None
    if stage == "inpaint" and args.masks == "product" and not data.has_masks:
        raise CLIError(f"--data {args.data} has no product masks, which --masks product needs")
    return data


def _stage(args, name: str, model, data, size: int, device, options):
    if name == "clip":
        from backdrop.train.stages.clip import IMAGE_ENCODER, ClipStage, vision_config

        given = [args.vision_width, args.vision_layers, args.vision_heads, args.vision_patch]
        vision = None
        if any(x is not None for x in given) or not (args.init and (Path(args.init) / IMAGE_ENCODER).is_dir()):
            w, layers, heads, patch = (x if x is not None else d for x, d in zip(given, (128, 4, 4, 8)))
            try:
                vision = vision_config(size, model.config.text.projection_dim, w, layers, heads, patch)
            except ValueError as e:  # width not a multiple of heads, size not of patch
                raise CLIError(f"--vision-width {w} --vision-heads {heads} --vision-patch {patch} at --size {size}: "
                               f"{e}") from None
        return ClipStage(model, vision, device, args.init)
    if name == "vae":
        import torch

        from backdrop.train.stages.vae import VAEStage

        if args.decoder_only and not args.init:
            raise CLIError("--decoder-only fine-tunes a trained VAE's decoder; give it with --init")
        n = min(CALIBRATION_IMAGES, len(data))
        calibration = None if args.decoder_only else torch.stack([data[i]["image"] for i in range(n)])  # (n, 3, H, W)
        return VAEStage(model, device, args.init, args.ssim_weight, args.kl_weight, calibration, args.decoder_only,
                        args.mask_conditioned, args.product_prob)
    if name == "pretrain":
        from backdrop.train.stages.pretrain import PretrainStage

        return PretrainStage(model, options, device, args.init)
    from backdrop.train.stages.inpaint import InpaintStage

    return InpaintStage(model, options, device, args.init, args.masks, args.product_prob, args.latent_mask)


def _trainer(args, name: str, out: Path, cfg, options, resume: Path | None, rank: int, world: int, device):
    """Model, data, stage and Trainer of the run; from the checkpoint `resume` when given."""
    from backdrop.train import checkpointing, run_folder
    from backdrop.train.core import Trainer
    from backdrop.train.data import DataStream

    model = _model(args)
    size = _image_size(args, model)
    data = _dataset(args, name, size, model)
    stage = _stage(args, name, model, data, size, device, options)
    loader = DataStream(data, args.batch_size, seed=args.seed, rank=rank, world_size=world,
                        num_workers=args.num_workers)
    run = run_folder.run_record(args, lr=cfg.lr, size=size)
    trainer = Trainer(stage, loader, cfg, out, device=device, progress=not args.quiet, run=run)
    if resume is not None:
        try:
            tensors, meta = checkpointing.load_checkpoint(resume)
            changed = run_folder.changed_options(meta.get("run"), run, resume)
            if changed and rank == 0:  # before load_state, whose refusal the change may explain
                print(f"warning: resuming {resume} with options other than its run's: "
                      f"{as_typed('; '.join(changed), args)}", file=sys.stderr)
            trainer.load_state(tensors, meta)
        except (ValueError, KeyError) as e:  # KeyError: a meta.json without a field every checkpoint has
            raise _named("--resume", resume, e) from None
    return trainer


def _run_stage(args) -> int:
    import torch.distributed as dist
    from safetensors import SafetensorError

    from backdrop.train import run_folder

    name, out = args.stage, Path(args.out)
    resolve_aliases(args)
    _check_options(args)
    cfg, options = _configs(args, name)
    resume = run_folder.resume_checkpoint(args.resume, args.out)
    run_folder.check_out(out, resume)
    if resume is not None:
        run_folder.resumed_init(args, resume)
    try:
        rank, world, device = _distributed(args)
        try:
            trainer = _trainer(args, name, out, cfg, options, resume, rank, world, device)
        except (ValueError, FileNotFoundError) as e:
            raise CLIError(str(e).splitlines()[0]) from None
        make_folder(out)
        if resume is None and run_folder.stopped_before_a_checkpoint(out) and rank == 0:
            print(f"--out {out}: its run stopped before its first checkpoint; starting over (its log.jsonl is "
                  "replaced)", file=sys.stderr)
            (out / "log.jsonl").unlink()
        # the command of the run; a resume's own beside it, so that neither is lost
        record = {k: v for k, v in vars(args).items() if k not in ("func", "option_names")} | {"world_size": world}
        file = "args.json" if resume is None else f"args-resume-{trainer.step}.json"
        try:
            trainer.on_rank0(lambda: (out / file).write_text(json.dumps(record, indent=2) + "\n"), file)
            try:
                trainer.fit()
            except KeyboardInterrupt:
                if rank == 0:
                    print(f"interrupted at step {trainer.step}; {run_folder.what_is_kept(out)}", file=sys.stderr)
                return 130
            final = trainer.save_final()
        except (OSError, SafetensorError) as e:  # a full disk, a folder gone read-only, a damaged data file
            raise CLIError(f"{_data_error(e)}; {run_folder.what_is_kept(out)}") from None
        if rank == 0:  # save_final returns on every rank once rank 0 has written
            print(final)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _run_cache(args) -> int:
    from safetensors import SafetensorError

    from backdrop.train import run_folder
    from backdrop.train.cache import build_cache, is_cache
    from backdrop.train.data import DataFileError

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CLIError("the cache command runs in one process; start it without torchrun")
    _check_options(args)
    if is_cache(args.data):
        raise CLIError(f"--data {args.data} is already a latent cache; give the images it should encode")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise CLIError(f"--out {args.out} is a file; give the folder the cache should be written to")
    device = _device(args)
    model = _model(args)
    data = _dataset(args, "cache", _image_size(args, model), model)
    try:
        out = build_cache(model, data, args.out, batch_size=args.batch_size, shard_size=args.shard_size,
                          images=not args.no_images, dtype=args.dtype, device=device, source=args.data,
                          init=args.init and run_folder.normalised("init", args.init), num_workers=args.num_workers,
                          progress=not args.quiet)
    except ValueError as e:
        raise _named("--out", args.out, e) from None
    except DataFileError as e:  # an image damaged after its header
        raise CLIError(f"--data {args.data}: {_data_error(e)}") from None
    except (OSError, SafetensorError) as e:  # a full disk: build_cache removes what it had written
        raise CLIError(f"--out {args.out}: cannot write the cache ({one_line(e)})") from None
    print(out)
    return 0
