"""Does the model's own uncertainty predict its error? (issue 20, part 4)

Per case: K samples of one model -> mean vote entropy inside the predicted structures (the number
report.html ranks by, ldseg.qc.metrics.uncertainty_stats) against 1 - mean foreground Dice, and
their Spearman rank correlation. Two sets:

  phantoms  the bundled demo model on phantom seeds never used in training, with Gaussian noise
            added to the raw image at increasing sigma (in units of the image's intensity range),
            as the paper's robustness experiment does
  knee      the QC sidecars of an ldseg-run of a knee checkpoint on NIfTI images with labels
            of the same names (real data: the images, labels and weights stay outside the repository);
            `knee-noise` makes such a folder from one case under a noise sweep (case_sigma<S>.nii.gz,
            the same Gaussian noise in units of the intensity range as the phantoms get), and the
            knee rows read the sigma back from the name

Usage:
  python benchmarks/uncertainty.py phantoms -o DIR [--seeds 24] [--sigmas 0,0.05,...] [--samples 8]
  ldseg-run I -o RUN --checkpoint knee3d.safetensors --samples 8 --report --labels L
  python benchmarks/uncertainty.py knee -o DIR --run RUN   # rows from RUN/*_qc.json
  python benchmarks/uncertainty.py knee-noise -o NOISY --image I --label L [--sigmas 0,0.05,...]
  python benchmarks/uncertainty.py plot -o DIR          # table, Spearman and scatter from DIR/*.csv
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import stats

from ldseg.data.phantoms import make_phantom
from ldseg.io.nifti import Volume
from ldseg.io.preprocess import image_to_model_grid
from ldseg.metrics import dice_per_class
from ldseg.model.config import ModelConfig
from ldseg.qc.metrics import uncertainty_stats
from ldseg.qc.report import read_record
from ldseg.runs.inference import segment
from ldseg.runs.types import RunOptions, Segmentation
from ldseg.runs.volumes import Prepared
from ldseg.runtime.select import Source, select_backend

FIELDS = [
    "set",
    "case",
    "sigma",
    "samples",
    "mean_entropy",
    "unsure_fraction",
    "dice_1",
    "dice_2",
    "one_minus_dice",
    "seconds",
]


def _row(
    set_name: str,
    case: str,
    sigma: float,
    samples: int,
    result: Segmentation,
    truth: np.ndarray,
    cfg: ModelConfig,
    seconds: float,
) -> dict:
    """Uncertainty as report.html counts it (model grid); Dice of the written `_seg` (input grid)."""
    entropy, unsure = uncertainty_stats(result.votes, result.mean_probabilities.argmax(axis=0), cfg.num_classes)
    dice = dice_per_class(result.outputs["_seg"][0], truth, cfg.num_classes)
    return {
        "set": set_name,
        "case": case,
        "sigma": sigma,
        "samples": samples,
        "mean_entropy": entropy,
        "unsure_fraction": unsure,
        "dice_1": dice[1],
        "dice_2": dice.get(2, float("nan")),
        "one_minus_dice": 1.0 - float(np.mean(list(dice.values()))),
        "seconds": round(seconds, 2),
    }


def _append(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)
    print(", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def phantoms(args: argparse.Namespace) -> None:
    selection = select_backend(Source("demo", args.bundle, None), args.backend, "cpu")
    backend, cfg = selection.backend, selection.config
    opts = RunOptions(samples=args.samples, seed=args.seed)
    target = args.output / "phantoms.csv"
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        phantom = make_phantom(seed, cfg.image_size, cfg.num_classes)
        span = float(phantom.image.max() - phantom.image.min())
        for sigma in args.sigmas:
            # Noise on the raw image, then the run's own preprocessing (min-max, model grid).
            rng = np.random.default_rng(10_000 + seed)
            noisy = phantom.image + rng.normal(scale=sigma * span, size=phantom.image.shape)
            image = image_to_model_grid(noisy.transpose(2, 1, 0).astype(np.float32), cfg.image_size)[None]
            prepared = Prepared(Path(f"phantom{seed}"), image.astype(np.float32), _reference(cfg))
            clock = time.perf_counter()
            result = segment(prepared, backend, cfg, opts)
            row = _row(
                "phantoms",
                f"seed{seed}",
                sigma,
                args.samples,
                result,
                phantom.label.transpose(2, 1, 0),
                cfg,
                time.perf_counter() - clock,
            )
            _append(target, row)


def _reference(cfg: ModelConfig) -> Volume:
    """The phantom's input grid is the model grid (nibabel order): segment() only needs its shape."""
    shape = tuple(reversed(cfg.image_size))
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    return Volume(np.zeros(shape, np.float32), np.eye(4), header, Path("phantom"))


def knee(args: argparse.Namespace) -> None:
    """Rows from the QC sidecars of an `ldseg-run --samples 8 --qc --labels L` run (the report's
    own numbers: entropy on the model grid, Dice of the written segmentation)."""
    target = args.output / "knee.csv"
    for sidecar in sorted(args.run.glob("*_qc.json")):
        record = read_record(sidecar)
        if record.mean_structure_entropy is None or record.label is None:
            raise SystemExit(f"{sidecar}: needs K >= 2 and a reference label")
        dice = {int(k): c.dice for k, c in record.classes.items() if c.dice is not None}
        sigma = float(record.name.rsplit("_sigma", 1)[1]) if "_sigma" in record.name else 0.0
        _append(
            target,
            {
                "set": "knee",
                "case": record.name,
                "sigma": sigma,
                "samples": record.samples,
                "mean_entropy": record.mean_structure_entropy,
                "unsure_fraction": record.low_confidence_fraction,
                "dice_1": dice[1],
                "dice_2": dice.get(2, float("nan")),
                "one_minus_dice": 1.0 - float(np.mean(list(dice.values()))),
                "seconds": float("nan"),
            },
        )


