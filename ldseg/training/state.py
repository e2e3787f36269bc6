"""Files beside a checkpoint: the training-state sidecar (for --resume) and the metrics.

For `run.safetensors`:
  run.train-state.safetensors  raw (non-EMA) weights, EMA shadow, Adam moments; JSON metadata with
                               the step, options and the hash of the checkpoint it belongs to
  run.metrics.csv              one row per optimizer step (+ validation columns at epoch ends)
  run.metrics.json             options, per-epoch validation, summary
Safetensors + JSON only: nothing is ever unpickled.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ldseg.errors import ArtifactError
from ldseg.io.atomic import atomic_write

STATE_FORMAT = "ldseg-train-state/1"
CSV_FIELDS = ("step", "epoch", "phase", "lr", "loss", "loss_seg", "loss_mse", "elapsed_s", "val_dice", "val_recon_dice")


@dataclass(frozen=True)
class RunPaths:
    checkpoint: Path
    state: Path
    metrics_csv: Path
    metrics_json: Path

    @staticmethod
    def beside(checkpoint: Path) -> RunPaths:
        checkpoint = Path(checkpoint)
        name = checkpoint.name
        stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else name
        parent = checkpoint.parent
        return RunPaths(
            checkpoint,
            parent / f"{stem}.train-state.safetensors",
            parent / f"{stem}.metrics.csv",
            parent / f"{stem}.metrics.json",
        )


def save_state(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    payload = {"ldseg-train-state": json.dumps({"format": STATE_FORMAT, **meta}, sort_keys=True)}
    atomic_write(Path(path), lambda tmp: save_file(flat, str(tmp), metadata=payload), overwrite=True)


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: training state not found (needed by --resume)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("ldseg-train-state")
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise ArtifactError(f"{path}: training state unreadable ({exc})") from exc
    meta: dict[str, Any] = json.loads(raw) if raw else {}
    if meta.get("format") != STATE_FORMAT:
        raise ArtifactError(f"{path}: not an ldseg training state (format {meta.get('format')!r})")
    return tensors, meta


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Adam's state_dict split into tensors ("opt.<param>.<key>") and JSON (param groups)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, entry in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entry)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (KeyError, ValueError) as exc:
        raise ArtifactError(f"training state's optimizer does not fit this run ({exc})") from exc


def write_metrics(paths: RunPaths, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in CSV_FIELDS})
    _write_text(paths.metrics_csv, buffer.getvalue())
    _write_text(paths.metrics_json, json.dumps(summary, indent=2, sort_keys=True) + "\n")


def _write_text(path: Path, text: str) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(text)

    atomic_write(path, write, overwrite=True)


def read_metrics(paths: RunPaths, up_to_step: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows and per-epoch records already written, cut at `up_to_step` (for --resume)."""
    rows: list[dict[str, Any]] = []
    if paths.metrics_csv.is_file():
        with paths.metrics_csv.open(newline="") as handle:
            rows = [dict(r) for r in csv.DictReader(handle) if int(r["step"]) <= up_to_step]
    epochs: list[dict[str, Any]] = []
    if paths.metrics_json.is_file():
        try:
            data = json.loads(paths.metrics_json.read_text())
            epochs = [e for e in data.get("epochs", []) if int(e["step"]) <= up_to_step]
        except (ValueError, KeyError, TypeError):
            epochs = []  # metrics are a log, not state: an unreadable one restarts the log
    return rows, epochs


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
