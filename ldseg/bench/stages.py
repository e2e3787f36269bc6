"""Per-stage callables for timing, built by wrapping a backend's pieces.

A stage plan turns one PipelineInputs into zero-argument callables, one per stage in STAGES, each
doing exactly that stage's work. The harness calls them in STAGES order in every pass, so each
stage finds what the previous one left (no extra untimed pass; the end-to-end runs before them
already warmed every kernel):

  input_copy   host arrays -> the backend's device buffers
  encoder      image -> z_image
  step         one fused denoise step
  loop         all N steps
  decoder      latent -> uint8 labels on the device (decoder + argmax)
  output_copy  labels -> host numpy
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from ldseg.model.network import LDSeg
from ldseg.runtime.backend import PipelineInputs

if TYPE_CHECKING:
    from ldseg.runtime.onnxruntime_backend import OnnxRuntimeBackend

STAGES = ("input_copy", "encoder", "step", "loop", "decoder", "output_copy")
StageFns = dict[str, Callable[[], object]]


class StagePlan(Protocol):
    def __call__(self, inputs: PipelineInputs) -> StageFns: ...


class TorchStages:
    """The model pieces TorchBackend runs, called eagerly (on CUDA the backend replays a graph of
    the same kernels; the stage split shows where time goes, the end-to-end row what it costs)."""

    def __init__(self, model: LDSeg, device: str):
        self.model, self.device = model, torch.device(device)

    def __call__(self, inputs: PipelineInputs) -> StageFns:
        model, dev, batch = self.model, self.device, inputs.batch
        arrays = (inputs.image, inputs.z_init, inputs.noise, inputs.table)
        s: dict[str, torch.Tensor] = {}  # what each stage leaves for the next

        def input_copy() -> None:
            s["image"], s["z_init"], s["noise"], s["table"] = (torch.from_numpy(a).to(dev) for a in arrays)

        def encoder() -> None:
            s["z_image"] = model.encode_image(s["image"])

        def step() -> None:
            model.step(s["z_init"], s["z_image"], s["table"][0].expand(batch, 4), s["noise"][0])

        def loop() -> None:
            z = s["z_init"]
            for i in range(inputs.steps):
                z = model.step(z, s["z_image"], s["table"][i].expand(batch, 4), s["noise"][i])
            s["z"] = z

        def decoder() -> None:
            s["labels"] = model.label_decoder(s["z"]).argmax(dim=1).to(torch.uint8)

        def output_copy() -> None:
            s["labels"].cpu().numpy()

        fns: StageFns = {"input_copy": input_copy, "encoder": encoder, "step": step, "loop": loop,
                         "decoder": decoder, "output_copy": output_copy}
        return {name: torch.no_grad()(fn) for name, fn in fns.items()}


class OnnxRuntimeStages:
    """The OnnxRuntimeBackend's own bound sessions and buffers for this batch, run one at a time
    (its public per-batch `pipeline`). As in its
    run(): input_copy writes the image and initial latent, each step refreshes coeffs and noise."""

    def __init__(self, backend: OnnxRuntimeBackend):
        self.backend = backend

    def __call__(self, inputs: PipelineInputs) -> StageFns:
        pipe = self.backend.pipeline(inputs.batch)  # built by the backend, reused
        steps = inputs.steps

        def input_copy() -> None:
            pipe.image.write(inputs.image)
            pipe.z[0].write(inputs.z_init)

        def step() -> None:
            pipe.coeffs.write(inputs.table[0])
            pipe.noise.write(inputs.noise[0])
            pipe.step.run(0)

        def loop() -> None:
            pipe.z[0].write(inputs.z_init)
            for i in range(steps):
                pipe.coeffs.write(inputs.table[i])
                pipe.noise.write(inputs.noise[i])
                pipe.step.run(i % 2)

        # The decoder reads the latent buffer the loop (not the single step) wrote last.
        return {
            "input_copy": input_copy,
            "encoder": pipe.encoder.run,
            "step": step,
            "loop": loop,
            "decoder": lambda: pipe.argmax.run(steps % 2),
            "output_copy": pipe.labels.read,
        }
