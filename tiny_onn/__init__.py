"""Tiny-ONN: extract a sparse Mixture-of-Experts from a dense SwiGLU LLM.

Pipeline: scan -> carve -> train -> eval -> interpret (see README.md).
"""

__version__ = "0.1.0"