def knee_noise(args: argparse.Namespace) -> None:
    """NOISY/images/<case>_sigma<S>.nii.gz (noise on the raw intensities, image geometry kept) and
    NOISY/labels/ with the label under every such name, for `ldseg-run ... --labels NOISY/labels`."""
    image = nib.load(str(args.image))
    data = np.asarray(image.dataobj, dtype=np.float32)
    span = float(data.max() - data.min())
    label = nib.load(str(args.label))
    case = args.image.name.removesuffix(".nii.gz")
    (args.output / "images").mkdir(parents=True, exist_ok=True)
    (args.output / "labels").mkdir(parents=True, exist_ok=True)
    for sigma in args.sigmas:
        rng = np.random.default_rng(10_000)
        noisy = data + rng.normal(scale=sigma * span, size=data.shape).astype(np.float32)
        name = f"{case}_sigma{sigma:.2f}.nii.gz"
        out = nib.Nifti1Image(noisy, image.affine, image.header)
        out.set_data_dtype(np.float32)  # not the source's integer type: the noise stays as drawn
        nib.save(out, str(args.output / "images" / name))
        nib.save(label, str(args.output / "labels" / name))
        print(f"wrote {name}", flush=True)


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return [{k: (v if k in ("set", "case") else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def _spearman(rows: list[dict], measure: str = "mean_entropy") -> tuple[float, float]:
    if len(rows) < 3:
        return float("nan"), float("nan")
    result = stats.spearmanr([r[measure] for r in rows], [r["one_minus_dice"] for r in rows])
    return float(result.statistic), float(result.pvalue)


def plot(args: argparse.Namespace) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    phantom_rows, knee_rows = _read(args.output / "phantoms.csv"), _read(args.output / "knee.csv")
    lines = [
        "| set | sigma | cases | mean entropy | 1 - Dice (mean) | Spearman rho (entropy) | p "
        "| Spearman rho (unsure fraction) | p |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def add(label: str, sigma: str, rows: list[dict]) -> None:
        rho, p = _spearman(rows)
        rho_u, p_u = _spearman(rows, "unsure_fraction")
        lines.append(
            f"| {label} | {sigma} | {len(rows)} | {np.mean([r['mean_entropy'] for r in rows]):.4f} | "
            f"{np.mean([r['one_minus_dice'] for r in rows]):.4f} | {rho:.3f} | {p:.2g} | "
            f"{rho_u:.3f} | {p_u:.2g} |"
        )

    sigmas = sorted({r["sigma"] for r in phantom_rows})
    for sigma in sigmas:
        add("phantoms", f"{sigma:g}", [r for r in phantom_rows if r["sigma"] == sigma])
    if phantom_rows:
        add("phantoms", "all", phantom_rows)
    for sigma in sorted({r["sigma"] for r in knee_rows}):
        add("knee", f"{sigma:g}", [r for r in knee_rows if r["sigma"] == sigma])
    if len({r["sigma"] for r in knee_rows}) > 1:
        add("knee", "all", knee_rows)
    (args.output / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    fig = Figure(figsize=(10 if knee_rows else 6, 4.5), dpi=110, layout="constrained")
    axes = fig.subplots(1, 2 if knee_rows else 1, squeeze=False)[0]
    if phantom_rows:
        ax = axes[0]
        shown = ax.scatter(
            [r["mean_entropy"] for r in phantom_rows],
            [r["one_minus_dice"] for r in phantom_rows],
            c=[r["sigma"] for r in phantom_rows],
            cmap="viridis",
            s=18,
        )
        fig.colorbar(shown, ax=ax, label="noise sigma (x intensity range)")
        rho, _ = _spearman(phantom_rows)
        ax.set_title(f"demo model, phantoms: Spearman rho {rho:.2f} (n = {len(phantom_rows)})", fontsize=9)
        ax.set_xlabel(f"mean vote entropy in predicted structures (K = {int(phantom_rows[0]['samples'])})")
        ax.set_ylabel("1 - mean foreground Dice")
    if knee_rows:
        ax = axes[-1]
        ax.scatter([r["mean_entropy"] for r in knee_rows], [r["one_minus_dice"] for r in knee_rows], s=30)
        for r in knee_rows:
            ax.annotate(r["case"], (r["mean_entropy"], r["one_minus_dice"]), fontsize=8)
        rho_k, _ = _spearman(knee_rows)
        title = f"Spearman rho {rho_k:.2f}" if len(knee_rows) >= 3 else "too few for a rank correlation"
        ax.set_title(f"knee (n = {len(knee_rows)}: {title})", fontsize=9)
        ax.set_xlabel(f"mean vote entropy in predicted structures (K = {int(knee_rows[0]['samples'])})")
        ax.set_ylabel("1 - mean foreground Dice")
    FigureCanvasAgg(fig).print_png(str(args.output / "scatter.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["phantoms", "knee", "knee-noise", "plot"])
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="noise seed of sample 0 (sample k: seed + k)")
    parser.add_argument("--seeds", type=int, default=24, help="number of phantom seeds")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds 0-999 were never used in training")
    parser.add_argument(
        "--sigmas", type=lambda s: [float(v) for v in s.split(",")], default=[0.0, 0.05, 0.1, 0.15, 0.2, 0.3]
    )
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--run", type=Path, help="knee: output folder of ldseg-run --qc --labels")
    parser.add_argument("--image", type=Path, help="knee-noise: the case's image")
    parser.add_argument("--label", type=Path, help="knee-noise: the case's label")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    {"phantoms": phantoms, "knee": knee, "knee-noise": knee_noise, "plot": plot}[args.what](args)


if __name__ == "__main__":
    main()
