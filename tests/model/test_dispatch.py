"""Every dispatch path of the MoE block computes the same function as the original per-expert implementation: outputs,
gradients, selections and the training statistics SMK² reads, in every routing mode; every expert active = dense."""

from __future__ import annotations

import types

import pytest
import torch

from tests.model.helpers import PATHS, ROUTINGS, tiny_moe, use_path
from tiny_onn.carve.assemble import assemble
from tiny_onn.carve.plan import CarvePlan, LayerPlan
from tiny_onn.model import select_experts


def reference_forward(block, hidden_states, routing_outputs=True):
    """The block as first written (boolean selection, `nonzero`, one expert at a time through `expert_forward`, outputs
    weighted then summed with index_add): the reference every path must match (its routing outputs always returned)."""
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    logp, z_loss = block.router.log_probs_and_z_loss(x, z_loss=block.training)
    probs = logp.exp()
    cfg, routing, experts = block.config, block.routing, block.experts
    E = probs.shape[-1]
    dense_mixture = routing.mode == "dense_mixture"
    with torch.no_grad():
        if dense_mixture:
            selected = torch.ones_like(probs, dtype=torch.bool)
        else:
            selected = select_experts(probs, routing.top_k, routing.top_p, cfg.min_experts_per_tok,
                                      cfg.max_experts_per_tok)
    token_P, expert_P = selected.nonzero(as_tuple=True)
    p_P = probs[token_P, expert_P]
    if dense_mixture:
        weight_P = p_P * E
    elif cfg.expert_weighting == "probs":
        weight_P = p_P
    else:
        weight_P = (p_P - p_P.detach()) + 1.0
    out = block.shared_expert(x) if block.shared_expert is not None else torch.zeros_like(x)
    for e in range(E):
        rows = expert_P == e
        if not rows.any():
            continue
        y = experts.expert_forward(e, x[token_P[rows]])
        if experts.track_stats:
            experts.output_norm_sum[e] += y.detach().float().norm(dim=-1).sum()
            experts.routed_count[e] += rows.sum()
        out = out.index_add(0, token_P[rows], y * weight_P[rows, None].to(y.dtype))
    return out.reshape(shape), logp, selected, z_loss


def use_reference(model) -> None:
    for layer in model.model.layers:
        layer.mlp.forward = types.MethodType(reference_forward, layer.mlp)


def _run(model, ids, track_stats: bool):
    for layer in model.model.layers:
        layer.mlp.experts.track_stats = track_stats
        layer.mlp.experts.reset_stats()
    model.zero_grad()
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    stats = [(layer.mlp.experts.output_norm_sum.clone(), layer.mlp.experts.routed_count.clone())
             for layer in model.model.layers]
    with torch.no_grad():
        selections = model.model(input_ids=ids).expert_selections
    return out.logits.detach(), grads, stats, selections


@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("path", PATHS)
def test_every_path_matches_the_reference(routing, path):
    """Logits, every parameter's gradient (router included), selections and statistics, in float64 (grouped_mm
    supports float32 only: there float32 and a float32 tolerance)."""
    dtype = torch.float32 if path == "grouped_mm" else torch.float64
    if path == "grouped_mm" and ROUTINGS[routing].get("moe_intermediate_size", 8) * 4 % 16:
        pytest.skip("torch._grouped_mm needs 16-byte strides: experts narrower than 4 float32 neurons never take it")
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-6, rtol=1e-6)
    # 18 tokens; the dense path also on 4 (its down projection changes form when tokens <= the expert width, 8)
    for shape in [(2, 9)] + ([(1, 4)] if path == "dense" else []):
        _check_path_against_the_reference(routing, path, dtype, tol, shape)


