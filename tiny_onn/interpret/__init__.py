"""Interpret stage: expert profiles, log-odds tokens, labels, NMI, embeddings and a self-contained HTML dashboard."""

from tiny_onn.interpret.interpreter import InterpretConfig, run, summary

__all__ = ["InterpretConfig", "run", "summary"]
