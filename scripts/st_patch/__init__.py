"""st-patch: apply the MatryoshkaLoss + cached-loss series to a sentence-transformers target."""

__version__ = "2.0.0"
