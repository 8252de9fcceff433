"""cardseal's benchmark suite: ``make bench`` or ``python -m benchmarks`` (see ``run.py``)."""
