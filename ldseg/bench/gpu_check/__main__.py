"""`python -m ldseg.bench.gpu_check` (what scripts/gpu_check.sh runs)."""

import sys

from ldseg.bench.gpu_check.cli import main

sys.exit(main())
