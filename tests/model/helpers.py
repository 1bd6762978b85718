"""Tiny random TinyOnn models and the dispatch paths of their MoE blocks, shared by the model tests."""

from __future__ import annotations

import torch

from tiny_onn.model import TinyOnnConfig, TinyOnnForCausalLM

# every way TinyOnnExperts can run the selected experts; "X-dense-down" is path X with the dense down projection
# ("bag" is inference only: under autograd it runs "gather")
PATHS = ("dense", "loop", "loop-dense-down", "fused", "sorted", "gather", "bag", "padded", "padded-dense-down", "grouped_mm")

ROUTINGS = {
    "flat top-k": dict(),
    "hierarchical top-k": dict(router_type="hierarchical", num_expert_groups=2),
    "flat top-p": dict(router_top_p=0.6, min_experts_per_tok=1, max_experts_per_tok=5),
    "hierarchical top-p": dict(router_type="hierarchical", num_expert_groups=2, router_top_p=0.5, max_experts_per_tok=4),
    "probs weighting": dict(expert_weighting="probs"),
    "dense mixture": dict(moe_mode="dense_mixture"),
    # gate routers hand their gate pre-activations to the experts (dense and gather paths)
    "gate router": dict(router_score="gate", router_rank=0),
    "gate router rank 2 top-p": dict(router_score="gate", router_rank=2, router_top_p=0.6, max_experts_per_tok=5),
    # one neuron per expert (the knowledge benchmark's layouts): the gather path sums down columns in place
    "one-neuron gate router": dict(router_score="gate", router_rank=0, num_experts=48, moe_intermediate_size=1,
                                   num_experts_per_tok=12),
    "one-neuron lowrank router top-p": dict(router_score="lowrank", router_rank=4, num_experts=48,
                                            moe_intermediate_size=1, router_top_p=0.3, max_experts_per_tok=20),
    # two-stage gate routers: candidates' up pre-activations gathered (few tokens) or from one GEMM, handed over
    "two-stage gate router": dict(router_score="gate", router_rank=0, router_candidates=4),
    "one-neuron two-stage gate router top-p": dict(router_score="gate", router_rank=2, num_experts=48,
                                                   moe_intermediate_size=1, router_candidates=20, router_top_p=0.4,
                                                   max_experts_per_tok=16),
}


def tiny_moe(seed: int = 0, **fields) -> TinyOnnForCausalLM:
    """A 2-layer TinyOnn (hidden 32, 8 experts of 8 neurons, top-2, a shared expert of 16) with weights large enough
    that routing is decisive (no near-ties between experts) and outputs are far from zero."""
    cfg = dict(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=8,
        shared_expert_intermediate_size=16, pad_token_id=0, eos_token_id=1,
    )
    cfg.update(fields)
    torch.manual_seed(seed)
    model = TinyOnnForCausalLM(TinyOnnConfig(**cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".router." in name:
                p.normal_(0.0, 1.0)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return model.eval()


def use_path(model: TinyOnnForCausalLM, path: str) -> None:
    """Force every MoE block of `model` onto one dispatch path ("auto" restores the automatic choice)."""
    for layer in model.model.layers:
        experts = layer.mlp.experts
        experts.path = path.removesuffix("-dense-down")
        if path == "auto":
            experts.dense_down_max_inter = type(experts).dense_down_max_inter
        else:
            experts.dense_down_max_inter = experts.down_proj.shape[-1] if path.endswith("-dense-down") else 0
