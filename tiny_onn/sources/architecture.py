"""Find the decoder layers and the gate/up/down SwiGLU projections of a Llama-style model."""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from tiny_onn.errors import TinyOnnError

SUPPORTED_FAMILIES = ("decoder models whose MLP is gate_proj/up_proj/down_proj with SiLU (Llama, SmolLM, Mistral, Qwen2, "
                      "Qwen3 and others read by scan and eval; carve builds MoEs from Llama, Mistral, Qwen2 and Qwen3)")
# config fields that name a model's activation, in the order families use them
_ACTIVATION_FIELDS = ("hidden_act", "hidden_activation", "activation_function", "activation")
# config fields that give a model routed experts already
_EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")
_SILU = ("silu", "swish")


@dataclass
class SwiGluMlp:
    """One FFN: h = silu(gate(x)) * up(x); out = down(h). Neuron j is row j of gate/up and column j of down."""

    layer: int
    module: nn.Module
    gate_proj: nn.Module
    up_proj: nn.Module
    down_proj: nn.Module

    @property
    def num_neurons(self) -> int:
        return self.down_proj.in_features


def check_config_is_swiglu(config: PretrainedConfig, name: str) -> None:
    """Reject a model before its weights load when its config already shows it is not a SiLU-gated decoder."""
    experts = next((getattr(config, f) for f in _EXPERT_FIELDS if getattr(config, f, None)), None)
    if experts:
        raise TinyOnnError(f"{name} is a '{config.model_type}' model that is already a mixture of experts ({experts} "
                           f"experts); Tiny-ONN carves dense models: {SUPPORTED_FAMILIES}")
    act = next((getattr(config, f) for f in _ACTIVATION_FIELDS if getattr(config, f, None) is not None), None)
    if act not in _SILU or not hasattr(config, "intermediate_size"):
        raise TinyOnnError(
            f"{name} is a '{config.model_type}' model (activation {act!r}); Tiny-ONN needs a SwiGLU decoder: {SUPPORTED_FAMILIES}"
        )


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The model's stack of decoder layers (`model.model.layers` for Llama/Qwen)."""
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TinyOnnError(
            f"cannot find the decoder layers of a '{model.config.model_type}' model; supported: {SUPPORTED_FAMILIES}"
        )
    return layers


def swiglu_mlps(model: PreTrainedModel) -> list[SwiGluMlp]:
    """Every layer's SwiGLU FFN; one clear error if any layer has another kind of MLP."""
    found = []
    for i, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        parts = [getattr(mlp, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
        if mlp is None or any(p is None for p in parts):
            raise TinyOnnError(
                f"layer {i} of this '{model.config.model_type}' model has no gate_proj/up_proj/down_proj MLP "
                f"(a MoE or fused MLP?); supported: {SUPPORTED_FAMILIES}"
            )
        found.append(SwiGluMlp(i, mlp, *parts))
    return found


@contextmanager
def patched_forwards(modules: list[nn.Module], forwards: list) -> Iterator[None]:
    """Within the block, each module instance runs the given forward (a function of (self, ...)) in place of its
    class's; restored on exit, also on error."""
    for module, forward in zip(modules, forwards, strict=True):
        module.forward = types.MethodType(forward, module)
    try:
        yield
    finally:
        for module in modules:
            del module.forward  # back to the class's forward
