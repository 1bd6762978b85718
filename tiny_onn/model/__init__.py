"""The TinyOnn MoE model: a transformers config + model pair, registered with the Auto classes."""

from transformers import AutoConfig, AutoModelForCausalLM

from tiny_onn.model.configuration_tiny_onn import TinyOnnConfig
from tiny_onn.model.modeling_tiny_onn import TinyOnnForCausalLM, TinyOnnModel, select_experts

AutoConfig.register(TinyOnnConfig.model_type, TinyOnnConfig, exist_ok=True)
AutoModelForCausalLM.register(TinyOnnConfig, TinyOnnForCausalLM, exist_ok=True)

__all__ = ["TinyOnnConfig", "TinyOnnForCausalLM", "TinyOnnModel", "select_experts"]
