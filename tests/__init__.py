"""cardseal's test suite.

The Wycheproof vectors are read in place from ``../shared/vectors/wycheproof`` next to the
checkout; ``CARDSEAL_WYCHEPROOF`` points elsewhere when the checkout lives on its own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

WYCHEPROOF: Final = Path(
    os.environ.get(
        "CARDSEAL_WYCHEPROOF",
        Path(__file__).resolve().parents[2] / "shared" / "vectors" / "wycheproof",
    )
)
