"""runtime/artifacts/cache.py: keys, reuse, invalidation, the lock across processes, a full disk, list/clear.

Builders are the fakes of cache_fakes.py (real manifests, placeholder graphs): these tests are about
the cache, not the exporter; tests/runtime/artifacts/test_cache_cli.py runs the real export end to end."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import platformdirs
import pytest

from ldseg.errors import ArtifactError, BackendUnavailable, OutputError
from ldseg.io.atomic import staged_folder
from ldseg.runtime.artifacts import cache as cache_module
from ldseg.runtime.artifacts.bundle import MANIFEST, REWRITES
from ldseg.runtime.artifacts.cache import (
    BUNDLES,
    ArtifactCache,
    BundleKey,
    CheckpointRef,
    EngineKey,
    StaleEntry,
    cache_root,
)
from ldseg.runtime.artifacts.cache_listing import clear, list_entries
from tests.runtime.artifacts.cache_fakes import GPU_A, GPU_B, FakeBundleBuilder, FakeEngineBuilder, Notes, hashed_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def notes() -> Notes:
    return Notes()


@pytest.fixture()
def builder() -> FakeBundleBuilder:
    return FakeBundleBuilder()


@pytest.fixture()
def cache(tmp_path: Path, builder: FakeBundleBuilder, notes: Notes) -> ArtifactCache:
    return ArtifactCache(tmp_path / "cache", build_bundle=builder, reporter=notes)


# --------------------------------------------------------------------------- where and what


def test_root_is_ldseg_cache_or_the_platform_user_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LDSEG_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv("LDSEG_CACHE")
    assert cache_root() == Path(platformdirs.user_cache_dir("ldseg"))


def test_bundle_key_changes_with_each_field() -> None:
    key = BundleKey("ab" * 32, "demo", "fp32", 18, 1, "0.1.0")
    assert key.name == BundleKey("ab" * 32, "demo", "fp32", 18, 1, "0.1.0").name
    others = [
        replace(key, checkpoint_sha256="cd" * 32),
        replace(key, precision="fp16"),
        replace(key, opset=19),
        replace(key, batch=2),
        replace(key, ldseg_version="0.2.0"),
    ]
    assert len({key.name, *(k.name for k in others)}) == 6


def test_engine_key_changes_with_gpu_capability_tensorrt_and_bundle() -> None:
    key = EngineKey(BundleKey("ab" * 32, "demo", "fp16", 18, 1), "ee" * 32, "NVIDIA L4", "8.9", "10.13.0.35", 1)
    others = [
        replace(key, gpu_name="NVIDIA H100"),
        replace(key, compute_capability="9.0"),
        replace(key, tensorrt_version="10.12.0"),
        replace(key, bundle_hash="ff" * 32),
        replace(key, max_batch=8),
    ]
    assert len({key.name, *(k.name for k in others)}) == 6


# --------------------------------------------------------------------------- reuse and invalidation


def test_first_use_builds_then_every_later_use_reuses(
    cache: ArtifactCache, builder: FakeBundleBuilder, notes: Notes
) -> None:
    model = hashed_model()
    first = cache.bundle(model)
    assert (first / MANIFEST).is_file() and len(builder.calls) == 1
    assert notes.builds and notes.builds[0][0].startswith("exporting the fp32 ONNX bundle")
    second = ArtifactCache(cache.root, build_bundle=builder, reporter=notes).bundle(model)  # as a new process would
    assert second == first and len(builder.calls) == 1
    assert any(line.startswith("cached: fp32 ONNX bundle") for line in notes.lines)
    assert [hit.built for hit in cache.hits] == [True]


def test_another_checkpoint_or_precision_is_another_entry(cache: ArtifactCache, builder: FakeBundleBuilder) -> None:
    a = cache.bundle(hashed_model("ab" * 32))
    b = cache.bundle(hashed_model("cd" * 32))
    c = cache.bundle(hashed_model("ab" * 32), precision="fp16")
    assert len({a, b, c}) == 3 and len(builder.calls) == 3


def _rebuilt_because(cache: ArtifactCache, builder: FakeBundleBuilder, notes: Notes, reason: str) -> None:
    path = cache.bundle(hashed_model())
    assert len(builder.calls) == 2, "the bad entry was not rebuilt"
    rebuilt = [line for line in notes.lines if line.startswith("cache: rebuilding")]
    assert len(rebuilt) == 1 and reason in rebuilt[0], notes.lines
    cache_module.check_bundle(path, builder.calls[-1])  # the new entry is sound


def test_a_tampered_graph_is_rebuilt_with_the_reason(
    cache: ArtifactCache, builder: FakeBundleBuilder, notes: Notes
) -> None:
    path = cache.bundle(hashed_model())
    (path / "decoder.onnx").write_bytes(b"flipped")
    _rebuilt_because(cache, builder, notes, "SHA-256 does not match")


def test_an_entry_for_another_checkpoint_is_rebuilt(
    cache: ArtifactCache, builder: FakeBundleBuilder, notes: Notes
) -> None:
    path = cache.bundle(hashed_model())
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["checkpoint_hash"] = "00" * 32
    (path / MANIFEST).write_text(json.dumps(manifest))
    _rebuilt_because(cache, builder, notes, "records checkpoint")


def test_an_entry_exported_before_a_rewrite_changed_is_rebuilt(
    cache: ArtifactCache, builder: FakeBundleBuilder, notes: Notes
) -> None:
    """E.g. a bundle from before the denoiser's norms were fused: same checkpoint and ldseg version,
    older graphs."""
    path = cache.bundle(hashed_model())
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["rewrites"] == list(REWRITES)
    manifest["rewrites"] = ["upsample_phase", "batchnorm_folded"]
    (path / MANIFEST).write_text(json.dumps(manifest))
    _rebuilt_because(cache, builder, notes, "records rewrites")


def test_an_entry_with_older_rewrites_is_used_as_it_is_where_it_cannot_be_exported_again(
    cache: ArtifactCache, builder: FakeBundleBuilder, notes: Notes
) -> None:
    """A runtime-only install (no PyTorch) keeps running its older, still valid bundle, and says so."""
    model = hashed_model()
    path = cache.bundle(model)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["rewrites"] = ["upsample_phase", "batchnorm_folded"]
    (path / MANIFEST).write_text(json.dumps(manifest))

    def no_torch() -> None:
        raise BackendUnavailable("exporting needs PyTorch, which this runtime-only install lacks")

    ref = CheckpointRef(str(model.checkpoint_hash), model.cfg.preset, lambda: model, no_torch)
    assert cache.bundle(ref) == path
    assert len(builder.calls) == 1, "rebuilt although it could not be"
    [used] = [line for line in notes.lines if line.startswith("cache: using")]
    assert "records rewrites" in used and "runtime-only" in used
    with pytest.raises(StaleEntry):
        cache_module.check_bundle(path, builder.calls[-1])  # still stale: the next full install re-exports


def test_an_unvalidated_entry_is_rebuilt(cache: ArtifactCache, builder: FakeBundleBuilder, notes: Notes) -> None:
    path = cache.bundle(hashed_model())
    manifest = json.loads((path / MANIFEST).read_text())
    del manifest["validation"]
    (path / MANIFEST).write_text(json.dumps(manifest))
    _rebuilt_because(cache, builder, notes, "no validation verdict")


def test_a_half_entry_without_manifest_is_rebuilt(
    cache: ArtifactCache, builder: FakeBundleBuilder, notes: Notes
) -> None:
    path = cache.bundle(hashed_model())
    (path / MANIFEST).unlink()
    _rebuilt_because(cache, builder, notes, "no manifest.json")


def test_a_failed_validation_caches_nothing(cache: ArtifactCache) -> None:
    def failing(model, target, key, progress):  # type: ignore[no-untyped-def]
        raise ArtifactError(f"{target}: not written: the bundle failed validation")

    cache.build_bundle = failing
    with pytest.raises(ArtifactError, match="failed validation"):
        cache.bundle(hashed_model())
    assert [p.name for p in (cache.root / BUNDLES).iterdir() if not p.name.endswith(".lock")] == []


def test_a_full_disk_leaves_no_half_entry_and_exits_5(cache: ArtifactCache) -> None:
    def fills_the_disk(model, target, key, progress):  # type: ignore[no-untyped-def]
        with staged_folder(target, overwrite=False, marker=MANIFEST) as tmp:
            (tmp / "encoder.onnx").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")

    cache.build_bundle = fills_the_disk
    with pytest.raises(OutputError, match="no space left on device") as refused:
        cache.bundle(hashed_model())
    assert refused.value.exit_code == 5
    assert [p.name for p in (cache.root / BUNDLES).iterdir() if not p.name.endswith(".lock")] == []


def test_an_unwritable_cache_is_an_output_error(tmp_path: Path, builder: FakeBundleBuilder) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError):
        ArtifactCache(blocker / "cache", build_bundle=builder).bundle(hashed_model())


# --------------------------------------------------------------------------- engines


def test_engines_are_built_per_gpu_and_reused_on_the_same_one(cache: ArtifactCache, notes: Notes) -> None:
    bundle = cache.bundle(hashed_model(), precision="fp16")
    on_a = FakeEngineBuilder(GPU_A)
    cache.build_engines = on_a
    first = cache.engines(bundle, GPU_A, max_batch=2)
    again = cache.engines(bundle, GPU_A, max_batch=2)
    assert first == again and len(on_a.calls) == 1
    _, max_batch, timing = on_a.calls[0]
    assert max_batch == 2 and timing.parent == cache.root / "tensorrt"  # the timing cache is kept in the cache
    cache.build_engines = FakeEngineBuilder(GPU_B)
    assert cache.engines(bundle, GPU_B, max_batch=2) != first  # another GPU: another entry


def test_tampered_engine_is_rebuilt(cache: ArtifactCache, notes: Notes) -> None:
    bundle = cache.bundle(hashed_model(), precision="fp16")
    on_a = FakeEngineBuilder(GPU_A)
    cache.build_engines = on_a
    path = cache.engines(bundle, GPU_A)
    (path / "encoder.engine").write_bytes(b"flipped")
    cache.engines(bundle, GPU_A)
    assert len(on_a.calls) == 2
    assert any("rebuilding" in line and "SHA-256" in line for line in notes.lines), notes.lines


# --------------------------------------------------------------------------- two processes

_RACER = """
import sys, time
from pathlib import Path
from ldseg.io.atomic import staged_folder
from ldseg.runtime.artifacts.cache import ArtifactCache

