"""The torch backend's reduced precisions on CPU (issue 31): bf16 by autocast on the trained demo
model against FP32, the FP32 islands, fp16 refused on the CPU before anything is loaded, the
accuracy gate (refuses a broken reduced path, caches its verdict), and torch.compile's fallback."""

from __future__ import annotations

import json
import os
import tempfile
import warnings

import numpy as np
import pytest
import torch

from ldseg.errors import BackendUnavailable
from ldseg.model import layers
from ldseg.model.network import LDSeg
from ldseg.runtime.artifacts.source import Source, load_model
from ldseg.runtime.backend import make_inputs
from ldseg.runtime.backends.torch import compile as torch_compile
from ldseg.runtime.backends.torch import gate
from ldseg.runtime.backends.torch.backend import TorchBackend
from ldseg.runtime.select import Wants, select_backend
from tests.helpers import assert_several_classes, phantom_images


@pytest.fixture(scope="module")
def model() -> LDSeg:
    return load_model("demo")


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A cache folder of this test's own: a verdict stored by one test must not decide another's."""
    monkeypatch.setenv("LDSEG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_bf16_on_cpu_agrees_with_fp32_end_to_end(model):
    images, seeds = phantom_images(model.cfg, range(3)), [0, 1, 2]
    fp32, bf16 = TorchBackend(model), TorchBackend(model, precision="bf16")
    equal, total = 0, 0
    for k, seed in enumerate(seeds):
        inputs = make_inputs(model.cfg, images[k : k + 1], [seed])
        want, got = fp32.run(inputs, probabilities=True), bf16.run(inputs, probabilities=True)
        assert_several_classes(want.labels, f"fp32 labels of phantom {seed}")
        assert got.probabilities is not None and got.probabilities.dtype == np.float32
        assert got.labels.dtype == np.uint8
        assert not np.array_equal(got.probabilities, want.probabilities)  # bf16 really ran: not the FP32 path
        equal, total = equal + int((got.labels == want.labels).sum()), total + want.labels.size
    assert equal / total >= 0.995, f"bf16 vs fp32: {100 * equal / total:.3f} % of voxels"
    assert bf16.describe()["precision"] == "bf16" and bf16.describe()["tf32"] == "off"


def test_fp32_islands_under_autocast(model):
    """GroupNorm returns the reduced type but computes in FP32; the step's update and the softmax are FP32."""
    norm = layers.GroupNorm(2, 8).eval()
    x = torch.randn(1, 8, 4, 4, 4) * 50 + 300  # a large mean: BF16 statistics would lose it
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        out = norm(x.to(torch.bfloat16))
    expected = norm(x.to(torch.bfloat16).float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.to(torch.bfloat16).float())
    backend = TorchBackend(model, precision="bf16")
    inputs = make_inputs(model.cfg, phantom_images(model.cfg, [0]), [0], steps=2)
    plan = backend.plan(1, 2)
    z = backend.copy_in(plan, inputs)
    backend.encode(plan)
    assert plan.z_image is not None and plan.z_image.dtype == torch.float32
    z = backend.step(plan, z, 0)
    assert z.dtype == torch.float32
    flat = z.reshape(1, -1)
    torch.testing.assert_close(flat.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)  # renormalized in FP32
    backend.decode(plan, z, True)
    assert plan.probabilities is not None and plan.probabilities.dtype == torch.float32


def test_fp16_on_cpu_is_refused_before_the_model_loads():
    source = Source(checkpoint="demo")
    with pytest.raises(BackendUnavailable, match="torch backend runs fp32, bf16 here, not fp16"):
        select_backend(source, backend="torch", device="cpu", wants=Wants("fp16"))
    assert "model" not in source._memo
    with pytest.raises(ValueError, match="precision 'int8'"):
        TorchBackend(load_model("demo"), precision="int8")


def test_auto_stays_fp32(private_cache):
    selection = select_backend(Source(checkpoint="demo"), backend="torch", device="cpu")
    assert selection.backend.precision == "fp32" and selection.gate is None
    assert selection.backend.describe()["form"] == "lean"  # what the run path makes: the exports' rewrites
    assert not (private_cache / gate.GATE_DIR).exists()  # no gate for FP32


def test_gate_passes_bf16_and_its_cached_verdict_is_reported(private_cache, monkeypatch):
    selection = select_backend(Source(checkpoint="demo"), backend="torch", device="cpu", wants=Wants("bf16"))
    assert selection.backend.precision == "bf16" and selection.backend.describe()["form"] == "lean"
    [stored] = (private_cache / gate.GATE_DIR).glob("*.json")
    verdict = json.loads(stored.read_text())
    assert verdict["agreement"] >= gate.GATE_AGREEMENT and verdict["phantoms"] == gate.GATE_PHANTOMS
    assert selection.gate is not None and selection.gate.startswith("bf16 gate: ")
    assert f"{100 * verdict['agreement']:.2f} % of voxels equal to fp32" in selection.gate
    assert selection.gate in selection.brief(gpu_present=False) and selection.gate in selection.why
    assert selection.backend.describe()["gate"] == selection.gate

    def no_measuring(*args, **kwargs):
        raise AssertionError("the second process must read the cached verdict")

    monkeypatch.setattr(gate, "measure", no_measuring)
    again = select_backend(Source(checkpoint="demo"), backend="torch", device="cpu", wants=Wants("bf16"))
    assert again.gate is not None and again.gate.endswith("cached)")

    # Other model or backend code (an edited layer, a new autocast rule): the verdict is measured again.
    monkeypatch.setattr(gate, "code_digest", lambda *parts: "0" * 16)
    with pytest.raises(AssertionError, match="must read the cached verdict"):
        select_backend(Source(checkpoint="demo"), backend="torch", device="cpu", wants=Wants("bf16"))


