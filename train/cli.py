"""`backdrop train {clip,vae,pretrain,inpaint,cache}`: the training stages from the command line.

Options every stage shares are defined once, in parent parsers (`_data_options`, `_training_options`,
`_diffusion_options`); a stage adds only its own. Each stage starts from `--init MODEL` (a model folder or file)
or from random weights of `--preset`, trains its component, and writes the whole model to OUT/final/ (a diffusers
folder), which the next stage takes as its --init. Progress goes to tqdm and OUT/log.jsonl, checkpoints to
OUT/checkpoints/ (resume with --resume OUT). Under torchrun every process trains on its own shard of the data
(gloo on CPU, nccl on GPU); --batch-size is per process.

User errors (bad --data, unreadable model, mismatched cache, bad option values) are one line and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from backdrop.cli import CLIError

__all__ = ["add_parser"]

STAGES = ("clip", "vae", "pretrain", "inpaint")
DEFAULT_LR = {"clip": 5e-4, "vae": 1e-4, "pretrain": 1e-4, "inpaint": 5e-5}
CALIBRATION_IMAGES = 64  # images the vae stage measures the latent scaling factor on

CHAIN = """the chain, each stage from the last one's OUT/final:
  backdrop train clip     --data synthetic:20000 --out runs/clip --preset tiny
  backdrop train vae      --data synthetic:20000 --out runs/vae --init runs/clip/final
  backdrop train cache    --data synthetic:20000 --out cache/tiny --init runs/vae/final
  backdrop train pretrain --data cache/tiny --out runs/pretrain --init runs/vae/final
  backdrop train inpaint  --data cache/tiny --out runs/inpaint --init runs/pretrain/final
  backdrop train inpaint  --data cache/tiny --out runs/product --init runs/inpaint/final --masks product"""


def _data_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("data and model")
    g.add_argument("--data", required=True, metavar="SPEC",
                   help="'synthetic:N' (N images of the built-in procedural product world), a folder of images "
                        "with captions (see train/data.py), a metadata .jsonl, or a latent cache folder made by "
                        "`backdrop train cache` (pretrain and inpaint only)")
    g.add_argument("--out", required=True, metavar="DIR", help="where the run writes log.jsonl, checkpoints/ and "
                                                               "final/ (the cache command: the cache folder)")
    g.add_argument("--init", metavar="MODEL", help="start from this model folder or .safetensors file (usually "
                                                   "the previous stage's OUT/final); default: random weights")
    g.add_argument("--preset", default="tiny", metavar="NAME",
                   help="model shape for random weights when there is no --init (default: %(default)s)")
    g.add_argument("--size", type=int, metavar="PX", help="training images are PX x PX (default: the model's "
                                                          "native size, 64 for tiny)")
    g.add_argument("--batch-size", type=int, default=8, metavar="B", help="images per step and process "
                                                                          "(default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seeds the data order, the random draws and random "
                                                       "weights (default: %(default)s)")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if present, else cpu)")
    g.add_argument("--num-workers", type=int, default=0, metavar="N", help="data loading processes (default: 0)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _training_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=1000, metavar="N", help="optimizer steps (default: %(default)s)")
    g.add_argument("--lr", type=float, metavar="LR", help="peak learning rate, AdamW with cosine decay (default: "
                   + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    g.add_argument("--warmup", type=int, default=0, metavar="N", help="linear warm-up steps (default: 0)")
    g.add_argument("--weight-decay", type=float, default=1e-2, metavar="W", help="AdamW weight decay (default: "
                                                                                 "%(default)s)")
    g.add_argument("--grad-clip", type=float, default=1.0, metavar="NORM", help="clip the gradient norm; 0 turns "
                                                                                "it off (default: %(default)s)")
    g.add_argument("--grad-accum", type=int, default=1, metavar="K", help="accumulate K batches per step "
                                                                          "(default: 1)")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast precision; weights stay fp32 (default: %(default)s)")
    g.add_argument("--ema-decay", type=float, default=0.0, metavar="D", help="keep an EMA of the weights and ship "
                                                                             "it, e.g. 0.999; 0: off (default)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, ~30%% slower")
    g.add_argument("--save-every", type=int, default=0, metavar="K", help="checkpoint every K steps (default: "
                                                                          "only at the end)")
    g.add_argument("--keep-last", type=int, default=2, metavar="N", help="checkpoints to keep (default: 2)")
    g.add_argument("--log-every", type=int, default=10, metavar="K", help="log every K steps (default: 10)")
    g.add_argument("--resume", metavar="DIR", help="continue a run from its OUT (the newest checkpoint) or from "
                                                   "one OUT/checkpoints/step-N; give the same options as before")
    return p


def _diffusion_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("diffusion loss")
    g.add_argument("--prediction", choices=("epsilon", "v_prediction"),
                   help="what the UNet predicts (default: the model's own, epsilon for SD1/tiny)")
    g.add_argument("--snr-gamma", type=float, default=0.0, metavar="G",
                   help="min-SNR-γ loss weighting (Hang et al. 2023); 5 is the recommended value; 0: off")
    g.add_argument("--noise-offset", type=float, default=0.0, metavar="S",
                   help="offset noise scale, e.g. 0.05: lets the model make very dark or bright images; 0: off")
    g.add_argument("--input-perturbation", type=float, default=0.0, metavar="S",
                   help="input perturbation (Ning et al. 2023), e.g. 0.1; 0: off")
    g.add_argument("--zero-terminal-snr", action="store_true",
                   help="rescale the noise schedule to reach pure noise (Lin et al. 2023); needs --prediction "
                        "v_prediction")
    g.add_argument("--caption-dropout", type=float, default=0.1, metavar="P",
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
    inpaint.add_argument("--product-prob", type=float, default=1.0, metavar="P",
                         help="with --masks product: the share of product masks, the rest random (default: 1)")
    inpaint.add_argument("--latent-mask", choices=("diffusers", "max"), default="diffusers",
                         help="mask to latent size as diffusers' pipeline does (nearest) or as Backdrop's "
                              "pipeline default does (max) (default: %(default)s)")

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
    cache.add_argument("--no-images", action="store_true", help="do not keep the pixels (smaller; pretrain only: "
                                                                "inpaint needs them)")
    cache.set_defaults(func=_run_cache)


# ------------------------------------------------------------------------------------------------ running

def _device(args):
    import torch

    if args.device:
        try:
            return torch.device(args.device)
        except RuntimeError as e:
            raise CLIError(f"--device {args.device!r}: {e}") from None
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _distributed(args) -> tuple[int, int, object]:
    """(rank, world size, device); under torchrun (WORLD_SIZE > 1) it joins the process group."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = _device(args)
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise CLIError(f"process {local} of this machine needs cuda:{local}, and there are "
                           f"{torch.cuda.device_count()} GPUs: run at most that many processes per node "
                           "(--nproc_per_node), or --device cpu")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def _model(args):
    from backdrop.nn.checkpoint import init_model, load_model

    if args.init:
        init = Path(args.init)
        if not (init / "model_index.json").is_file() and (init / "final" / "model_index.json").is_file():
            raise CLIError(f"--init {init} is a training run's folder; its model is {init / 'final'}")
        return load_model(init)
    return init_model(args.preset, seed=args.seed)


