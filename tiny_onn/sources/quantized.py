"""Weights of a 4-bit (bitsandbytes NF4/FP4) source read as plain float tensors, for code that slices them by neuron.

A bitsandbytes `Linear4bit` stores its weight packed (uint8, two 4-bit codes per byte, shape [out·in/2, 1]) with its
scales in `weight.quant_state`, and its state dict adds the quantization state as `weight.absmax`, `weight.quant_map`, ….
Slicing that tensor by neuron row gives bytes, not weights: carving dequantizes first (`dense_weight`, `dense_state_dict`).
"""

from __future__ import annotations

import torch
from torch import nn

from tiny_onn.errors import TinyOnnError


def is_quantized(weight: torch.Tensor) -> bool:
    """Is this weight stored in a quantized form (integer codes, or a bitsandbytes Params4bit with its quant_state)?"""
    return not weight.is_floating_point() or getattr(weight, "quant_state", None) is not None


def _dequantize_4bit(weight: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.dequantize_4bit(weight.data, weight.quant_state)


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The module's weight as a float tensor of its logical shape [out, in], dequantized when stored in 4 bits."""
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TinyOnnError(f"a {type(linear).__name__} layer has no plain weight tensor (a GPTQ/AWQ-quantized model?); "
                           "carving needs a float or bitsandbytes 4-bit source")
    if not is_quantized(weight):
        return weight
    if getattr(weight, "quant_state", None) is None:
        raise TinyOnnError(f"a {type(linear).__name__} weight is stored as {weight.dtype} without bitsandbytes quantization "
                           "state, so it cannot be dequantized; load the source unquantized (without --load-in-4bit)")
    dense = _dequantize_4bit(weight)
    assert dense.shape == (linear.out_features, linear.in_features), (dense.shape, linear)
    return dense


def dense_state_dict(model: nn.Module, skip: str | None = None) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with every quantized linear's weight dequantized and its quantization-state entries dropped
    (entries whose name contains `skip` are left out, before any dequantization)."""
    state = {k: v for k, v in model.state_dict().items() if skip is None or skip not in k}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        key = f"{name}.weight" if name else "weight"
        if key not in state or not isinstance(weight, torch.Tensor) or not is_quantized(weight):
            continue
        for extra in [k for k in state if k.startswith(key + ".")]:  # absmax, quant_map, quant_state.bitsandbytes__nf4
            del state[extra]
        state[key] = dense_weight(module)
    return state
