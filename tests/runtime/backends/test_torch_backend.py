"""Torch backend: eager on CPU here; the CUDA-graph tests run wherever a GPU is visible. All on the
trained demo model and phantoms, whose outputs hold several classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldseg.model.config import PRESETS
from ldseg.model.network import LDSeg
from ldseg.runtime.artifacts.source import load_model
from ldseg.runtime.backend import make_inputs
from ldseg.runtime.backends.torch.backend import TorchBackend
from tests.helpers import assert_replays_follow_inputs, assert_several_classes, phantom_images, replay_requests

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a lent device)")


@pytest.fixture(scope="module")
def model() -> LDSeg:
    return load_model("demo")


def _image(model: LDSeg, seed: int, batch: int = 1) -> np.ndarray:
    return phantom_images(model.cfg, range(seed, seed + batch))


def test_backend_equals_model_segment(model):
    image = _image(model, 0, 2)
    out = TorchBackend(model).run(make_inputs(model.cfg, image, [3, 4], steps=4), probabilities=True)
    reference = model.segment(torch.from_numpy(image), [3, 4], steps=4).numpy()
    assert_several_classes(reference.argmax(1), "model.segment labels")
    np.testing.assert_array_equal(out.probabilities, reference)
    np.testing.assert_array_equal(out.labels, reference.argmax(1))
    assert set(out.stage_ms) == {"input_copy", "encoder", "loop", "decoder", "output_copy"}


def test_k_sample_batch_equals_k_single_runs(model):
    image = np.repeat(_image(model, 1), 3, axis=0)
    backend = TorchBackend(model)
    batch = backend.run(make_inputs(model.cfg, image, [7, 8, 9], steps=3), probabilities=True)
    for k, seed in enumerate([7, 8, 9]):
        single = backend.run(make_inputs(model.cfg, image[:1], [seed], steps=3), probabilities=True)
        assert_several_classes(single.labels, f"seed {seed}")
        # float32 kernels block a batch differently: the trained model's probabilities move by ~1e-5
        np.testing.assert_allclose(batch.probabilities[k], single.probabilities[0], atol=1e-4)


@cuda
@pytest.mark.cuda
def test_graph_replay_equals_eager_and_follows_new_inputs(model):
    graphed = TorchBackend(model, "cuda", cuda_graph=True)
    eager = TorchBackend(model, "cuda", cuda_graph=False)
    requests = replay_requests(model.cfg, _image(model, 0, 4), steps=5)
    assert_replays_follow_inputs(graphed, eager, requests, atol=1e-5)
    assert graphed.fallback_reason is None
    assert list(graphed._graphs) == [(2, 2, 5, True, True)]  # eager, captured by the second request, replayed


@cuda
@pytest.mark.cuda
def test_replays_allocate_nothing_and_keep_their_buffers(model):
    backend = TorchBackend(model, "cuda", cuda_graph=True)
    inputs = make_inputs(model.cfg, _image(model, 2), [0], steps=15)
    backend.run(inputs)  # a shape's first request runs eagerly
    assert not backend._graphs
    backend.run(inputs)  # its second captures
    buf = backend.plan(1, 15)
    assert (1, 1, 15, False, True) in backend._graphs
    pointers = [buf.image.data_ptr(), buf.z_init.data_ptr(), buf.labels.data_ptr()]
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    for i in range(100):
        backend.run(make_inputs(model.cfg, _image(model, i % 8), [i], steps=15))
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == allocated
    assert [buf.image.data_ptr(), buf.z_init.data_ptr(), buf.labels.data_ptr()] == pointers


def test_the_model_handed_over_is_never_modified():
    torch.manual_seed(0)
    model = LDSeg(PRESETS["demo"]).train()  # training mode: the backend needs eval, so it must copy
    before = {k: v.clone() for k, v in model.state_dict().items()}
    backend = TorchBackend(model)
    assert model.training and backend.model is not model and not backend.model.training
    on_meta = TorchBackend(model.eval(), "meta", cuda_graph=False)  # another device: a copy moves, not ours
    assert on_meta.model is not model and next(on_meta.model.parameters()).device.type == "meta"
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert TorchBackend(model).model is model  # already in eval mode on the device: no copy needed


def test_fp32_means_tf32_off_inside_every_stage_and_restored_after(model, monkeypatch):
    backend = TorchBackend(model)
    seen = []

    def spy(image):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return original(image)

    original = backend.model.image_encoder.forward
    monkeypatch.setattr(backend.model.image_encoder, "forward", spy)
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32)  # properties, not attributes: monkeypatch cannot undo them
    matmul.allow_tf32 = cudnn.allow_tf32 = True
    try:
        backend.run(make_inputs(model.cfg, _image(model, 0), [0], steps=1))
        assert seen == [(False, False)]
        assert matmul.allow_tf32 and cudnn.allow_tf32  # the caller's settings, back
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved
    assert backend.describe()["tf32"] == "off"


def test_lean_form_agrees_with_the_official_reference_and_leaves_the_callers_model(model):
    """lean=True (what ldseg-run makes) runs the exports' rewrites on a copy of its own: the same
    labels as the official form on the trained demo model, probabilities to float rounding."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lean, official = TorchBackend(model, lean=True), TorchBackend(model)
    assert lean.model is not model and official.model is model
    assert lean.describe()["form"] == "lean" and official.describe()["form"] == "official"
    inputs = make_inputs(model.cfg, _image(model, 5, 2), [5, 6], steps=4)
    got, want = lean.run(inputs, probabilities=True), official.run(inputs, probabilities=True)
    assert_several_classes(want.labels, "official labels")
    assert not np.array_equal(got.probabilities, want.probabilities)  # computed another way
    np.testing.assert_allclose(got.probabilities, want.probabilities, atol=1e-4)
    np.testing.assert_array_equal(got.labels, want.labels)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert TorchBackend(lean.model).describe()["form"] == "lean"  # a lean model is not made official