def _dataset(args, stage: str, size: int, model):
    from backdrop.train.cache import LatentCache, is_cache
    from backdrop.train.data import make_dataset

    if is_cache(args.data):
        if stage not in ("pretrain", "inpaint"):
            raise CLIError(f"--data {args.data} is a latent cache; the {stage} stage trains an encoder the cache "
                           "stands in for, so give it images (synthetic:N or an image folder)")
        data = LatentCache(args.data)
        data.check(model, size)
        if stage == "inpaint" and not data.has_images:
            raise CLIError(f"--data {args.data}: cache built with --no-images; inpaint encodes masked images, "
                           "so it needs them")
    else:
        # Synthetic data is World(0), the world the evaluator holds its seeds out from; --seed orders the data.
        data = make_dataset(args.data, size, seed=0)
    if stage == "inpaint" and args.masks == "product" and not data.has_masks:
        raise CLIError(f"--data {args.data} has no product masks, which --masks product needs")
    return data


def _stage(args, name: str, model, data, size: int, device):
    from backdrop.train.stages.common import DiffusionOptions

    if name == "clip":
        from backdrop.train.stages.clip import IMAGE_ENCODER, ClipStage, vision_config

        given = [args.vision_width, args.vision_layers, args.vision_heads, args.vision_patch]
        vision = None
        if any(x is not None for x in given) or not (args.init and (Path(args.init) / IMAGE_ENCODER).is_dir()):
            w, layers, heads, patch = (x if x is not None else d for x, d in zip(given, (128, 4, 4, 8)))
            vision = vision_config(size, model.config.text.projection_dim, w, layers, heads, patch)
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
    options = DiffusionOptions(args.prediction, args.snr_gamma, args.noise_offset, args.input_perturbation,
                               args.zero_terminal_snr, args.caption_dropout)
    if name == "pretrain":
        from backdrop.train.stages.pretrain import PretrainStage

        return PretrainStage(model, options, device, args.init)
    from backdrop.train.stages.inpaint import InpaintStage

    return InpaintStage(model, options, device, args.init, args.masks, args.product_prob, args.latent_mask)