def _check_path_against_the_reference(routing, path, dtype, tol, shape):
    ids = torch.randint(2, 64, shape, generator=torch.Generator().manual_seed(1))
    model = tiny_moe(**ROUTINGS[routing]).to(dtype).train()
    use_path(model, path)
    logits, grads, stats, selections = _run(model, ids, track_stats=True)
    ref = tiny_moe(**ROUTINGS[routing]).to(dtype).train()
    use_reference(ref)
    ref_logits, ref_grads, ref_stats, ref_selections = _run(ref, ids, track_stats=True)
    torch.testing.assert_close(logits, ref_logits, **tol)
    assert grads.keys() == ref_grads.keys() and any(".router." in n for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], **tol, msg=lambda m, n=name: f"{n}: {m}")
    for (norm_sum, count), (ref_norm_sum, ref_count) in zip(stats, ref_stats, strict=True):
        assert torch.equal(count, ref_count) and count.sum() > 0
        torch.testing.assert_close(norm_sum, ref_norm_sum, rtol=1e-4, atol=1e-5)
    for sel, ref_sel in zip(selections, ref_selections, strict=True):
        assert torch.equal(sel, ref_sel)


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_decode_paths_equal_the_grouped_path_for_1_to_16_tokens(routing):
    """The few-token paths (bag, gather, the CPU loop, sorted, dense) give the grouped (padded) path's logits for
    N = 1..16 tokens."""
    model = tiny_moe(seed=2, **ROUTINGS[routing])
    ids = torch.randint(2, 64, (1, 16), generator=torch.Generator().manual_seed(3))
    for n in range(1, 17):
        logits = {}
        for path in ("padded", "bag", "gather", "loop", "sorted", "dense"):
            use_path(model, path)
            with torch.no_grad():
                logits[path] = model(ids[:, :n]).logits
        for path in ("bag", "gather", "loop", "sorted", "dense"):
            torch.testing.assert_close(logits[path], logits["padded"], atol=1e-5, rtol=1e-5)


