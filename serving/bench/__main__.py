"""`python -m serving.bench ...`, the same as `inferos bench ...`."""

import sys

from serving.bench.cli import main

sys.exit(main())
