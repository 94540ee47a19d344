"""Fixes of upstream's native MatryoshkaLoss + cached-loss support (releases 3.4.0 and later).

One concern per upstream defect, so a maintainer can take each patch on its own.
"""

from __future__ import annotations

from .recipes import Concern

#: In patch order.
NATIVE_FIXES: tuple[Concern, ...] = ()
