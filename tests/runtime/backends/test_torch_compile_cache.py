"""torch.compile's cost is paid once (issue 31): a second process finds what the first compiled in
the project's cache, with a real Inductor compile on the CPU (the backend compiles on CUDA only, but
the wrapper, the cache folder and Inductor's caches are the same there)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ldseg.runtime.artifacts.cache import CACHE_ENV
from ldseg.runtime.backends.torch import compile as torch_compile

# One compiled stage in a fresh process, after `import torch._dynamo`, as after an export in the same
# process: torch has then written its own default folder into TORCHINDUCTOR_CACHE_DIR.
CHILD = """
import json, os, torch
import torch._dynamo
from torch._dynamo.utils import counters
from ldseg.runtime.backends.torch.compile import INDUCTOR_CACHE_ENV, Compiled
torch.manual_seed(0)
block = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.GroupNorm(2, 4), torch.nn.SiLU()).eval()
x = torch.randn(1, 1, 6, 6, 6)
with torch.no_grad():
    stage = Compiled("block", block, enabled=True)
    out = stage(x)
    eager = block(x)
print(json.dumps({"cache": os.environ[INDUCTOR_CACHE_ENV], "failed": stage.failed,
                  "difference": (out - eager).abs().max().item(), "output": out.flatten().tolist(),
                  "inductor": dict(counters["inductor"])}))
"""


def _compile_in_a_fresh_process(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != torch_compile.INDUCTOR_CACHE_ENV}
    env.update({CACHE_ENV: str(cache), "PYTHONUTF8": "1"})
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="Inductor's CPU code needs a C++ compiler")
def test_a_second_process_reuses_the_first_ones_compile(tmp_path):
    first = _compile_in_a_fresh_process(tmp_path)
    second = _compile_in_a_fresh_process(tmp_path)
    for run in (first, second):
        assert run["failed"] is None  # compiled, not the eager fallback
        assert run["cache"] == str(tmp_path / "torch-inductor")  # not torch's default in the temp folder
        assert run["difference"] < 1e-5
    assert first["inductor"].get("fxgraph_cache_miss", 0) >= 1
    assert second["inductor"].get("fxgraph_cache_hit", 0) >= 1 and "fxgraph_cache_miss" not in second["inductor"]
    assert second["output"] == first["output"]  # the same kernels