def _broken_group_norm(monkeypatch):
    """The reduced path goes wrong: GroupNorm under autocast skips its normalization."""
    original = layers.GroupNorm.forward

    def forward(self, x):
        if layers.reduced(x):
            return x * 0.5
        return original(self, x)

    monkeypatch.setattr(layers.GroupNorm, "forward", forward)


def test_gate_refuses_a_broken_reduced_path_and_remembers(private_cache, monkeypatch):
    _broken_group_norm(monkeypatch)
    with pytest.raises(BackendUnavailable, match=r"below the 99\.5 % bar: use --precision fp32") as refused:
        select_backend(Source(checkpoint="demo"), backend="torch", device="cpu", wants=Wants("bf16"))
    assert "torch bf16 on cpu agrees with fp32 on " in str(refused.value)
    [stored] = (private_cache / gate.GATE_DIR).glob("*.json")
    assert json.loads(stored.read_text())["agreement"] < gate.GATE_AGREEMENT
    # A later process: refused from the cached verdict, before the model is loaded or measured.
    monkeypatch.setattr(gate, "measure", lambda *a, **k: pytest.fail("a cached refusal measures nothing"))
    source = Source(checkpoint="demo")
    with pytest.raises(BackendUnavailable, match=r"below the 99\.5 % bar"):
        select_backend(source, backend="torch", device="cpu", wants=Wants("bf16"))
    assert "model" not in source._memo


def test_gate_measures_the_backend_it_is_given(model, monkeypatch):
    """Directly, without the cache: the broken path is measured far below the bar, the sound one above."""
    sound = gate.measure(TorchBackend(model, precision="bf16"), phantoms=2)
    _broken_group_norm(monkeypatch)
    broken = gate.measure(TorchBackend(model, precision="bf16"), phantoms=2)
    assert sound.passed and not broken.passed, (sound, broken)
    with pytest.raises(BackendUnavailable, match="below the"):
        gate.hold(TorchBackend(model, precision="bf16"), None, broken)


def test_compile_is_cuda_only_and_falls_back_to_eager(model, monkeypatch):
    inputs = make_inputs(model.cfg, phantom_images(model.cfg, [1]), [1], steps=3)
    eager = TorchBackend(model).run(inputs, probabilities=True)
    on_cpu = TorchBackend(model, compile=True)
    assert on_cpu.describe()["compile"] == "off (CUDA only)"

    def raising(*args, **kwargs):
        raise RuntimeError("inductor is not available here")

    monkeypatch.setattr(torch, "compile", raising)
    with pytest.warns(UserWarning, match="torch.compile of the denoiser failed, running it eagerly"):
        wrapped = torch_compile.Compiled("denoiser", model.step, enabled=True)
    assert "failed, eager (RuntimeError: inductor is not available here)" in wrapped.state()

    def failing_at_first_call(fn, **options):
        return lambda *args: raising()

    monkeypatch.setattr(torch, "compile", failing_at_first_call)
    backend = TorchBackend(model)
    backend._encode = torch_compile.Compiled("encoder", backend.model.encode_image, enabled=True)
    backend._denoise = torch_compile.Compiled("denoiser", backend.model.step, enabled=True)
    backend._decode = torch_compile.Compiled("decoder", backend.model.label_decoder, enabled=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = backend.run(inputs, probabilities=True)
    assert len(caught) == 3  # once per stage, not once per step
    np.testing.assert_array_equal(got.probabilities, eager.probabilities)
    assert backend.describe()["compile"].count("failed, eager") == 3


def test_compile_is_asked_for_by_env_and_caches_under_the_project(private_cache, monkeypatch):
    # set, then deleted: monkeypatch then removes what inductor_cache_dir() sets in os.environ afterwards
    monkeypatch.setenv(torch_compile.INDUCTOR_CACHE_ENV, "unset-below")
    monkeypatch.delenv(torch_compile.INDUCTOR_CACHE_ENV)
    monkeypatch.setenv(torch_compile.COMPILE_ENV, "1")
    assert torch_compile.compile_wanted(None) and not torch_compile.compile_wanted(False)
    assert torch_compile.inductor_cache_dir() == str(private_cache / "torch-inductor")
    monkeypatch.setenv(torch_compile.COMPILE_ENV, "0")
    assert not torch_compile.compile_wanted(None)


def test_torch_default_cache_folder_is_not_taken_for_a_choice(private_cache, monkeypatch):
    torch_default = os.path.join(tempfile.gettempdir(), "torchinductor_someone")
    monkeypatch.setenv(torch_compile.INDUCTOR_CACHE_ENV, torch_default)
    assert torch_compile.inductor_cache_dir() == str(private_cache / "torch-inductor")
    chosen = str(private_cache / "my-inductor-cache")
    monkeypatch.setenv(torch_compile.INDUCTOR_CACHE_ENV, chosen)
    assert torch_compile.inductor_cache_dir() == chosen
