"""``python -m engine``: see engine.cli."""
import os
import sys

# Sleep rather than spin while waiting for work: on a busy laptop (QGIS rendering, other
# programs) spinning OpenMP threads fight for the cores and make generation many times slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .cli import main  # noqa: E402

sys.exit(main())
