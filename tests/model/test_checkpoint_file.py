"""ldseg/model/checkpoint_file.py: the torch-free header and content hash agree with the torch side."""

from pathlib import Path

import pytest
from safetensors.torch import load_file

from ldseg.errors import ArtifactError
from ldseg.model.checkpoint import tensors_hash
from ldseg.model.checkpoint_file import read_metadata, verified_metadata
from ldseg.runtime.artifacts.source import demo_checkpoint_path


def test_numpy_digest_is_the_torch_digest():
    path = demo_checkpoint_path()
    meta = verified_metadata(path)
    assert meta["content_sha256"] == tensors_hash(load_file(str(path))) == read_metadata(path)["content_sha256"]


def test_altered_tensors_are_refused(tmp_path: Path):
    data = bytearray(demo_checkpoint_path().read_bytes())
    data[-8:] = bytes(8)  # the last tensor's bytes
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="content hash mismatch"):
        verified_metadata(bad)
