"""`python -m ldseg.training` == `ldseg-train` (one command line: ldseg/cli/train.py).

Why the bundled demo model was trained in two stages rather than with the official joint loss from
step 0 (commands in README): on a CPU the joint step pays for full-resolution label encoding,
decoding and image encoding at once, and its segmentation term decodes z_t - eps_hat, which is not
the latent the sampler hands the decoder. A converged autoencoder first, then latent diffusion on
cached latents (the standard latent-diffusion order), reaches the demo's Dice target in a fraction
of the time; the joint recipe stays available (the default when neither --autoencoder-steps nor
--freeze is given).
"""

from ldseg.cli.train import main

main()
