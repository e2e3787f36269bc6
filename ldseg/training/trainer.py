"""The training loop: `train(options) -> TrainResult`.

Phases (per step, fixed by the options, so a resumed run knows which one it is in):
  autoencoder  the first --autoencoder-steps steps: label encoder + decoder alone,
               CE + 2 * (1 - Dice) on decoder(encoder(label)).
  joint        the official recipe (utilities/trainer3D.py): all four components,
               CE + 2 * (1 - Dice) on decoder(z_lt - denoiser(z_lt, z_i, t)) + MSE(eps, denoiser).
  latent       --freeze autoencoder: image encoder + denoiser on label latents cached once
               (the label encoder is frozen, so they never change); MSE(eps, denoiser) only.
               The segmentation term is left out: with the decoder frozen it only reaches the
               denoiser through a full-resolution decode per step, the dominant cost, for a
               signal the noise MSE already carries.
  denoiser     --freeze encoders: the denoiser alone, on label and image latents both cached
               once per (sample, flips). After the first pass over the data a step touches no
               full-resolution tensor, so a CPU trains a knee3d denoiser in minutes.

Reproducibility: the weights are initialized under torch.manual_seed(seed) (in a forked RNG, so
the caller's global state is untouched); each step draws its augmentation, timesteps and noise
from a generator seeded by (seed, step), and the data order is a per-epoch permutation seeded by
(seed, epoch). A step is therefore a pure function of (state, seed, step): on CPU an interrupted
and resumed run ends bit-identical to an uninterrupted one.

Why one module of ~500 lines: the three phases share one step function, one resumable state and
one checkpoint cadence; split apart, each piece would need the others' private state to resume.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ldseg.errors import ArtifactError, BackendUnavailable, OutputError
from ldseg.model.checkpoint import load_checkpoint, read_metadata, save_checkpoint, state_tensors
from ldseg.model.config import ModelConfig, get_preset
from ldseg.model.diffusion import alpha_bar_table, q_sample
from ldseg.model.network import COMPONENTS, LDSeg, minmax
from ldseg.training import augment
from ldseg.training.data import Source, batch_indices, open_sources, steps_per_epoch
from ldseg.training.ema import EMA
from ldseg.training.evaluate import reconstruction_dice, sampled_dice, summarize
from ldseg.training.losses import noise_loss, segmentation_loss
from ldseg.training.options import RESUME_FIXED, OptionsError, TrainOptions, TrainResult
from ldseg.training.state import (
    RunPaths,
    load_optimizer,
    load_state,
    optimizer_tensors,
    read_metrics,
    save_state,
    write_metrics,
)

DEFAULT_EPOCHS = 10
PHASE_COMPONENTS = {
    "autoencoder": ("label_encoder", "label_decoder"),
    "joint": COMPONENTS,
    "latent": ("image_encoder", "denoiser"),
    "denoiser": ("denoiser",),
}
AUTOENCODER = ("label_encoder", "label_decoder")
FROZEN = {"none": (), "autoencoder": AUTOENCODER, "encoders": (*AUTOENCODER, "image_encoder")}


def train(options: TrainOptions) -> TrainResult:
    return _Run(options).run()


def phase_at(options: TrainOptions, step: int) -> str:
    if options.freeze == "autoencoder":
        return "latent"
    if options.freeze == "encoders":
        return "denoiser"
    return "autoencoder" if step < options.autoencoder_steps else "joint"


def lr_at(options: TrainOptions, step: int, total: int) -> float:
    if options.lr_schedule == "constant":
        return options.lr
    # Cosine to 0 over the current phase: the autoencoder phase ends converged, then the next
    # phase starts again at the full rate.
    ae_end = min(options.autoencoder_steps, total) if options.freeze == "none" else 0
    start, end = (0, ae_end) if step < ae_end else (ae_end, total)
    frac = (step - start) / max(end - start, 1)
    return options.lr * 0.5 * (1.0 + math.cos(math.pi * frac))


def step_generator(seed: int, step: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass
class _State:
    """The model and optimizer side of a run: built (or restored) once, updated by every step."""

    model: LDSeg
    init_flags: dict[str, bool]  # components trained before this run (--init / the resumed run's)
    trained_now: set[str]  # components this run has trained
    start: int  # first step of this process (> 0 when resumed)
    elapsed_before: float  # wall seconds of the earlier processes of a resumed run
    optimizer: torch.optim.Optimizer
    ema: EMA
    alpha_bar: torch.Tensor
    latent_cache: dict[tuple[int, tuple[int, ...]], torch.Tensor] = field(default_factory=dict)
    pair_cache: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg


@dataclass(frozen=True)
class _Data:
    train: Source
    per_epoch: int  # steps per pass over `train`
    total: int  # steps of the whole run
    every: int  # validate and save every this many steps
    val_images: torch.Tensor
    val_labels: torch.Tensor


class _Run:
    def __init__(self, options: TrainOptions):
        self.o = options
        self.paths = RunPaths.beside(options.output)
        self.device = resolve_device(options.device)
        self.wall_start = time.perf_counter()
        self.saved_once = False  # later saves in this run replace the first one
        self.final_loss = float("nan")
        self._check_output()
        self.state = self._build()
        self.data = self._open_data()

    # -- setup -------------------------------------------------------------------------------

    def _check_output(self) -> None:
        out = self.paths.checkpoint
        if not out.parent.is_dir():
            raise OutputError(f"{out}: folder {out.parent} does not exist")
        if out.is_dir():
            raise OutputError(f"{out}: is a directory")
        if self.o.resume:
            if not self.paths.state.is_file():
                raise ArtifactError(
                    f"{self.paths.state}: no training state to resume (was {out} written by ldseg-train?)"
                )
        elif out.exists() and not self.o.overwrite:
            # Checked now, not after hours of training when the first save would fail.
            raise OutputError(f"{out}: exists (use --overwrite, or --resume to continue it)")

    def _build(self) -> _State:
        o = self.o
        start, ema_updates, elapsed_before = 0, 0, 0.0
        trained_now: set[str] = set()
        resume_tensors: dict[str, torch.Tensor] = {}
        resume_meta: dict[str, Any] = {}
        if o.resume:
            resume_tensors, resume_meta = load_state(self.paths.state)
            self._check_resumable(resume_meta)
            model = LDSeg(ModelConfig.from_dict(resume_meta["config"]))
            weights = {k[len("model.") :]: v for k, v in resume_tensors.items() if k.startswith("model.")}
            missing = set(state_tensors(model)) - set(weights)
            if missing:
                raise ArtifactError(f"{self.paths.state}: training state lacks {sorted(missing)[:3]}")
            model.load_state_dict(weights, strict=False)
            init_flags = {k: bool(resume_meta["init_trained"].get(k)) for k in COMPONENTS}
            trained_now = set(resume_meta["trained_now"])
            start = int(resume_meta["step"])
            ema_updates = int(resume_meta["ema_updates"])
            elapsed_before = float(resume_meta.get("elapsed_s", 0.0))
        elif o.init is not None:
            model = load_checkpoint(o.init)
            if model.cfg.preset != o.preset:
                raise OptionsError(f"--init {o.init} is a {model.cfg.preset!r} checkpoint, not {o.preset!r}")
            init_flags = dict(model.trained)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(o.seed)
                model = LDSeg(get_preset(o.preset))
            init_flags = {k: False for k in COMPONENTS}
        untrained = [k for k in FROZEN[o.freeze] if not init_flags.get(k)]
        if untrained:
            raise OptionsError(
                f"--freeze {o.freeze} needs --init with trained {', '.join(FROZEN[o.freeze])}; "
                f"untrained: {', '.join(untrained)}"
            )
        model.to(self.device)
        if self.device.type == "cpu" and model.cfg.spatial_dims == 3:
            _prefer_channels_last(model)
        trainable = [c for c in COMPONENTS if c not in FROZEN[o.freeze]]
        for name in COMPONENTS:
            getattr(model, name).requires_grad_(name in trainable)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=o.lr)
        ema = EMA(model.denoiser, o.ema_decay, ema_updates)
        if o.resume:
            for name, avg in ema.shadow.items():
                avg.copy_(resume_tensors[f"ema.{name}"])
            load_optimizer(optimizer, resume_tensors, resume_meta["optimizer"])
        alpha_bar = torch.as_tensor(alpha_bar_table(model.cfg.diffusion), dtype=torch.float32, device=self.device)
        return _State(model, init_flags, trained_now, start, elapsed_before, optimizer, ema, alpha_bar)

    def _check_resumable(self, meta: dict[str, Any]) -> None:
        saved = meta.get("options", {})
        now = self.o.to_json_dict()
        changed = [f"{k} ({saved.get(k)!r} -> {now[k]!r})" for k in RESUME_FIXED if saved.get(k) != now[k]]
        if changed:
            raise OptionsError(f"--resume with different options: {', '.join(changed)}")

    def _open_data(self) -> _Data:
        o = self.o
        train_src, val_src = open_sources(o.data, self.state.cfg, o.num_train, o.val)
        per_epoch = steps_per_epoch(len(train_src), o.batch_size)
        total = o.steps if o.steps is not None else (o.epochs or DEFAULT_EPOCHS) * per_epoch
        return _Data(train_src, per_epoch, total, o.checkpoint_every or per_epoch, *_stack(val_src))

    # -- one step ----------------------------------------------------------------------------

    def _draws(self, step: int, gen: torch.Generator, intensity: bool) -> tuple[list[int], list[augment.Draw]]:
        o = self.o
        indices = batch_indices(len(self.data.train), o.batch_size, o.seed, step)
        return indices, [augment.draw(gen, self.state.cfg.spatial_dims, o.flips, intensity) for _ in indices]

    def _tensors(self, indices: list[int], draws: list[augment.Draw]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for i, d in zip(indices, draws):
            sample = self.data.train[i]
            image = minmax(torch.from_numpy(sample.image)[None])[0]  # what encode_image would see
            images.append(augment.apply_image(image, d))
            labels.append(augment.apply_label(torch.from_numpy(sample.label.astype(np.int64)), d))
        return torch.stack(images).to(self.device), torch.stack(labels).to(self.device)

    def _noise(self, shape: tuple[int, ...], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample t ~ U{0..T-1} and eps ~ N(0, 1). (The official code repeats one eps draw
        over the batch; independent draws are the textbook estimator and equal at batch 1.)"""
        t = torch.randint(0, self.state.cfg.diffusion.timesteps, (shape[0],), generator=gen)
        eps = torch.randn(shape, generator=gen)
        return t.to(self.device), eps.to(self.device)

    def _losses(self, phase: str, step: int) -> dict[str, torch.Tensor]:
        gen = step_generator(self.o.seed, step)
        m = self.state.model
        k = self.o.noise_draws
        if phase == "denoiser":  # nothing at full resolution once the cache is warm
            indices, draws = self._draws(step, gen, intensity=False)
            z_l0, z_i = (z.repeat_interleave(k, dim=0) for z in self._frozen_latents(indices, draws))
            t, eps = self._noise(tuple(z_l0.shape), gen)
            mse = noise_loss(eps, m.denoiser(q_sample(z_l0, t, eps, self.state.alpha_bar), z_i, t))
            return {"loss": mse, "loss_mse": mse}
        indices, draws = self._draws(step, gen, intensity=self.o.augment)
        images, labels = self._tensors(indices, draws)
        if phase == "autoencoder":
            seg = segmentation_loss(m.label_decoder.logits(m.encode_label(labels)), labels)
            return {"loss": seg, "loss_seg": seg}
        if phase == "joint":
            z_l0 = m.encode_label(labels)
            z_i = m.image_encoder(images)
            t, eps = self._noise(tuple(z_l0.shape), gen)
            z_lt = q_sample(z_l0, t, eps, self.state.alpha_bar)
            z_nt = m.denoiser(z_lt, z_i, t)
            seg = segmentation_loss(m.label_decoder.logits(z_lt - z_nt), labels)
            mse = noise_loss(eps, z_nt)
            return {"loss": seg + mse, "loss_seg": seg, "loss_mse": mse}
        z_l0 = self._label_latents(indices, draws, labels).repeat_interleave(k, dim=0)
        z_i = m.image_encoder(images).repeat_interleave(k, dim=0)  # one encoder pass, k draws
        t, eps = self._noise(tuple(z_l0.shape), gen)
        mse = noise_loss(eps, m.denoiser(q_sample(z_l0, t, eps, self.state.alpha_bar), z_i, t))
        return {"loss": mse, "loss_mse": mse}

    @torch.no_grad()
    def _label_latents(self, indices: list[int], draws: list[augment.Draw], labels: torch.Tensor) -> torch.Tensor:
        """Frozen label encoder: each (sample, flip) latent is computed once and kept."""
        out = []
        for row, (i, d) in enumerate(zip(indices, draws)):
            key = (i, d.flips)
            if key not in self.state.latent_cache:
                self.state.latent_cache[key] = self.state.model.encode_label(labels[row : row + 1])
            out.append(self.state.latent_cache[key])
        return torch.cat(out)

    @torch.no_grad()
    def _frozen_latents(self, indices: list[int], draws: list[augment.Draw]) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen label and image encoders: each (sample, flips) pair of latents is computed once."""
        for i, d in zip(indices, draws):
            key = (i, d.flips)
            if key not in self.state.pair_cache:
                images, labels = self._tensors([i], [d])
                self.state.pair_cache[key] = (
                    self.state.model.encode_label(labels),
                    self.state.model.image_encoder(images),
                )
        pairs = [self.state.pair_cache[(i, d.flips)] for i, d in zip(indices, draws)]
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])

    def _set_modes(self, phase: str) -> None:
        active = PHASE_COMPONENTS[phase]
        for name in COMPONENTS:
            getattr(self.state.model, name).train(name in active)

    # -- validation and saving ---------------------------------------------------------------

    def _validate(self, phase: str) -> dict[str, dict[str, float]]:
        if self.data.val_labels.shape[0] == 0:
            return {}
        self.state.model.eval()
        out = {"val_recon_dice": summarize(reconstruction_dice(self.state.model, self.data.val_labels))}
        if phase != "autoencoder":
            seeds = list(range(self.data.val_labels.shape[0]))
            with self.state.ema.swapped(self.state.model.denoiser):
                dice = sampled_dice(self.state.model, self.data.val_images, self.data.val_labels, seeds)
            out["val_dice"] = summarize(dice)
        self._set_modes(phase)
        return out

    def _flags(self) -> dict[str, bool]:
        return {k: bool(self.state.init_flags.get(k)) or k in self.state.trained_now for k in COMPONENTS}

    def _save(self, step: int, summary: dict[str, Any]) -> str:
        m = self.state.model
        m.trained = self._flags()
        extra = {
            "training": {
                "step": step,
                "total_steps": self.data.total,
                "seed": self.o.seed,
                "data": self.o.data,
                "freeze": self.o.freeze,
                "last_validation": summary.get("last_validation"),
            }
        }
        overwrite = self.o.overwrite or self.o.resume or self.saved_once
        with self.state.ema.swapped(m.denoiser):  # the checkpoint carries the averaged denoiser
            digest = save_checkpoint(m, self.paths.checkpoint, overwrite=overwrite, extra=extra)
        self.saved_once = True
        tensors = {f"model.{k}": v for k, v in state_tensors(m).items()}
        tensors.update({f"ema.{k}": v for k, v in self.state.ema.shadow.items()})
        opt_tensors, opt_meta = optimizer_tensors(self.state.optimizer)
        tensors.update(opt_tensors)
        meta = {
            "step": step,
            "ema_updates": self.state.ema.updates,
            "config": self.state.cfg.to_dict(),
            "options": self.o.to_json_dict(),
            "init_trained": self.state.init_flags,
            "trained_now": sorted(self.state.trained_now),
            "checkpoint_sha256": digest,
            "elapsed_s": self._elapsed(),
            "optimizer": opt_meta,
        }
        save_state(self.paths.state, tensors, meta)
        return digest

    def _elapsed(self) -> float:
        return self.state.elapsed_before + time.perf_counter() - self.wall_start

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> TrainResult:
        rows, epochs = read_metrics(self.paths, self.state.start) if self.o.resume else ([], [])
        digest = read_metadata(self.paths.checkpoint)["content_sha256"] if self.state.start >= self.data.total else ""
        last_val: dict[str, float] | None = None
        losses_this_epoch: list[float] = []
        console = Console(stderr=True)
        with _progress(console, self.o.progress) as progress:
            task = progress.add_task(
                "train", total=self.data.total, completed=min(self.state.start, self.data.total), loss="-"
            )
            for step in range(self.state.start, self.data.total):
                phase = phase_at(self.o, step)
                self._set_modes(phase)
                lr = lr_at(self.o, step, self.data.total)
                for group in self.state.optimizer.param_groups:
                    group["lr"] = lr
                parts = self._losses(phase, step)
                self.state.optimizer.zero_grad(set_to_none=True)
                parts["loss"].backward()
                self.state.optimizer.step()
                if "denoiser" in PHASE_COMPONENTS[phase]:
                    self.state.ema.update(self.state.model.denoiser)
                self.state.trained_now.update(PHASE_COMPONENTS[phase])
                values = {k: float(v.detach()) for k, v in parts.items()}
                losses_this_epoch.append(values["loss"])
                row: dict[str, Any] = {
                    "step": step + 1,
                    "epoch": step // self.data.per_epoch + 1,
                    "phase": phase,
                    "lr": lr,
                    "elapsed_s": self._elapsed(),
                    **values,
                }
                rows.append(row)
                progress.update(task, advance=1, description=f"{phase} ep {row['epoch']}", loss=f"{values['loss']:.4f}")
                if (step + 1) % self.data.every == 0 or step + 1 == self.data.total:
                    val = self._validate(phase)
                    for key, summary in val.items():
                        row[key] = summary["mean"]
                    record = {
                        "epoch": row["epoch"],
                        "step": step + 1,
                        "phase": phase,
                        "train_loss": float(np.mean(losses_this_epoch)),
                        **val,
                    }
                    epochs.append(record)
                    last_val = val.get("val_dice") or val.get("val_recon_dice")
                    digest = self._save(step + 1, {"last_validation": val})
                    write_metrics(self.paths, rows, self._summary(epochs, step + 1, digest))
                    if self.o.progress:
                        progress.console.print(_epoch_line(record, self.data.total))
                    self.final_loss = float(np.mean(losses_this_epoch))
                    losses_this_epoch = []
        if self.state.start >= self.data.total and epochs:
            last = epochs[-1]
            last_val = last.get("val_dice") or last.get("val_recon_dice")
            self.final_loss = float(last["train_loss"])
        return TrainResult(
            checkpoint=self.paths.checkpoint,
            state=self.paths.state,
            metrics_csv=self.paths.metrics_csv,
            metrics_json=self.paths.metrics_json,
            step=max(self.state.start, self.data.total),
            total_steps=self.data.total,
            content_sha256=digest,
            final_loss=self.final_loss,
            val_dice=last_val,
            trained=self._flags(),
            wall_time_s=time.perf_counter() - self.wall_start,
            device=str(self.device),
        )

    def _summary(self, epochs: list[dict[str, Any]], step: int, digest: str) -> dict[str, Any]:
        return {
            "options": self.o.to_json_dict(),
            "device": str(self.device),
            "preset": self.state.cfg.preset,
            "step": step,
            "total_steps": self.data.total,
            "steps_per_epoch": self.data.per_epoch,
            "train_samples": len(self.data.train),
            "val_samples": int(self.data.val_labels.shape[0]),
            "epochs": epochs,
            "trained": self._flags(),
            "checkpoint": str(self.paths.checkpoint),
            "content_sha256": digest,
            "elapsed_s": self._elapsed(),
        }


def resolve_device(name: str) -> torch.device:
    """--device: "auto" is the first CUDA GPU when PyTorch sees one, else the CPU (where training is
    bit-reproducible); "cuda[:N]" without a visible GPU is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("--device cuda: no CUDA GPU visible to PyTorch")
    return device


