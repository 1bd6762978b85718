"""Carving from a 4-bit source dequantizes before slicing (a fake bitsandbytes Linear4bit: no GPU or bitsandbytes here)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tiny_onn.sources.quantized as quantized
from tests.conftest import make_tiny_model
from tiny_onn.carve import assemble
from tiny_onn.carve.plan import CarvePlan, LayerPlan
from tiny_onn.errors import TinyOnnError


@dataclass
class FakeQuantState:
    scale: torch.Tensor  # [out, 1] per-row absmax scale
    shape: torch.Size


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (0..15) [n] -> bytes [n/2, 1], two codes per byte as bitsandbytes stores them."""
    return (codes[0::2] * 16 + codes[1::2]).to(torch.uint8)[:, None]


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    flat = packed.reshape(-1).long()
    return torch.stack([flat // 16, flat % 16], dim=1).reshape(-1)


def fake_dequantize(weight: torch.Tensor) -> torch.Tensor:
    qs = weight.quant_state
    return ((_unpack(weight.data) - 8).float().reshape(qs.shape) * qs.scale / 7).float()


class FakeLinear4bit(nn.Module):
    """Stores a linear layer's weight as packed 4-bit codes with per-row scales, like bitsandbytes' Linear4bit."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True)
        codes = (w / scale * 7).round().clamp(-8, 7).long() + 8
        self.weight = nn.Parameter(_pack(codes.reshape(-1)), requires_grad=False)
        self.weight.quant_state = FakeQuantState(scale, w.shape)
        self.bias = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight.absmax"] = self.weight.quant_state.scale  # like bitsandbytes' extra entries

    def forward(self, x):
        return F.linear(x, fake_dequantize(self.weight))


def _quantize_linears(model: nn.Module) -> None:
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and "lm_head" not in f"{name}.{child_name}":
                setattr(module, child_name, FakeLinear4bit(child))


def _dequantized_copy(quantized_model: nn.Module, arch: str, vocab: int) -> nn.Module:
    """The same model with plain float weights equal to the dequantized 4-bit ones (what carving must see)."""
    plain = make_tiny_model(arch, vocab)
    state = {}
    for name, module in quantized_model.named_modules():
        if isinstance(module, FakeLinear4bit):
            state[f"{name}.weight"] = fake_dequantize(module.weight)
    assert not plain.load_state_dict(state, strict=False).unexpected_keys
    return plain


def _plan(n_layers: int, N: int = 64) -> CarvePlan:
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    return CarvePlan([LayerPlan(layer=i, shared=perm[:8].sort().values, experts=perm[8:].view(4, 14)) for i in range(n_layers)],
                     method="random")


def test_carving_a_4bit_source_dequantizes_before_slicing(monkeypatch):
    monkeypatch.setattr(quantized, "_dequantize_4bit", fake_dequantize)
    source = make_tiny_model("llama", 100)
    _quantize_linears(source)
    assert any(k.endswith("weight.absmax") for k in source.state_dict())
    reference = _dequantized_copy(source, "llama", 100)
    plan = _plan(source.config.num_hidden_layers)
    carved = assemble(source, plan, num_experts_per_tok=2).state_dict()
    expected = assemble(reference, plan, num_experts_per_tok=2).state_dict()
    assert carved.keys() == expected.keys()
    for key in expected:
        assert torch.equal(carved[key], expected[key]), key
    # the dequantized weights are real weights (close to the originals), not bytes
    original = make_tiny_model("llama", 100).model.layers[0].mlp.gate_proj.weight
    assert (reference.model.layers[0].mlp.gate_proj.weight - original).abs().max() < 0.2 * original.abs().max()


def test_unreadable_quantized_weight_is_refused():
    layer = nn.Linear(4, 6, bias=False)
    layer.weight = nn.Parameter(torch.zeros(12, 1, dtype=torch.uint8), requires_grad=False)  # codes, no quant_state
    with pytest.raises(TinyOnnError, match="cannot be dequantized"):
        quantized.dense_weight(layer)


class _FakeScan:
    """Importance a·s per neuron (what width pruning ranks by), without running a scan."""

    def __init__(self, layers: int, neurons: int):
        g = torch.Generator().manual_seed(3)
        self.stats = {(li, k): torch.rand(neurons, generator=g) for li in range(layers) for k in ("act", "grad")}

    def stat(self, layer: int, name: str) -> torch.Tensor:
        return self.stats[(layer, name)]


def test_width_pruning_a_4bit_source_dequantizes(monkeypatch):
    from tiny_onn.carve.baselines import width_pruned_dense

    monkeypatch.setattr(quantized, "_dequantize_4bit", fake_dequantize)
    source = make_tiny_model("llama", 100)
    _quantize_linears(source)
    reference = _dequantized_copy(source, "llama", 100)
    scan = _FakeScan(source.config.num_hidden_layers, source.config.intermediate_size)
    pruned, kept = width_pruned_dense(source, scan, 16)
    expected, kept_ref = width_pruned_dense(reference, scan, 16)
    assert kept == kept_ref
    for (name, value), (name_ref, value_ref) in zip(pruned.state_dict().items(), expected.state_dict().items(), strict=True):
        assert name == name_ref and torch.equal(value, value_ref), name
