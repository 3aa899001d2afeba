"""turbo training: datasets, losses, the CLIP discriminator, metrics, trainers."""
