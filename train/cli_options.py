"""The options of `backdrop train`: those every stage shares, defined once in parent parsers (`_data_options`,
`_training_options`, `_diffusion_options`), and each stage's own (train/cli.py runs them)."""
from __future__ import annotations

import argparse

from backdrop.train.diffusers_options import ALWAYS_SO, DIFFUSERS_INSTEAD, AlwaysSo, Instead

__all__ = ["add_stage_parsers", "DEFAULT_LR"]

DEFAULT_LR = {"clip": 5e-4, "vae": 1e-4, "pretrain": 1e-4, "inpaint": 5e-5}

CHAIN = """the chain, each stage from the last one's OUT/final (the built-in model's, in short):
  backdrop train clip     --data synthetic:100000 --out runs/clip --preset tiny
  backdrop train vae      --data synthetic:200000 --out runs/vae --init runs/clip/final
  backdrop train cache    --data synthetic:40000 --out cache/tiny --init runs/vae/final
  backdrop train pretrain --data cache/tiny --out runs/pretrain --init runs/vae/final --snr-gamma 5
  backdrop train inpaint  --data cache/tiny --out runs/inpaint --init runs/pretrain/final --snr-gamma 5
  backdrop train inpaint  --data cache/tiny --out runs/product --init runs/inpaint/final --snr-gamma 5 \\
                          --masks product
  backdrop train vae      --data synthetic:200000 --out runs/decoder --init runs/product/final --decoder-only
  backdrop train vae      --data synthetic:200000 --out runs/asym --init runs/decoder/final --decoder-only \\
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


def add_stage_parsers(subparsers) -> tuple[list, argparse.ArgumentParser]:
    """`backdrop train` and its stages' parsers: (the four training stages', the cache's)."""
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
    return [clip, vae, stages.choices["pretrain"], inpaint], cache
