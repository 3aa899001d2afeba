"""turbo: one-step image-to-image translation on SD-Turbo (pix2pix-turbo and CycleGAN-Turbo)."""

__version__ = "0.1.0"