root, me, other = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
(root.parent / f"ready-{me}").touch()
deadline = time.monotonic() + 120
while not (root.parent / f"ready-{other}").exists():  # start together
    assert time.monotonic() < deadline
    time.sleep(0.01)

def build(target, progress):
    with open(root.parent / "builds.log", "a") as log:
        log.write(me + "\\n")
    with staged_folder(target, overwrite=False, marker="done") as tmp:
        time.sleep(2.0)  # long enough for the other process to arrive and wait
        (tmp / "done").write_text(me)

class Say:
    def note(self, line): print(line, flush=True)
    def warn(self, line): print(line, flush=True)
    def building(self, action, path):
        import contextlib
        return contextlib.nullcontext(print)

def check(path):
    from ldseg.errors import ArtifactError
    if not (path / "done").is_file():
        raise ArtifactError(f"{path}: incomplete")

path = ArtifactCache(root, reporter=Say()).entry("bundles", "shared", "test entry", check, build)
print("PATH", path, (path / "done").read_text(), flush=True)
"""


def test_two_processes_asking_for_one_entry_build_it_once(tmp_path: Path) -> None:
    script = tmp_path / "racer.py"
    script.write_text(_RACER)
    root = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(root), me, other],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for me, other in (("one", "two"), ("two", "one"))
    ]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_stdout, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr
    builds = (tmp_path / "builds.log").read_text().split()
    assert len(builds) == 1, builds
    results = {line for stdout, _ in outputs for line in stdout.splitlines() if line.startswith("PATH")}
    assert results == {f"PATH {root / 'bundles' / 'shared'} {builds[0]}"}  # both got the one entry
    reuser = [stdout for stdout, _ in outputs if "cached: test entry" in stdout]
    assert len(reuser) == 1, outputs


# --------------------------------------------------------------------------- list / clear


def test_list_shows_entries_sizes_and_last_use_and_clear_removes_the_old(cache: ArtifactCache) -> None:
    old = cache.bundle(hashed_model("ab" * 32))
    new = cache.bundle(hashed_model("cd" * 32))
    long_ago = time.time() - 40 * 86400
    os.utime(old, (long_ago, long_ago))
    entries = list_entries(cache.root)
    assert [e.path for e in entries] == [new, old]  # most recent first
    assert all(e.bytes > 0 and e.kind == BUNDLES for e in entries)
    removed, busy = clear(cache.root, older_than_days=30)
    assert [e.path for e in removed] == [old] and busy == [] and new.exists() and not old.exists()
    cache.bundle(hashed_model("cd" * 32))  # a hit refreshes last use
    assert list_entries(cache.root)[0].last_used > long_ago
    removed, _ = clear(cache.root)
    assert [e.path for e in removed] == [new] and list_entries(cache.root) == []


def test_clear_leaves_an_entry_being_built(cache: ArtifactCache) -> None:
    import filelock

    staged = cache.root / BUNDLES / ".busy.abc123.tmp"
    staged.mkdir(parents=True)
    with filelock.FileLock(str(cache.root / BUNDLES / "busy.lock")):
        removed, busy = clear(cache.root)
    assert removed == [] and [e.path for e in busy] == [staged]
    removed, _ = clear(cache.root)  # the builder died: its leftover goes
    assert [e.path for e in removed] == [staged]