def _prefer_channels_last(model: LDSeg) -> None:
    """3D convs run about twice as fast on CPU (oneDNN) with channels-last weights; the values,
    and what save_checkpoint writes (it makes every tensor contiguous), are unchanged."""
    for module in model.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)


def _stack(source: Source) -> tuple[torch.Tensor, torch.Tensor]:
    if len(source) == 0:
        return torch.empty(0), torch.empty(0, dtype=torch.int64)
    samples = [source[i] for i in range(len(source))]
    images = torch.stack([torch.from_numpy(s.image) for s in samples])
    labels = torch.stack([torch.from_numpy(s.label.astype(np.int64)) for s in samples])
    return images, labels


@contextmanager
def _progress(console: Console, enabled: bool) -> Iterator[Progress]:
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )
    with progress:
        yield progress


def _epoch_line(record: dict[str, Any], total: int) -> str:
    parts = [
        f"epoch {record['epoch']}",
        f"step {record['step']}/{total}",
        record["phase"],
        f"loss {record['train_loss']:.4f}",
    ]
    for key, label in (("val_dice", "val dice"), ("val_recon_dice", "recon dice")):
        if key in record:
            per = ", ".join(f"{k}: {v:.3f}" for k, v in record[key].items() if k != "mean")
            parts.append(f"{label} {record[key]['mean']:.3f} ({per})")
    return "  ".join(parts)
