"""Models and weights: configs, CLIP, VAE, UNet, tokenizer, checkpoint loading."""
