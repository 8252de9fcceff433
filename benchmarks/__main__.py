"""``python -m benchmarks [--quick] [--rows ...]``: the whole suite (``benchmarks.run``)."""

from benchmarks.run import main

raise SystemExit(main())
