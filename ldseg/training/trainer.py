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
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


class _Run:
    def __init__(self, options: TrainOptions):
        self.o = options
        self.paths = RunPaths.beside(options.output)
        self.device = _device(options.device)
        self.wall_start = time.perf_counter()
        self.saved_once = False  # later saves in this run replace the first one
        self.final_loss = float("nan")

    # -- setup -------------------------------------------------------------------------------

    def _check_output(self) -> None:
        out = self.paths.checkpoint
        if not out.parent.is_dir():
            raise OutputError(f"{out}: folder {out.parent} does not exist")
        if out.is_dir():
            raise OutputError(f"{out}: is a directory")
        if self.o.resume:
            if not self.paths.state.is_file():
                raise ArtifactError(f"{self.paths.state}: no training state to resume (was {out} written by ldseg-train?)")
        elif out.exists() and not self.o.overwrite:
            # Checked now, not after hours of training when the first save would fail.
            raise OutputError(f"{out}: exists (use --overwrite, or --resume to continue it)")

    def _build(self) -> None:
        o = self.o
        self.start = 0
        self.ema_updates = 0
        self.elapsed_before = 0.0
        self.trained_now: set[str] = set()
        self.resume_tensors: dict[str, torch.Tensor] = {}
        self.resume_meta: dict[str, Any] = {}
        if o.resume:
            tensors, meta = load_state(self.paths.state)
            self._check_resumable(meta)
            cfg = ModelConfig.from_dict(meta["config"])
            model = LDSeg(cfg)
            weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
            missing = set(state_tensors(model)) - set(weights)
            if missing:
                raise ArtifactError(f"{self.paths.state}: training state lacks {sorted(missing)[:3]}")
            model.load_state_dict(weights, strict=False)
            self.init_flags = {k: bool(meta["init_trained"].get(k)) for k in COMPONENTS}
            self.trained_now = set(meta["trained_now"])
            self.start = int(meta["step"])
            self.ema_updates = int(meta["ema_updates"])
            self.elapsed_before = float(meta.get("elapsed_s", 0.0))
            self.resume_tensors, self.resume_meta = tensors, meta
        elif o.init is not None:
            model = load_checkpoint(o.init)
            if model.cfg.preset != o.preset:
                raise OptionsError(f"--init {o.init} is a {model.cfg.preset!r} checkpoint, not {o.preset!r}")
            self.init_flags = dict(model.trained)
        else:
            cfg = get_preset(o.preset)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(o.seed)
                model = LDSeg(cfg)
            self.init_flags = {k: False for k in COMPONENTS}
        untrained = [k for k in FROZEN[o.freeze] if not self.init_flags.get(k)]
        if untrained:
            raise OptionsError(
                f"--freeze {o.freeze} needs --init with trained {', '.join(FROZEN[o.freeze])}; "
                f"untrained: {', '.join(untrained)}"
            )
        model.to(self.device)
        if self.device.type == "cpu" and model.cfg.spatial_dims == 3:
            _prefer_channels_last(model)
        self.model = model
        self.cfg = model.cfg
        trainable = [c for c in COMPONENTS if c not in FROZEN[o.freeze]]
        for name in COMPONENTS:
            getattr(model, name).requires_grad_(name in trainable)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=o.lr)
        self.ema = EMA(model.denoiser, o.ema_decay, self.ema_updates)
        if o.resume:
            for name, avg in self.ema.shadow.items():
                avg.copy_(self.resume_tensors[f"ema.{name}"])
            load_optimizer(self.optimizer, self.resume_tensors, self.resume_meta["optimizer"])
        self.alpha_bar = torch.as_tensor(alpha_bar_table(self.cfg.diffusion), dtype=torch.float32, device=self.device)
        self.latent_cache: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
        self.pair_cache: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]] = {}

    def _check_resumable(self, meta: dict[str, Any]) -> None:
        saved = meta.get("options", {})
        now = self.o.to_json_dict()
        changed = [f"{k} ({saved.get(k)!r} -> {now[k]!r})" for k in RESUME_FIXED if saved.get(k) != now[k]]
        if changed:
            raise OptionsError(f"--resume with different options: {', '.join(changed)}")

    def _open_data(self) -> None:
        o = self.o
        self.train_src, val_src = open_sources(o.data, self.cfg, o.num_train, o.val)
        self.per_epoch = steps_per_epoch(len(self.train_src), o.batch_size)
        self.total = o.steps if o.steps is not None else (o.epochs or DEFAULT_EPOCHS) * self.per_epoch
        self.every = o.checkpoint_every or self.per_epoch
        self.val_images, self.val_labels = _stack(val_src)

    # -- one step ----------------------------------------------------------------------------

    def _draws(self, step: int, gen: torch.Generator, intensity: bool) -> tuple[list[int], list[augment.Draw]]:
        o = self.o
        indices = batch_indices(len(self.train_src), o.batch_size, o.seed, step)
        return indices, [augment.draw(gen, self.cfg.spatial_dims, o.flips, intensity) for _ in indices]

    def _tensors(self, indices: list[int], draws: list[augment.Draw]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for i, d in zip(indices, draws):
            sample = self.train_src[i]
            image = minmax(torch.from_numpy(sample.image)[None])[0]  # what encode_image would see
            images.append(augment.apply_image(image, d))
            labels.append(augment.apply_label(torch.from_numpy(sample.label.astype(np.int64)), d))
        return torch.stack(images).to(self.device), torch.stack(labels).to(self.device)

    def _noise(self, shape: tuple[int, ...], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample t ~ U{0..T-1} and eps ~ N(0, 1). (The official code repeats one eps draw
        over the batch; independent draws are the textbook estimator and equal at batch 1.)"""
        t = torch.randint(0, self.cfg.diffusion.timesteps, (shape[0],), generator=gen)
        eps = torch.randn(shape, generator=gen)
        return t.to(self.device), eps.to(self.device)

    def _losses(self, phase: str, step: int) -> dict[str, torch.Tensor]:
        gen = step_generator(self.o.seed, step)
        m = self.model
        k = self.o.noise_draws
        if phase == "denoiser":  # nothing at full resolution once the cache is warm
            indices, draws = self._draws(step, gen, intensity=False)
            z_l0, z_i = (z.repeat_interleave(k, dim=0) for z in self._frozen_latents(indices, draws))
            t, eps = self._noise(tuple(z_l0.shape), gen)
            mse = noise_loss(eps, m.denoiser(q_sample(z_l0, t, eps, self.alpha_bar), z_i, t))
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
            z_lt = q_sample(z_l0, t, eps, self.alpha_bar)
            z_nt = m.denoiser(z_lt, z_i, t)
            seg = segmentation_loss(m.label_decoder.logits(z_lt - z_nt), labels)
            mse = noise_loss(eps, z_nt)
            return {"loss": seg + mse, "loss_seg": seg, "loss_mse": mse}
        z_l0 = self._label_latents(indices, draws, labels).repeat_interleave(k, dim=0)
        z_i = m.image_encoder(images).repeat_interleave(k, dim=0)  # one encoder pass, k draws
        t, eps = self._noise(tuple(z_l0.shape), gen)
        mse = noise_loss(eps, m.denoiser(q_sample(z_l0, t, eps, self.alpha_bar), z_i, t))
        return {"loss": mse, "loss_mse": mse}

    @torch.no_grad()
    def _label_latents(self, indices: list[int], draws: list[augment.Draw], labels: torch.Tensor) -> torch.Tensor:
        """Frozen label encoder: each (sample, flip) latent is computed once and kept."""
        out = []
        for row, (i, d) in enumerate(zip(indices, draws)):
            key = (i, d.flips)
            if key not in self.latent_cache:
                self.latent_cache[key] = self.model.encode_label(labels[row : row + 1])
            out.append(self.latent_cache[key])
        return torch.cat(out)

    @torch.no_grad()
    def _frozen_latents(self, indices: list[int], draws: list[augment.Draw]) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen label and image encoders: each (sample, flips) pair of latents is computed once."""
        for i, d in zip(indices, draws):
            key = (i, d.flips)
            if key not in self.pair_cache:
                images, labels = self._tensors([i], [d])
                self.pair_cache[key] = (self.model.encode_label(labels), self.model.image_encoder(images))
        pairs = [self.pair_cache[(i, d.flips)] for i, d in zip(indices, draws)]
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])

    def _set_modes(self, phase: str) -> None:
        active = PHASE_COMPONENTS[phase]
        for name in COMPONENTS:
            getattr(self.model, name).train(name in active)

    # -- validation and saving ---------------------------------------------------------------

    def _validate(self, phase: str) -> dict[str, dict[str, float]]:
        if self.val_labels.shape[0] == 0:
            return {}
        self.model.eval()
        out = {"val_recon_dice": summarize(reconstruction_dice(self.model, self.val_labels))}
        if phase != "autoencoder":
            seeds = list(range(self.val_labels.shape[0]))
            with self.ema.swapped(self.model.denoiser):
                dice = sampled_dice(self.model, self.val_images, self.val_labels, seeds)
            out["val_dice"] = summarize(dice)
        self._set_modes(phase)
        return out

    def _flags(self) -> dict[str, bool]:
        return {k: bool(self.init_flags.get(k)) or k in self.trained_now for k in COMPONENTS}

    def _save(self, step: int, summary: dict[str, Any]) -> str:
        m = self.model
        m.trained = self._flags()
        extra = {"training": {"step": step, "total_steps": self.total, "seed": self.o.seed, "data": self.o.data,
                              "freeze": self.o.freeze, "last_validation": summary.get("last_validation")}}
        overwrite = self.o.overwrite or self.o.resume or self.saved_once
        with self.ema.swapped(m.denoiser):  # the checkpoint carries the averaged denoiser
            digest = save_checkpoint(m, self.paths.checkpoint, overwrite=overwrite, extra=extra)
        self.saved_once = True
        tensors = {f"model.{k}": v for k, v in state_tensors(m).items()}
        tensors.update({f"ema.{k}": v for k, v in self.ema.shadow.items()})
        opt_tensors, opt_meta = optimizer_tensors(self.optimizer)
        tensors.update(opt_tensors)
        meta = {
            "step": step,
            "ema_updates": self.ema.updates,
            "config": self.cfg.to_dict(),
            "options": self.o.to_json_dict(),
            "init_trained": self.init_flags,
            "trained_now": sorted(self.trained_now),
            "checkpoint_sha256": digest,
            "elapsed_s": self._elapsed(),
            "optimizer": opt_meta,
        }
        save_state(self.paths.state, tensors, meta)
        return digest

    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.wall_start

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> TrainResult:
        self._check_output()
        self._build()
        self._open_data()
        rows, epochs = read_metrics(self.paths, self.start) if self.o.resume else ([], [])
        digest = read_metadata(self.paths.checkpoint)["content_sha256"] if self.start >= self.total else ""
        last_val: dict[str, float] | None = None
        losses_this_epoch: list[float] = []
        console = Console(stderr=True)
        with _progress(console, self.o.progress) as progress:
            task = progress.add_task("train", total=self.total, completed=min(self.start, self.total), loss="-")
            for step in range(self.start, self.total):
                phase = phase_at(self.o, step)
                self._set_modes(phase)
                lr = lr_at(self.o, step, self.total)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                parts = self._losses(phase, step)
                self.optimizer.zero_grad(set_to_none=True)
                parts["loss"].backward()
                self.optimizer.step()
                if "denoiser" in PHASE_COMPONENTS[phase]:
                    self.ema.update(self.model.denoiser)
                self.trained_now.update(PHASE_COMPONENTS[phase])
                values = {k: float(v.detach()) for k, v in parts.items()}
                losses_this_epoch.append(values["loss"])
                row: dict[str, Any] = {"step": step + 1, "epoch": step // self.per_epoch + 1, "phase": phase,
                                       "lr": lr, "elapsed_s": self._elapsed(), **values}
                rows.append(row)
                progress.update(task, advance=1, description=f"{phase} ep {row['epoch']}", loss=f"{values['loss']:.4f}")
                if (step + 1) % self.every == 0 or step + 1 == self.total:
                    val = self._validate(phase)
                    for key, summary in val.items():
                        row[key] = summary["mean"]
                    record = {"epoch": row["epoch"], "step": step + 1, "phase": phase,
                              "train_loss": float(np.mean(losses_this_epoch)), **val}
                    epochs.append(record)
                    last_val = val.get("val_dice") or val.get("val_recon_dice")
                    digest = self._save(step + 1, {"last_validation": val})
                    write_metrics(self.paths, rows, self._summary(epochs, step + 1, digest))
                    if self.o.progress:
                        progress.console.print(_epoch_line(record, self.total))
                    self.final_loss = float(np.mean(losses_this_epoch))
                    losses_this_epoch = []
        if self.start >= self.total and epochs:
            last = epochs[-1]
            last_val = last.get("val_dice") or last.get("val_recon_dice")
            self.final_loss = float(last["train_loss"])
        return TrainResult(
            checkpoint=self.paths.checkpoint,
            state=self.paths.state,
            metrics_csv=self.paths.metrics_csv,
            metrics_json=self.paths.metrics_json,
            step=max(self.start, self.total),
            total_steps=self.total,
            content_sha256=digest,
            final_loss=self.final_loss,
            val_dice=last_val,
            trained=self._flags(),
            wall_time_s=time.perf_counter() - self.wall_start,
        )

    def _summary(self, epochs: list[dict[str, Any]], step: int, digest: str) -> dict[str, Any]:
        return {
            "options": self.o.to_json_dict(),
            "preset": self.cfg.preset,
            "step": step,
            "total_steps": self.total,
            "steps_per_epoch": self.per_epoch,
            "train_samples": len(self.train_src),
            "val_samples": int(self.val_labels.shape[0]),
            "epochs": epochs,
            "trained": self._flags(),
            "checkpoint": str(self.paths.checkpoint),
            "content_sha256": digest,
            "elapsed_s": self._elapsed(),
        }


def _device(name: str) -> torch.device:
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
    parts = [f"epoch {record['epoch']}", f"step {record['step']}/{total}", record["phase"],
             f"loss {record['train_loss']:.4f}"]
    for key, label in (("val_dice", "val dice"), ("val_recon_dice", "recon dice")):
        if key in record:
            per = ", ".join(f"{k}: {v:.3f}" for k, v in record[key].items() if k != "mean")
            parts.append(f"{label} {record[key]['mean']:.3f} ({per})")
    return "  ".join(parts)
