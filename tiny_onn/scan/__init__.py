"""Scan stage: per-neuron activation and gradient statistics of every SwiGLU FFN, and the scores built on them."""

from tiny_onn.scan.result import ScanResult
from tiny_onn.scan.scanner import NeuronScanner, ScanConfig, run, scan_batch
from tiny_onn.scan.scores import delta_sc, s_p, zscore

__all__ = ["NeuronScanner", "ScanConfig", "ScanResult", "delta_sc", "run", "s_p", "scan_batch", "zscore"]
