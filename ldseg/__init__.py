"""ldseg: LDSeg latent-diffusion segmentation from PyTorch to ONNX, TensorRT and a CUDA-graph runtime."""

__version__ = "0.1.0"
