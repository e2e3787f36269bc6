"""One phase-form `Upsample` (ldseg/model/layers.py) exported by two checkouts and timed on ONNX Runtime
CPU in one process, runs alternated: for a change to how the exported graph interleaves the parities.
Not a test: it prints what it measured.

    git worktree add /tmp/old-tree <old commit>
    python benchmarks/upsample_interleave.py --old-tree /tmp/old-tree --cin 64 --cout 32 --grid 64 64 128 --runs 15

(knee3d's last decoder upsampling: (1, 64, 64, 64, 128) -> (1, 32, 128, 128, 256).) Each tree exports
the same module (seed 0) in its own process; this one reports node counts, whether the outputs are
bit-identical and the median of each.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

HERE = Path(__file__).resolve().parents[1]
EXPORT = """
import contextlib, io, sys, warnings
import onnx, torch
from ldseg.model.layers import Upsample, phase_upsampling
warnings.filterwarnings("ignore")
torch.manual_seed(0)
cin, cout, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
grid = tuple(int(s) for s in sys.argv[4:])
up = Upsample(len(grid), cin, cout).eval()
with phase_upsampling(up), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    program = torch.onnx.export(up, (torch.randn(1, cin, *grid),), dynamo=True, opset_version=18)
onnx.save(program.model_proto, out)
"""


def export(tree: Path, args: argparse.Namespace, out: Path) -> None:
    command = [sys.executable, "-c", EXPORT, str(args.cin), str(args.cout), str(out), *map(str, args.grid)]
    subprocess.run(command, check=True, cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old-tree", type=Path, required=True)
    parser.add_argument("--cin", type=int, default=64)
    parser.add_argument("--cout", type=int, default=32)
    parser.add_argument("--grid", type=int, nargs="+", default=[64, 64, 128])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"old": Path(tmp) / "old.onnx", "new": Path(tmp) / "new.onnx"}
        export(args.old_tree.resolve(), args, paths["old"])
        export(HERE, args, paths["new"])
        sessions, nodes = {}, {}
        for name, path in paths.items():
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.intra_op_num_threads = args.threads
            sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            nodes[name] = len(onnx.load(str(path)).graph.node)
    feed_name = sessions["old"].get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((1, args.cin, *args.grid)).astype(np.float32)
    outputs = {name: s.run(None, {feed_name: x})[0] for name, s in sessions.items()}  # also the warm-up
    times: dict[str, list[float]] = {"old": [], "new": []}
    for r in range(args.runs):
        for name in ("old", "new") if r % 2 else ("new", "old"):
            start = time.perf_counter()
            sessions[name].run(None, {feed_name: x})
            times[name].append((time.perf_counter() - start) * 1e3)
    old, new = statistics.median(times["old"]), statistics.median(times["new"])
    print(" ".join(sys.argv))
    identical = np.array_equal(outputs["old"], outputs["new"])
    print(f"nodes {nodes['old']} -> {nodes['new']}; outputs identical: {identical}")
    print(f"old {old:.1f} ms, new {new:.1f} ms, new/old {new / old:.3f} (medians of {args.runs}, alternated)")


if __name__ == "__main__":
    main()
