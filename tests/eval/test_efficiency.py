"""Parameter counts per token."""

from __future__ import annotations

import pytest

from tiny_onn.eval.efficiency import parameter_counts
from tiny_onn.model import TinyOnnConfig, TinyOnnForCausalLM


@pytest.mark.parametrize("score", ["linear", "gate"])
def test_active_parameters_leave_out_the_unselected_experts(score):
    config = TinyOnnConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=4,
                           router_score=score, router_rank=0 if score == "gate" else 64)
    model = TinyOnnForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    unselected = 6 - 2
    gate_up_rows, down_cols = model.model.layers[0].mlp.experts.gate_up_proj[0].numel(), 16 * 4
    # a gate router computes every expert's gate rows (the first half of gate_up_proj), so only up and down are saved
    saved_per_expert = gate_up_rows + down_cols if score == "linear" else gate_up_rows // 2 + down_cols
    counts = parameter_counts(model)
    assert counts["total"] == total
    assert counts["active_per_token"] == total - 2 * unselected * saved_per_expert


def test_two_stage_gate_routers_count_their_candidates_up_rows():
    config = TinyOnnConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=4,
                           router_score="gate", router_rank=0, router_candidates=5)
    model = TinyOnnForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    rows = 16 * 4  # one expert's gate rows, up rows or down columns
    # per layer: every expert's gate rows, the 5 candidates' up rows, the 2 selected experts' down columns
    unused_per_layer = (6 - 5) * rows + (6 - 2) * rows
    assert parameter_counts(model)["active_per_token"] == total - 2 * unused_per_layer
