"""structprune: structured pruning of BERT-family models with gated heads and FFN units."""
__version__ = "0.1.0"
