"""The MoE layer's routing, checked against hand computations through its public behaviour: the model's modules and
weights as exported (`model.layers.{l}.mlp.{router,experts,shared_expert}`), `select_experts` and `load_balancing_loss`.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from tiny_onn.model import TinyOnnConfig, TinyOnnForCausalLM, select_experts
from tiny_onn.model.modeling_tiny_onn import load_balancing_loss

D = 16  # hidden size of every test model


def moe_layer(seed: int = 0, **overrides) -> torch.nn.Module:
    """The MoE block of a one-layer TinyOnn model, every weight drawn at a scale where outputs are far from zero."""
    settings = dict(vocab_size=50, hidden_size=D, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=3)
    torch.manual_seed(seed)
    model = TinyOnnForCausalLM(TinyOnnConfig(**{**settings, **overrides}))
    block = model.model.layers[0].mlp
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
    return block


def layer_output(block, x: torch.Tensor) -> torch.Tensor:
    out = block(x)
    return out[0] if isinstance(out, tuple) else out


def expert_output(block, e: int, x_ND: torch.Tensor) -> torch.Tensor:
    """Expert e by hand from its stored weights: gate_up_proj [E, 2I, D] (gate rows first), down_proj [E, D, I]."""
    inter = block.config.moe_intermediate_size
    gate_up, down = block.experts.gate_up_proj[e], block.experts.down_proj[e]
    return (F.silu(x_ND @ gate_up[:inter].T) * (x_ND @ gate_up[inter:].T)) @ down.T


def flat_router_probs(block, x_ND: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    weight = block.router.weight if weight is None else weight
    return torch.softmax(x_ND @ weight.T, dim=-1)  # [N, E]


def by_hand_selection(probs: list[float], top_p: float, min_k: int, max_k: int) -> set[int]:
    """The fewest highest-probability experts whose probabilities add up to top_p, at least min_k, at most max_k."""
    order = sorted(range(len(probs)), key=lambda e: -probs[e])
    k, mass = 0, 0.0
    while mass < top_p:
        mass += probs[order[k]]
        k += 1
    return set(order[: max(min_k, min(max_k, k))])


PROBS = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.4, 0.1, 0.2, 0.3], [0.91, 0.04, 0.03, 0.02]])


@pytest.mark.parametrize(("top_p", "min_k", "max_k"),
                         [(0.75, 1, 4), (0.85, 1, 4), (0.45, 1, 4), (0.3, 3, 4), (0.97, 1, 2), (0.97, 1, 4)])
def test_top_p_selects_the_fewest_experts_reaching_p_within_min_and_max_k(top_p, min_k, max_k):
    selected = select_experts(PROBS, top_k=1, top_p=top_p, min_k=min_k, max_k=max_k)
    for row, sel in zip(PROBS.tolist(), selected, strict=True):
        assert set(sel.nonzero().flatten().tolist()) == by_hand_selection(row, top_p, min_k, max_k)


def test_top_p_counts_on_known_rows():
    # cumulative sorted mass: row 0 0.5, 0.8, …; row 1 0.4, 0.7, 0.9, …; row 2 0.91, … -> 0.75 needs 2, 3 and 1 experts
    assert select_experts(PROBS, top_k=1, top_p=0.75).sum(-1).tolist() == [2, 3, 1]
    assert select_experts(PROBS, top_k=1, top_p=0.75, min_k=2, max_k=2).sum(-1).tolist() == [2, 2, 2]


def test_top_k_selects_the_k_most_probable_experts():
    selected = select_experts(PROBS, top_k=2)
    assert [set(s.nonzero().flatten().tolist()) for s in selected] == [{1, 3}, {0, 3}, {0, 1}]


def test_selected_experts_are_summed_with_weight_one_and_the_router_gets_d_dp():
    block = moe_layer(shared_expert_intermediate_size=2).train()
    x_ND = torch.randn(7, D, generator=torch.Generator().manual_seed(1))
    g_ND = torch.randn(7, D, generator=torch.Generator().manual_seed(2))  # the upstream gradient dL/d(output)
    with torch.no_grad():
        probs_NE = flat_router_probs(block, x_ND)
        sel_NE = torch.zeros_like(probs_NE).scatter_(1, probs_NE.topk(2, dim=-1).indices, 1.0)
        y_END = torch.stack([expert_output(block, e, x_ND) for e in range(4)])
        sh = block.shared_expert
        shared_ND = (F.silu(x_ND @ sh.gate_proj.weight.T) * (x_ND @ sh.up_proj.weight.T)) @ sh.down_proj.weight.T
        expected_ND = shared_ND + (sel_NE.T[:, :, None] * y_END).sum(0)

    out = layer_output(block, x_ND[None])[0]
    torch.testing.assert_close(out, expected_ND, atol=1e-5, rtol=1e-5)  # weight exactly 1: no rescaling by p
    with torch.no_grad():
        torch.testing.assert_close(layer_output(block, x_ND[None])[0], expected_ND, atol=1e-5, rtol=1e-5)

    (out * g_ND).sum().backward()
    # weight 1 + p - stopgrad(p): dL/dp of a selected (token, expert) is <g_t, y_te>, and 0 for the others
    contrib_NE = (g_ND[None] * y_END).sum(-1).T * sel_NE
    weight = block.router.weight.detach().clone().requires_grad_(True)
    (flat_router_probs(block, x_ND, weight) * contrib_NE).sum().backward()
    torch.testing.assert_close(block.router.weight.grad, weight.grad, atol=1e-5, rtol=1e-4)
    assert weight.grad.abs().max() > 1e-3


def _layer_tokens(mask: list[int], logp_NE: torch.Tensor, sel_NE: torch.Tensor) -> float:
    """Switch load balance of one layer with plain loops: E * sum_e f_e * P_e over the unmasked tokens, f_e the share of
    all selections that went to e, P_e the mean router probability of e."""
    E = logp_NE.shape[1]
    kept = [t for t in range(len(mask)) if mask[t]]
    selections = sum(int(sel_NE[t, e]) for t in kept for e in range(E))
    loss = 0.0
    for e in range(E):
        f = sum(int(sel_NE[t, e]) for t in kept) / selections
        P = sum(float(logp_NE[t, e].exp()) for t in kept) / len(kept)
        loss += f * P
    return E * loss


def test_load_balancing_loss_matches_a_hand_computation():
    probs_a = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    probs_b = torch.tensor([[0.3, 0.3, 0.4], [0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    sel_a = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.bool)  # top-1
    sel_b = torch.tensor([[1, 0, 1], [1, 1, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)  # top-2
    mask = [1, 1, 1, 0]  # the last token is padding
    got = load_balancing_loss((probs_a.log(), probs_b.log()), (sel_a, sel_b), torch.tensor([mask]))
    expected = (_layer_tokens(mask, probs_a.log(), sel_a) + _layer_tokens(mask, probs_b.log(), sel_b)) / 2
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # layer a by hand: f = (2/3, 1/3, 0), P = (1.3/3, 1.1/3, 0.6/3) -> 3 * (2.6 + 1.1) / 9
    assert _layer_tokens(mask, probs_a.log(), sel_a) == pytest.approx(3 * (2.6 + 1.1) / 9)
    # perfectly balanced routing scores 1, everything on one expert scores E
    uniform = torch.full((6, 3), 1 / 3).log()
    balanced = torch.eye(3, dtype=torch.bool).repeat(2, 1)
    assert float(load_balancing_loss((uniform,), (balanced,), None)) == pytest.approx(1.0)
    collapsed = torch.tensor([[1.0, 0.0, 0.0]] * 6).clamp_min(1e-30).log()
    onto_0 = torch.zeros(6, 3, dtype=torch.bool)
    onto_0[:, 0] = True
    assert float(load_balancing_loss((collapsed,), (onto_0,), None)) == pytest.approx(3.0)


def test_dense_mixture_with_uniform_routing_equals_the_dense_ffn():
    torch.manual_seed(0)
    dense = LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=12, num_attention_heads=2))
    block = moe_layer(moe_mode="dense_mixture", num_experts=4, moe_intermediate_size=3)
    neurons = torch.randperm(12).view(4, 3)  # each expert a slice of the dense FFN's neurons
    with torch.no_grad():
        for e, idx in enumerate(neurons):
            block.experts.gate_up_proj[e] = torch.cat([dense.gate_proj.weight[idx], dense.up_proj.weight[idx]])
            block.experts.down_proj[e] = dense.down_proj.weight[:, idx]
        block.router.weight.zero_()  # uniform routing, p = 1/E
    x = torch.randn(2, 5, D)
    out = layer_output(block, x)
    torch.testing.assert_close(out, dense(x), atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    for e in range(4):  # phase 1: every expert computes and receives gradients
        assert block.experts.gate_up_proj.grad[e].abs().sum() > 0 and block.experts.down_proj.grad[e].abs().sum() > 0
    block.routing = dataclasses.replace(block.routing, mode="sparse")  # top-2 of 4 experts is another function
    with torch.no_grad():
        assert not torch.allclose(layer_output(block, x), dense(x), atol=1e-3)


def test_hierarchical_probabilities_are_group_times_expert_and_sum_to_one():
    block = moe_layer(router_type="hierarchical", num_expert_groups=2, num_experts=6, num_experts_per_tok=2)
    model = TinyOnnForCausalLM(block.config)
    model.model.layers[0].mlp = block
    seen = []
    block.register_forward_pre_hook(lambda module, args: seen.append(args[0].reshape(-1, D)))
    with torch.no_grad():
        out = model.model(input_ids=torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(3)))
        x_ND = seen[0]  # the MoE layer's input
        probs_NE = out.router_logits[0].exp()  # router_logits are log-probabilities (load_balancing_loss reads them so)
        main_NG = torch.softmax(x_ND @ block.router.group_weight.T, dim=-1)  # p_main(group)
        sub_NGe = torch.softmax((x_ND @ block.router.weight.T).view(9, 2, 3), dim=-1)  # p_sub(expert | group)
    torch.testing.assert_close(probs_NE, (main_NG[:, :, None] * sub_NGe).reshape(9, 6), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probs_NE.sum(-1), torch.ones(9), atol=1e-6, rtol=0)
    assert probs_NE.max() > 0.3 and probs_NE.min() < 0.1  # far from uniform: the check is not trivially met


def _tiny_model(**overrides) -> TinyOnnForCausalLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=40, hidden_size=D, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=3)
    return TinyOnnForCausalLM(TinyOnnConfig(**(cfg | overrides)))


def test_router_z_loss_is_returned_in_training_and_matches_a_hand_computation():
    model = _tiny_model().train()
    ids = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(1))
    inputs = []
    hooks = [layer.post_attention_layernorm.register_forward_hook(lambda m, i, o: inputs.append(o.reshape(-1, D)))
             for layer in model.model.layers]
    out = model(input_ids=ids)
    for h in hooks:
        h.remove()
    by_hand = torch.stack([torch.logsumexp(x @ layer.mlp.router.weight.T, dim=-1).pow(2).mean()
                           for x, layer in zip(inputs, model.model.layers, strict=True)]).mean()
    torch.testing.assert_close(out.router_z_loss, by_hand)
    out.router_z_loss.backward()  # differentiable: it trains the routers
    assert model.model.layers[0].mlp.router.weight.grad.abs().sum() > 0
    assert model.eval()(input_ids=ids).router_z_loss is None  # inference computes none
    assert not any(hasattr(layer.mlp.router, "z_loss") for layer in model.model.layers)  # no hidden attribute


def test_set_routing_changes_the_routing_but_not_the_saved_config(tmp_path):
    model = _tiny_model().eval()
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        top2 = model(input_ids=ids).logits
        with model.routing_settings(top_k=4):
            every = model(input_ids=ids).logits
            assert all(s.all() for s in model.model(input_ids=ids).expert_selections)
        assert torch.equal(model(input_ids=ids).logits, top2)  # restored after the block
        before = model.set_routing(mode="dense_mixture")
        assert before.mode == "sparse" and model.config.moe_mode == "sparse"
        mixture = model(input_ids=ids).logits
    assert not torch.allclose(every, top2) and not torch.allclose(mixture, top2)
    model.save_pretrained(tmp_path)
    reloaded = TinyOnnForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.moe_mode == "sparse" and reloaded.model.layers[0].mlp.routing.mode == "sparse"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, top2)
    with pytest.raises(ValueError, match="top_k must be between 1"):
        model.set_routing(top_k=5)
    with pytest.raises(ValueError, match="routing mode"):
        model.set_routing(mode="soft")
