"""Class names and colours in ModelConfig (used by DICOM SEG), and checkpoints written before them."""

from __future__ import annotations

import dataclasses

import pytest

from ldseg.errors import ArtifactError
from ldseg.model.checkpoint import load_checkpoint, read_metadata
from ldseg.model.config import PRESETS, ModelConfig
from ldseg.runtime.artifacts.source import demo_checkpoint_path


def test_presets_name_their_classes():
    assert PRESETS["knee3d"].names == ("background", "femur", "tibia")
    assert PRESETS["glas2d"].names == ("background", "gland")
    for cfg in PRESETS.values():
        assert len(cfg.names) == len(cfg.colors) == cfg.num_classes


def test_old_config_without_names_gets_its_presets():
    old = PRESETS["knee3d"].to_dict()
    del old["class_names"], old["class_colors"]
    assert ModelConfig.from_dict(old).names == ("background", "femur", "tibia")
    # the bundled demo checkpoint predates the fields and still loads, named
    assert "class_names" not in read_metadata(demo_checkpoint_path())["config"]
    assert load_checkpoint(demo_checkpoint_path()).cfg.names == ("background", "structure 1", "structure 2")


def test_unknown_or_mismatched_configs_get_generic_names():
    old = dataclasses.replace(PRESETS["demo"], preset="custom", class_names=(), class_colors=()).to_dict()
    del old["class_names"], old["class_colors"]
    cfg = ModelConfig.from_dict(old)
    assert cfg.names == ("background", "class 1", "class 2") and cfg.colors[0] == "#000000"


def test_names_survive_a_round_trip_and_bad_ones_are_refused():
    cfg = dataclasses.replace(PRESETS["demo"], class_names=("bg", "liver", "spleen"))
    assert ModelConfig.from_dict(cfg.to_dict()).names == ("bg", "liver", "spleen")
    with pytest.raises(ArtifactError, match="class_names has 2 entries for 3 classes"):
        ModelConfig.from_dict(dataclasses.replace(PRESETS["demo"], class_names=("bg", "liver")).to_dict())
    with pytest.raises(ArtifactError, match="not of the form #rrggbb"):
        bad = dataclasses.replace(PRESETS["demo"], class_colors=("#000000", "red", "#00ff00"))
        ModelConfig.from_dict(bad.to_dict())
    # a preset changed in code keeps working, with generic names for its new classes
    assert dataclasses.replace(PRESETS["knee3d"], num_classes=2).names == ("background", "class 1")
