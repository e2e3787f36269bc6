"""Training: the official LDSeg recipe (plus an autoencoder warm-up and latent-only fine-tuning),
on a folder of NIfTI pairs or on synthetic phantoms. Entry point: `train(TrainOptions(...))`."""

from ldseg.training.evaluate import evaluate_demo
from ldseg.training.options import OptionsError, TrainOptions, TrainResult
from ldseg.training.trainer import train

__all__ = ["OptionsError", "TrainOptions", "TrainResult", "evaluate_demo", "train"]
