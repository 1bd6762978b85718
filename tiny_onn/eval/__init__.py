"""Eval stage: perplexity, multiple-choice tasks, HumanEval, a factual probe, efficiency, the sparsity–quality curve."""

from tiny_onn.eval.perplexity import perplexity

__all__ = ["perplexity"]
