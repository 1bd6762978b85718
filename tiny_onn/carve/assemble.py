"""Surgery: a dense source + a carve plan -> a TinyOnn MoE whose experts are slices of the source FFNs.

A pure function of (source weights, plan, layout): config and weights change together. With every neuron kept, no shared
expert and every expert selected, the MoE computes exactly the dense model (tested).
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig, PreTrainedModel

from tiny_onn.carve.plan import CarvePlan
from tiny_onn.errors import TinyOnnError
from tiny_onn.model import TinyOnnConfig, TinyOnnForCausalLM
from tiny_onn.sources import swiglu_mlps
from tiny_onn.sources.quantized import dense_state_dict, dense_weight

_COPIED_CONFIG = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_act",
    "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "attention_dropout", "pad_token_id",
    "bos_token_id", "eos_token_id", "initializer_range",
)


# the families whose attention, embeddings and norms TinyOnn computes exactly as the source does (carve tests: every
# expert active = dense). Others that pass as SwiGLU decoders scale them differently (Granite's multipliers, SmolLM3's
# layers without rope, Olmo2's norms after the blocks): a carve of them would be silently wrong.
CARVABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def sliding_window(src: PretrainedConfig) -> int | None:
    """The attention window of a source that uses the same one in every layer (Mistral), None for full attention.
    Windows in some layers only (Qwen2/Qwen3 with use_sliding_window, Gemma-style layer_types) raise one clear error."""
    window = getattr(src, "sliding_window", None)
    layer_types = set(getattr(src, "layer_types", None) or ())
    if getattr(src, "use_sliding_window", None) is False or layer_types == {"full_attention"} or window is None:
        return None  # Qwen2/Qwen3 keep a sliding_window they do not use
    if layer_types == {"sliding_attention"}:
        return int(window)  # one window in every layer (Qwen2/Qwen3 with max_window_layers 0, as Mistral)
    if getattr(src, "use_sliding_window", False) or layer_types:
        raise TinyOnnError(f"the source ('{src.model_type}') uses sliding-window attention in some layers only; "
                           "TinyOnn supports full attention, or one window in every layer (Mistral)")
    return int(window)


def check_carvable(src: PretrainedConfig) -> None:
    """One clear error when a source's config shows that a MoE carved from it would not compute what it computes."""
    if src.model_type not in CARVABLE_MODEL_TYPES:
        raise TinyOnnError(f"cannot carve a '{src.model_type}' source: TinyOnn copies attention, embeddings and norms as "
                           f"{', '.join(CARVABLE_MODEL_TYPES)} compute them, and this family computes them otherwise")
    if getattr(src, "mlp_bias", False):
        raise TinyOnnError("the source's MLP has biases (mlp_bias=True); carving supports bias-free SwiGLU MLPs only")
    sliding_window(src)


def moe_config(source: PreTrainedModel, plan: CarvePlan, **moe_fields) -> TinyOnnConfig:
    """The TinyOnn config: attention/embedding fields from the source, MoE fields from the plan and `moe_fields`."""
    src = source.config
    check_carvable(src)
    fields = {k: getattr(src, k) for k in _COPIED_CONFIG if hasattr(src, k)}
    fields["sliding_window"] = sliding_window(src)
    attn = source.base_model.layers[0].self_attn
    fields["head_dim"] = getattr(src, "head_dim", None) or src.hidden_size // src.num_attention_heads
    fields["rope_parameters"] = dict(getattr(src, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0})
    fields["attention_bias"] = attn.q_proj.bias is not None
    fields["attention_out_bias"] = attn.o_proj.bias is not None
    fields["use_qk_norm"] = hasattr(attn, "q_norm")
    fields["source_model_type"] = src.model_type
    fields.update(
        num_experts=plan.num_experts,
        moe_intermediate_size=plan.expert_size,
        shared_expert_intermediate_size=plan.shared_size,
        num_expert_groups=plan.layers[0].groups,
    )
    fields.update(moe_fields)
    return TinyOnnConfig(**fields)


def expert_weights(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, idx_EI: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """An FFN's neurons `idx_EI` [E, I] as the fused expert tensors `TinyOnnExperts` keeps: gate_up [E, 2I, D] (each
    expert's gate rows, then its up rows) and down [E, D, I], from gate, up [N, D] and down [D, N]."""
    gate_up = torch.cat([gate[idx_EI], up[idx_EI]], dim=1)  # [E, 2I, D]
    return gate_up, down[:, idx_EI].permute(1, 0, 2).contiguous()  # [D, E, I] -> [E, D, I]


def moe_state_dict(source: PreTrainedModel, plan: CarvePlan, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Source weights outside the FFNs as they are (dequantized if 4-bit); each FFN sliced into shared and routed experts."""
    # a 4-bit source is dequantized before slicing: its packed bytes are not weights
    state = {k: v.to(dtype) for k, v in dense_state_dict(source, skip=".mlp.").items()}
    for mlp, lp in zip(swiglu_mlps(source), plan.layers, strict=True):
        gate, up, down = (dense_weight(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))  # [N, D], [N, D], [D, N]
        p = f"model.layers.{mlp.layer}.mlp."
        gate_up, down_EDI = expert_weights(gate, up, down, lp.experts)
        state[p + "experts.gate_up_proj"] = gate_up.to(dtype)
        state[p + "experts.down_proj"] = down_EDI.to(dtype)
        if lp.shared.numel():
            state[p + "shared_expert.gate_proj.weight"] = gate[lp.shared].to(dtype)
            state[p + "shared_expert.up_proj.weight"] = up[lp.shared].to(dtype)
            state[p + "shared_expert.down_proj.weight"] = down[:, lp.shared].to(dtype)
    return state


def assemble(source: PreTrainedModel, plan: CarvePlan, dtype: torch.dtype = torch.float32, **moe_fields) -> TinyOnnForCausalLM:
    """Build the carved MoE (routers zero-initialised: uniform probabilities until calibrated; output biases, when the
    layout has them, zero until fitted)."""
    config = moe_config(source, plan, **moe_fields)
    with torch.device("meta"):
        model = TinyOnnForCausalLM(config)
    state = moe_state_dict(source, plan, dtype)
    for name, param in model.named_parameters():
        if ".mlp.router." in name or name.endswith(".mlp.output_bias"):
            state[name] = torch.zeros(param.shape, dtype=dtype)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    assert not missing and not unexpected, (missing, unexpected)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # buffers were on meta
    return model.to(next(source.parameters()).device).eval()
