"""``python -m tagmill.serve BUNDLE [options]``: the server without the CLI (benchmarks, containers)."""

import sys

from tagmill.serve.server import main

sys.exit(main())
