"""Markdown from results.json: the per-run results.md, and a README "Performance" section that
puts the machine and the date beside every number."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ldseg.bench.accuracy import REFERENCE_NOTE, untrained_note
from ldseg.bench.pipeline import STAGES as PIPELINE_STAGES
from ldseg.errors import InputError
from ldseg.runtime.backend import STAGES

Row = dict[str, Any]
ACCURACY_NOTE = (
    "Agreement and Dice vs ref compare each row's labels with the reference's on the same inputs; they are "
    "given only for trained models whose reference output has at least two classes of >= 1 % of the voxels "
    "each. Dice vs truth: against the labels of --data, on each input's own grid (mean over the batch)."
)


def load_results(path: Path) -> dict[str, Any]:
    """A results.json (or the folder holding one)."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    try:
        data: dict[str, Any] = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{file}: not a readable results.json ({exc})") from exc
    if not str(data.get("schema", "")).startswith("ldseg-bench/"):
        raise InputError(f"{file}: not an ldseg-bench results file")
    return data


def _f(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def machine_line(results: dict[str, Any]) -> str:
    m = results["machine"]
    cores = f"{m['cores_physical']} physical / {m['cores_logical']} logical cores"
    cpu = f"{m['cpu']} ({cores}, {m['torch_threads']} torch threads)"
    return f"{m['gpu']} + {cpu}" if m["gpu"] else cpu


def _scores(dice: dict[str, float] | None) -> str:
    return "–" if not dice else " / ".join(f"{d:.4f}" for d in dice.values())


def vs_reference(results: dict[str, Any], row: Row) -> tuple[str, str]:
    """(agreement, Dice per class) against the reference, or the note saying why there is no number.
    Schema-1 results (no note recorded) get the same rule as ldseg/bench/accuracy.py applies now."""
    acc = row["accuracy"]
    if "note" in acc:
        note = acc["note"]
    else:
        note = REFERENCE_NOTE if row["reference"] else untrained_note(results["model"].get("trained", {}))
    if note:
        return note, "–"
    return f"{acc['agreement']:.4f}", _scores(acc["dice"])


def vs_truth(row: Row) -> str:
    truth = row["accuracy"].get("vs_truth")
    return _scores(truth["dice"]) if truth else "–"


def render_results(results: dict[str, Any]) -> str:
    """results.md: context, the end-to-end table, and the per-stage table."""
    git, versions, model = results["git"], results["versions"], results["model"]
    peaks = ", ".join(f"{k} {v['gflops']:.1f} GFLOP/s" for k, v in results["peaks"].items())
    lines = [
        f"# ldseg-bench: {model['preset']} on {results['device']}",
        "",
        f"- date: {results['created']}",
        f"- machine: {machine_line(results)}",
        f"- commit: {git['commit']}{' (dirty tree)' if git['dirty'] else ''}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in versions.items())}",
        f"- model: {model['weights']}; image {model['image_shape']}, latent {model['latent_shape']}, "
        f"sampler {model['sampler']}",
        f"- inputs: {results['inputs']['source']}",
        f"- timer: {results['timer']}; matmul peak: {peaks}; reference: {results['reference']}",
        "",
        "## End to end",
        "",
    ]
    header = [
        "backend",
        "steps",
        "batch",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "min ms",
        "mean ms",
        "vol/s",
        "speed-up",
        "vs ORT fp32",
        "GFLOP/s",
        "% of peak",
        "agreement",
        "Dice vs ref per class",
        "Dice vs truth per class",
        "peak RSS MB",
    ]
    body = []
    for r in results["rows"]:
        ms, e2e = r["end_to_end"]["ms"], r["end_to_end"]
        body.append(
            [
                r["label"] + (" (ref)" if r["reference"] else ""),
                str(r["steps"]),
                str(r["batch"]),
                _f(ms["p50"]),
                _f(ms["p95"]),
                _f(ms["p99"]),
                _f(ms["min"]),
                _f(ms["mean"]),
                _f(r["throughput_volumes_per_s"], 2),
                _f(r["speedup_vs_reference"], 2),
                _f(r.get("speedup_vs_onnxruntime_fp32"), 2),
                _f(e2e["gflops_per_s"]),
                _f(100 * e2e["roofline"]),
                *vs_reference(results, r),
                vs_truth(r),
                _f(r["memory"]["peak_rss_mb"], 0),
            ]
        )
    lines += _table(header, body)
    lines += ["", ACCURACY_NOTE]
    lines += ["", "## Stages (p50 ms, each stage timed alone; GFLOP/s and % of peak in brackets)", ""]
    body = []
    for r in results["rows"]:
        cells = []
        for name in STAGES:
            s = r["stages"][name]
            extra = f" ({s['gflops_per_s']:.1f}, {100 * s['roofline']:.0f}%)" if s["gflops_per_s"] else ""
            cells.append(_f(s["ms"]["p50"], 2) + extra)
        body.append([r["label"], str(r["steps"]), str(r["batch"]), *cells])
    lines += _table(["backend", "steps", "batch", *STAGES], body)
    executed = "; ".join(
        f"{r['label']} {r['executed_flops'] / 1e9:.1f}" for r in results["rows"] if "executed_flops" in r
    )
    lines += [
        "",
        "FLOPs are counted by torch.utils.flop_counter (convolutions and matmuls only), for the reference "
        "model: GFLOP/s and % of peak read as the compute floor (reference FLOPs at the measured peak) "
        "divided by the measured time. Exported graphs compute the decoder's upsampling in its phase "
        "form (same function, fewer multiply-adds); GFLOP per run actually executed, end to end: "
        + (executed or "not recorded")
        + ".",
        "",
    ]
    whole = [r for r in results["rows"] if r.get("pipeline")]
    if whole:
        lines += [
            f"## Whole volume (p50 ms; {whole[0]['pipeline']['file']}, input grid "
            f"{'x'.join(map(str, whole[0]['pipeline']['input_shape']))}, K = 1; ldseg.bench.pipeline)",
            "",
        ]
        body = [
            [
                r["label"],
                r["pipeline"]["volume_ops"],
                *(_f(r["pipeline"]["ms"][name]["p50"], 1) for name in PIPELINE_STAGES),
                _f(r["pipeline"]["over_model"], 2),
            ]
            for r in whole
        ]
        lines += _table(["backend", "volume ops", *PIPELINE_STAGES, "all but read / model"], body)
        lines.append("")
    return "\n".join(lines)


def _inputs(inputs: dict[str, Any]) -> str:
    files = inputs.get("files")
    text = f"{inputs['source']} ({', '.join(dict.fromkeys(files))})" if files else inputs["source"]
    return text + (f", labels {inputs['labels']}" if inputs.get("labels") else "")


def performance_section(paths: Sequence[Path], heading: str = "## Performance") -> str:
    """README section from one or more results.json: one row per measurement, each with its machine
    and date."""
    runs = [load_results(p) for p in paths]
    if not runs:
        raise InputError("performance_section needs at least one results.json")
    header = [
        "model",
        "backend",
        "steps",
        "batch",
        "p50 ms",
        "p95 ms",
        "vol/s",
        "speed-up",
        "% of peak",
        "agreement",
        "Dice vs truth",
        "machine",
        "date",
    ]
    body = []
    for res in runs:
        host = res["machine"]["gpu"] or f"{res['machine']['cpu']}, {res['machine']['cores_logical']} cores"
        for r in res["rows"]:
            ms = r["end_to_end"]["ms"]
            body.append(
                [
                    res["model"]["preset"],
                    r["label"],
                    str(r["steps"]),
                    str(r["batch"]),
                    _f(ms["p50"]),
                    _f(ms["p95"]),
                    _f(r["throughput_volumes_per_s"], 2),
                    _f(r["speedup_vs_reference"], 2),
                    _f(100 * r["end_to_end"]["roofline"]),
                    vs_reference(res, r)[0],
                    vs_truth(r),
                    f"{host} ({res['device']})",
                    res["created"][:10],
                ]
            )
    notes = []
    for res in runs:
        peaks = ", ".join(f"{k} {v['gflops']:.0f} GFLOP/s" for k, v in res["peaks"].items())
        notes.append(
            f"- {res['model']['preset']}, {res['created'][:10]}: {res['model']['weights']}; "
            f"commit {res['git']['commit'][:12]}; torch {res['versions'].get('torch', '?')}, "
            f"onnxruntime {res['versions'].get('onnxruntime', '–')}, "
            f"openvino {res['versions'].get('openvino', '–')}; matmul peak {peaks}; "
            f"{res['rows'][0]['repeat']} repeats after {res['rows'][0]['warmup']} warm-up; "
            f"inputs {_inputs(res['inputs'])}"
        )
    lines = [
        heading,
        "",
        "Latency is end to end (host arrays in, labels out); speed-up is against PyTorch eager FP32 on the "
        "same device in the same run; agreement is the fraction of voxels whose label equals that "
        "reference's on the same inputs (given only for trained models whose reference output has "
        "several classes); Dice vs truth is per class against the labels of `--data` (input grid); "
        "% of peak is the reference model's counted FLOPs per second "
        "over the measured matmul peak of the row's precision (on CPU fp32, bf16, int8: the best of torch and "
        "OpenVINO), i.e. the compute floor "
        "divided by the measured time (exported graphs execute fewer FLOPs: phase-form upsampling, "
        "see ldseg/model/layers.py). Reproduce with `bash benchmarks/run_cpu.sh` (see benchmarks/README.md).",
        "",
        *_table(header, body),
        "",
        *notes,
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m ldseg.bench.report RESULTS... > section.md
    import sys

    print(performance_section([Path(p) for p in sys.argv[1:]]))
