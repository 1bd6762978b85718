"""Evaluation: perplexity (more metrics and the eval stage come with the Evaluate issue)."""

from tiny_onn.eval.perplexity import perplexity

__all__ = ["perplexity"]
