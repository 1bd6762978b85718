"""Greedy decoding with the KV cache gives, at every step, the logits of a full forward over the sequence so far: flat
and hierarchical routers, top-k and top-p. The cached steps run one token through the decode kernel, the full forwards
run without it (the multi-token paths on the parameters themselves), so this also ties the two together."""

from __future__ import annotations

import pytest
import torch

from tests.model.helpers import tiny_moe

ROUTERS = {
    "flat top-k": dict(),
    "hierarchical top-k": dict(router_type="hierarchical", num_expert_groups=2),
    "flat top-p": dict(router_top_p=0.6, max_experts_per_tok=5),
    "hierarchical top-p": dict(router_type="hierarchical", num_expert_groups=2, router_top_p=0.5, max_experts_per_tok=4),
    # one cached token gathers its candidates' up rows, the full forward computes every up row: the same scores
    "two-stage gate top-k": dict(router_score="gate", router_rank=0, num_experts=48, moe_intermediate_size=1,
                                 num_experts_per_tok=8, router_candidates=16),
}


@pytest.mark.parametrize("routing", list(ROUTERS))
def test_cached_greedy_decoding_equals_full_forwards(routing):
    model = tiny_moe(seed=4, **ROUTERS[routing])
    prompt = torch.randint(2, 64, (1, 7), generator=torch.Generator().manual_seed(5))
    new = 12
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        seq = out.sequences
        assert seq.shape[1] == prompt.shape[1] + new
        model.use_decode_kernel(False)
        for step, cached_logits in enumerate(out.logits):
            end = prompt.shape[1] + step  # the step predicted token `end` from the tokens before it
            full = model(seq[:, :end], use_cache=False).logits[:, -1]
            torch.testing.assert_close(cached_logits, full, atol=1e-5, rtol=1e-5)
            assert int(full.argmax()) == int(seq[0, end])


def test_decode_steps_take_the_few_token_paths():
    """CPU: a prefill longer than `bag_max_tokens` runs every expert (dense: nearly all are touched), each one-token
    step takes the bag path (its experts' rows read in place)."""
    model = tiny_moe()
    for layer in model.model.layers:
        layer.mlp.experts.bag_max_tokens = 8
    experts = model.model.layers[0].mlp.experts
    seen = []
    run = experts.forward

    def spy(x_ND, idx_NK, *args, **kwargs):
        seen.append(experts.pick_path(x_ND.shape[0], idx_NK.shape[1], x_ND))
        return run(x_ND, idx_NK, *args, **kwargs)

    experts.forward = spy
    prompt = torch.randint(2, 64, (1, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert seen == ["dense", "bag", "bag"]