def test_auto_path_choice():
    experts = tiny_moe().model.layers[0].mlp.experts
    x = torch.zeros(1, 32)
    E, inter = experts.num_experts, experts.down_proj.shape[-1]
    # inference on CPU: the bag path up to bag_max_tokens tokens, whatever the number of experts selected
    for k in (1, 2, 6):
        assert experts.pick_path(1, k, x, grad=False) == experts.pick_path(experts.bag_max_tokens, k, x, grad=False) == "bag"
    assert experts.pick_path(experts.bag_max_tokens + 1, 2, x, grad=False) == "dense"
    assert experts.pick_path(1, E, x, grad=False) == "dense"  # every expert selected: one GEMM each
    experts.bag_min_inter = inter + 1  # experts narrower than that: the one-token paths below
    assert experts.pick_path(1, 2, x, grad=False) == "loop"
    experts.bag_max_tokens = 0  # off: the one-token paths of training
    for grad in (False, True):
        assert experts.pick_path(1, 2, x, grad=grad) == "loop"  # one token, few experts, CPU
        assert experts.pick_path(1, 6, x, grad=grad) == "gather"
        assert experts.pick_path(8, 2, x, grad=grad) == "dense"  # CPU, a few tokens: nearly every expert is touched
        assert experts.pick_path(1, E, x, grad=grad) == experts.pick_path(512, E, x, grad=grad) == "dense"
    # inference: the sorted path once tokens per expert × expert width reach sorted_min_rows_x_width
    experts.sorted_min_inter = inter
    busy = -(-experts.sorted_min_rows_x_width * E // (2 * inter))  # tokens that reach the threshold at k = 2
    assert experts.pick_path(busy, 2, x, grad=False) == "sorted"
    assert experts.pick_path(busy - 1, 2, x, grad=False) == "dense"
    with torch.no_grad():  # grad=None: read from the grad mode
        assert experts.pick_path(busy, 2, x) == "sorted"
    experts.sorted_min_inter = inter + 1  # narrower experts than that never take it
    assert experts.pick_path(100 * busy, 2, x, grad=False) == "dense"
    # training: the fused per-expert path once tokens per expert × expert width reach fused_min_rows_x_width
    busy = -(-experts.fused_min_rows_x_width * E // (2 * inter))  # tokens that reach it at k = 2
    assert experts.pick_path(busy, 2, x) == ("fused" if inter >= experts.fused_min_inter else "dense")  # weights: grad
    experts.fused_min_inter = inter
    assert experts.pick_path(busy, 2, x, grad=True) == "fused"  # busy experts: per-expert GEMMs
    assert experts.pick_path(busy - 1, 2, x, grad=True) == "dense"
    assert experts.pick_path(busy, 2, x, grad=False) != "fused"  # inference never takes it
    experts.fused_min_inter = inter + 1  # narrower experts than that never take it
    assert experts.pick_path(100 * busy, 2, x, grad=True) == "dense"
    experts.path = "loop"
    assert experts.pick_path(512, 2, x, grad=False) == "loop"


def _random_split(source, experts: int, seed: int = 0) -> CarvePlan:
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i, layer in enumerate(source.model.layers):
        n = layer.mlp.gate_proj.weight.shape[0]
        layers.append(LayerPlan(layer=i, shared=torch.zeros(0, dtype=torch.long),
                                experts=torch.randperm(n, generator=g).view(experts, -1)))
    return CarvePlan(layers=layers, method="random")


@pytest.mark.parametrize("path", PATHS)
def test_every_expert_active_equals_dense_on_every_path(tiny_model_dir, path):
    """Prefill logits and greedy decoding with the KV cache (one token at a time) equal the dense source's."""
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    moe = assemble(dense, _random_split(dense, 4), num_experts_per_tok=4)
    use_path(moe, path)
    ids = torch.randint(3, dense.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-4, rtol=1e-4)
        kw = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        got, want = moe.generate(ids[:1], **kw), dense.generate(ids[:1], **kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_skipping_the_routing_outputs_keeps_the_function(routing):
    """Without routing outputs (generation, perplexity) a flat top-k router with weight 1 selects from its raw scores
    and the block skips the softmax and the [N, E] selection: same logits as with them, on every token count the
    dispatch paths distinguish; other routings still return them, as they need the probabilities."""
    model = tiny_moe(seed=4, **ROUTINGS[routing]).double()
    ids = torch.randint(2, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    lean = (ROUTINGS[routing].get("router_type", "flat") == "flat" and not ROUTINGS[routing].get("router_top_p")
            and ROUTINGS[routing].get("expert_weighting", "straight_through") == "straight_through"
            and ROUTINGS[routing].get("moe_mode", "sparse") == "sparse")
    with torch.no_grad():
        for n in (1, 4, 9):
            kept = model(ids[:, :n], output_router_logits=True)
            skipped = model(ids[:, :n])  # the config's default: no router logits wanted
            torch.testing.assert_close(skipped.logits, kept.logits, atol=1e-12, rtol=1e-12)
            assert kept.router_logits is not None and skipped.router_logits is None
            inner = model.model(input_ids=ids[:, :n], output_router_logits=False)
            assert (inner.router_logits is None and inner.expert_selections is None) == lean
            full = model.model(input_ids=ids[:, :n])  # called directly: routing outputs kept by default
            assert len(full.router_logits) == len(full.expert_selections) == 2
    with torch.enable_grad():  # a gradient wanted: the weight-1 straight-through path, outputs kept
        assert model.model(input_ids=ids, output_router_logits=False).router_logits is not None


def test_fused_backward_leaves_zero_gradients_for_experts_no_pair_selected():
    """ExpertGroupsFunction writes each busy expert's gradient in place; experts without pairs get exact zeros, and the
    busy experts' gradients equal autograd's over the same per-expert computation."""
    from tiny_onn.model.modeling_tiny_onn import ExpertGroupsFunction

    torch.manual_seed(0)
    E, inter, D, N = 5, 3, 4, 6
    x = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    gate_up = torch.randn(E, 2 * inter, D, dtype=torch.float64, requires_grad=True)
    down = torch.randn(E, D, inter, dtype=torch.float64, requires_grad=True)
    token_P = torch.tensor([0, 3, 1, 2, 5, 4, 0])  # sorted by expert: experts 1 and 3 have no pairs
    expert_P = torch.tensor([0, 0, 2, 2, 2, 4, 4])
    counts = torch.bincount(expert_P, minlength=E).tolist()
    for _ in range(3):  # fresh buffers each call: garbage in an empty buffer would show up as non-zero gradients
        y, _ = ExpertGroupsFunction.apply(x, gate_up, down, None, token_P, counts, torch.nn.functional.silu)
        g = torch.autograd.grad(y.pow(2).sum(), (x, gate_up, down))
        ref_y = torch.zeros_like(x).index_add(0, token_P, torch.stack([
            down[e] @ (torch.nn.functional.silu(gate_up[e, :inter] @ x[t]) * (gate_up[e, inter:] @ x[t]))
            for t, e in zip(token_P.tolist(), expert_P.tolist(), strict=True)]))
        ref_g = torch.autograd.grad(ref_y.pow(2).sum(), (x, gate_up, down))
        torch.testing.assert_close(y, ref_y)
        for a, b in zip(g, ref_g, strict=True):
            torch.testing.assert_close(a, b)
        assert g[1][[1, 3]].abs().max() == 0 and g[2][[1, 3]].abs().max() == 0