def _run_stage(args) -> int:
    import torch.distributed as dist

    from backdrop.train import checkpointing
    from backdrop.train.core import TrainConfig, Trainer
    from backdrop.train.data import DataStream

    name, out = args.stage, Path(args.out)
    if not args.resume and checkpointing.list_checkpoints(out / "checkpoints"):
        raise CLIError(f"--out {out} already holds checkpoints of a run; pass --resume {out} to continue it, or "
                       "choose another --out")
    try:
        rank, world, device = _distributed(args)
        try:
            model = _model(args)
            size = args.size or model.config.image_size
            if size % model.config.vae.downsample_factor:
                raise CLIError(f"--size {size} is not a multiple of the VAE's {model.config.vae.downsample_factor}")
            data = _dataset(args, name, size, model)
            stage = _stage(args, name, model, data, size, device)
            cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                              lr=args.lr if args.lr is not None else DEFAULT_LR[name], weight_decay=args.weight_decay,
                              warmup_steps=args.warmup, grad_clip=args.grad_clip, precision=args.precision,
                              ema_decay=args.ema_decay, gradient_checkpointing=args.gradient_checkpointing,
                              save_every=args.save_every, keep_last=args.keep_last, log_every=args.log_every,
                              seed=args.seed)
            loader = DataStream(data, args.batch_size, seed=args.seed, rank=rank, world_size=world,
                                num_workers=args.num_workers)
            trainer = Trainer(stage, loader, cfg, out, device=device, progress=not args.quiet)
            if args.resume:
                trainer.resume(args.resume)
        except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
            raise CLIError(str(e).splitlines()[0]) from None
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            record = {k: v for k, v in vars(args).items() if k != "func"} | {"world_size": world}
            (out / "args.json").write_text(json.dumps(record, indent=2) + "\n")
        trainer.fit()
        final = trainer.save_final()
        if world > 1:
            dist.barrier()
        if rank == 0:
            print(final)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _run_cache(args) -> int:
    from backdrop.train.cache import build_cache, is_cache
    from backdrop.train.data import make_dataset

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CLIError("the cache command runs in one process; start it without torchrun")
    if is_cache(args.data):
        raise CLIError(f"--data {args.data} is already a latent cache; give the images it should encode")
    try:
        model = _model(args)
        size = args.size or model.config.image_size
        data = make_dataset(args.data, size, seed=0)
        out = build_cache(model, data, args.out, batch_size=args.batch_size, shard_size=args.shard_size,
                          images=not args.no_images, dtype=args.dtype, device=_device(args), source=args.data,
                          progress=not args.quiet)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e).splitlines()[0]) from None
    print(out)
    return 0
