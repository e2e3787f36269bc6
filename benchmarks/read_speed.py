"""How long `format_of(path).read(path)` takes per file (the read stage of ldseg-run), median of
--repeat warm reads (the file in the page cache), for comparing trees:

    cd /tmp && PYTHONPATH=<tree> python /work/main/benchmarks/read_speed.py ../shared/data/knee/images/*.nii.gz
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", type=Path, nargs="+")
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    import ldseg
    from ldseg.io.formats import format_of

    print(f"ldseg from {Path(ldseg.__file__).parent}")
    medians = []
    for path in args.paths:
        format_of(path).read(path)  # warm: imports, page cache
        times = []
        for _ in range(args.repeat):
            clock = time.perf_counter()
            format_of(path).read(path)
            times.append((time.perf_counter() - clock) * 1e3)
        medians.append(statistics.median(times))
        print(f"{path.name}: {medians[-1]:.1f} ms (median of {args.repeat})")
    print(f"all: {statistics.median(medians):.1f} ms (median of the files' medians)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
