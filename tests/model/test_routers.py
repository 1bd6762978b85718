"""Router variants: Gaussian scorers (logits = a hand computation; calibration sends each cluster to its own expert),
side inputs (token embedding, running context) that decode with the KV cache exactly as a full forward."""

from __future__ import annotations

import pytest
import torch

from tiny_onn.carve.calibrate import fit_router
from tiny_onn.model import TinyOnnConfig, TinyOnnForCausalLM
from tiny_onn.model.modeling_tiny_onn import TinyOnnRouter, TinyOnnSparseMoeBlock, router_side_input


def _config(**kw) -> TinyOnnConfig:
    base = dict(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, num_expert_groups=2, pad_token_id=0,
                eos_token_id=2)
    return TinyOnnConfig(**{**base, **kw})


def _full_and_cached_logits(model, ids: torch.Tensor, prompt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of one full forward over ids [B, T], and of a forward over the first `prompt` tokens followed by one
    KV-cached step per remaining token, concatenated."""
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        out = model(input_ids=ids[:, :prompt], use_cache=True)
        steps = [out.logits]
        cache = getattr(out, "cache", None) or out.past_key_values  # the field's name depends on the transformers version
        for t in range(prompt, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    return full, torch.cat(steps, dim=1)


def _hand_gaussian(x_ND, mean, log_std, log_prior, log_beta):
    """b_k + β·Σ_d log N(x_d; μ_kd, σ_kd), written with torch.distributions, token by token."""
    rows = []
    for x in x_ND:
        dist = torch.distributions.Normal(mean, log_std.exp())  # [K, D]
        rows.append(log_prior + log_beta.exp() * dist.log_prob(x[None, :]).sum(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("router_type", ["flat", "hierarchical"])
def test_gaussian_logits_equal_a_hand_computation(router_type):
    router = TinyOnnRouter(_config(router_type=router_type, router_score="gaussian"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    x = torch.randn(7, 16, generator=gen)
    expert_logits = _hand_gaussian(x, router.mean, router.log_std, router.log_prior, router.log_beta)
    torch.testing.assert_close(router.scores(x), expert_logits, rtol=1e-5, atol=1e-4)
    logp, probs = router(x)
    if router_type == "flat":
        expected = expert_logits.log_softmax(-1)
    else:  # p(e) = p_main(group) · p_sub(e | group)
        group_logits = _hand_gaussian(x, router.group_mean, router.group_log_std, router.group_log_prior,
                                      router.group_log_beta)
        sub = expert_logits.view(7, 2, 2).log_softmax(-1)
        expected = (group_logits.log_softmax(-1)[:, :, None] + sub).reshape(7, 4)
    torch.testing.assert_close(logp, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(7))


@pytest.mark.parametrize("router_type", ["flat", "hierarchical"])
def test_gaussian_calibration_routes_each_cluster_to_its_expert(router_type):
    """Four clusters of routing inputs, expert c the best for cluster c: after the moment initialisation alone (no Adam
    refinement) every token's top expert is its cluster's."""
    router = TinyOnnRouter(_config(router_type=router_type, router_score="gaussian"))
    gen = torch.Generator().manual_seed(1)
    centres, spread = torch.randn(4, 16, generator=gen) * 2, torch.rand(4, 16, generator=gen) + 0.3
    cluster = torch.arange(4).repeat_interleave(60)
    x = centres[cluster] + spread[cluster] * torch.randn(240, 16, generator=gen)
    gains_TE = torch.nn.functional.one_hot(cluster, 4).float() + 0.05 * torch.rand(240, 4, generator=gen)
    gains_TG = gains_TE.view(240, 2, 2).sum(-1)
    fit_router(router, x, gains_TE, gains_TG, refine_steps=0)
    logp, _ = router(x)
    assert torch.equal(logp.argmax(-1), cluster)
    # the means are the clusters' centres (the tokens each expert serves best)
    torch.testing.assert_close(router.mean, torch.stack([x[cluster == c].mean(0) for c in range(4)]), rtol=0, atol=1e-5)
    # held-out tokens of the same clusters route the same way
    x_new = centres[cluster] + spread[cluster] * torch.randn(240, 16, generator=gen)
    assert (router(x_new)[0].argmax(-1) == cluster).float().mean() > 0.95


def test_context_side_input_is_the_running_mean_of_embeddings():
    gen = torch.Generator().manual_seed(2)
    emb = torch.randn(2, 5, 3, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # the second row is left-padded
    ctx = router_side_input(emb, mask, "context").view(2, 5, 3)
    for b in range(2):
        for t in range(5):
            kept = [emb[b, s] for s in range(t + 1) if mask[b, s]]
            expected = torch.stack(kept).mean(0) if kept else torch.zeros(3)
            torch.testing.assert_close(ctx[b, t], expected)
    torch.testing.assert_close(router_side_input(emb, mask, "embedding"), emb.reshape(-1, 3))


@pytest.mark.parametrize(("score", "side"), [("gaussian", "ffn"), ("linear", "embedding"), ("gaussian", "context"),
                                             ("linear", "context")])
def test_cached_decoding_equals_a_full_forward(score, side):
    torch.manual_seed(0)
    model = TinyOnnForCausalLM(_config(router_type="hierarchical", router_score=score, router_input=side,
                                       shared_expert_intermediate_size=4)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(3))
    full, cached = _full_and_cached_logits(model, ids, prompt=6)
    with torch.no_grad():
        gen_cached = model.generate(ids[:, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
        gen_plain = model.generate(ids[:, :4], max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
    assert gen_cached.tolist() == gen_plain.tolist()
    if side == "context":  # the context differs from the embedding: routing really reads the running mean
        emb = model.model.embed_tokens(ids)
        assert not torch.allclose(router_side_input(emb, None, "context"), emb.reshape(-1, 16))


def test_gaussian_router_config_is_validated():
    with pytest.raises(ValueError, match="router_score"):
        _config(router_score="cosine")
    with pytest.raises(ValueError, match="router_input"):
        _config(router_input="attention")
    assert not hasattr(TinyOnnRouter(_config(router_score="gaussian")), "weight")


def test_lowrank_scores_equal_a_hand_computation():
    router = TinyOnnRouter(_config(router_score="lowrank", router_type="flat", router_rank=3))
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    want = torch.zeros(5, 4)
    for n in range(5):
        g = router.gate_out @ (router.gate_in @ x[n])  # [E·I]
        u = router.up_out @ (router.up_in @ x[n])
        for e in range(4):
            for i in range(8):
                j = e * 8 + i
                want[n, e] += abs(torch.nn.functional.silu(g[j]) * u[j]) * abs(router.neuron_scale[j])
    torch.testing.assert_close(router.lowrank_scores(x), want)
    logp, probs = router(x)
    torch.testing.assert_close(probs, want / want.sum(-1, keepdim=True))  # probabilities ∝ scores
    assert router.expert_directions().shape == (4, 16)


def test_lowrank_router_config_is_validated():
    with pytest.raises(ValueError, match="'flat'"):
        _config(router_score="lowrank", router_type="hierarchical")
    with pytest.raises(ValueError, match="router_input 'ffn'"):
        _config(router_score="lowrank", router_type="flat", router_input="embedding")
    with pytest.raises(ValueError, match="router_rank"):
        _config(router_score="lowrank", router_type="flat", router_rank=0)


def test_lowrank_cached_decoding_equals_a_full_forward():
    torch.manual_seed(0)
    model = TinyOnnForCausalLM(_config(router_score="lowrank", router_type="flat", num_experts=32,
                                       num_experts_per_tok=8, moe_intermediate_size=1, router_rank=4,
                                       shared_expert_intermediate_size=4)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(3))
    full, cached = _full_and_cached_logits(model, ids, prompt=6)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rank", [0, 3])
def test_gate_scores_read_the_experts_gate_rows(rank):
    config = _config(router_score="gate", router_type="flat", router_rank=rank)
    block = TinyOnnSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
    router, experts = block.router, block.experts
    assert not hasattr(router, "gate_in") and hasattr(router, "up_in") == (rank > 0)
    assert all(not k.startswith("router.gate") for k in block.state_dict())  # no copy of the experts' gate rows
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    want = torch.zeros(5, 4)
    for n in range(5):
        for e in range(4):
            for i in range(8):
                j = e * 8 + i
                h = torch.nn.functional.silu(experts.gate_up_proj[e, i] @ x[n])  # the expert's exact gate
                if rank:
                    h = h * (router.up_out[j] @ (router.up_in @ x[n]))
                want[n, e] += abs(h) * abs(router.neuron_scale[j])
    torch.testing.assert_close(router.lowrank_scores(x), want)
    torch.testing.assert_close(router(x)[1], want / want.sum(-1, keepdim=True))
    torch.testing.assert_close(router.expert_directions(), experts.gate_up_proj[:, :8].mean(1))
    with torch.no_grad():
        experts.gate_up_proj[:, :8] *= 2  # the router follows its experts' gate rows
    assert not torch.allclose(router.lowrank_scores(x), want)


def test_gate_router_config_is_validated():
    with pytest.raises(ValueError, match="'flat'"):
        _config(router_score="gate", router_type="hierarchical")
    with pytest.raises(ValueError, match="router_rank"):
        _config(router_score="gate", router_type="flat", router_rank=-1)
    with pytest.raises(RuntimeError, match="bind_experts"):
        TinyOnnRouter(_config(router_score="gate", router_type="flat")).lowrank_scores(torch.randn(2, 16))


@pytest.mark.parametrize("candidates", [0, 12])  # one stage; two stages (the 12 candidates' up rows)
def test_gate_router_save_load_and_cached_decoding(tmp_path, candidates, tiny_tokenizer):
    torch.manual_seed(0)
    model = TinyOnnForCausalLM(_config(router_score="gate", router_type="flat", num_experts=32, num_experts_per_tok=8,
                                       moe_intermediate_size=1, router_rank=0, router_candidates=candidates,
                                       shared_expert_intermediate_size=4, vocab_size=len(tiny_tokenizer))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(3))
    full, cached = _full_and_cached_logits(model, ids, prompt=6)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path)
    loaded = TinyOnnForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, use_cache=False).logits, full)
    # the loaded router reads the loaded experts, not the original model's
    assert loaded.model.layers[0].mlp.router._experts[0] is loaded.model.layers[0].mlp.experts
    assert loaded.config.router_candidates == candidates
    if candidates:
        torch.testing.assert_close(loaded.model.layers[1].mlp.router.down_norm,
                                   model.model.layers[1].mlp.router.down_norm)
        # experts beyond the candidates never run: generate refuses a top-k above them
        from tiny_onn.errors import TinyOnnError
        from tiny_onn.generate import GenerateConfig
        from tiny_onn.generate import run as generate

        tiny_tokenizer.save_pretrained(tmp_path)
        with pytest.raises(TinyOnnError, match="above the 12 candidates"):
            generate(GenerateConfig(model=str(tmp_path), top_k=13, max_new_tokens=1, device="cpu"))


@pytest.mark.parametrize("tokens", [1, 5])  # 1 token: candidates' up rows gathered; 5 × 2 candidates ≥ 4 experts: one GEMM
def test_two_stage_gate_scores_rank_the_estimated_candidates_exactly(tokens):
    """router_candidates M: per token the M experts of largest estimated score Σ_j |act(x·g_j)|·c_j are candidates,
    scored again by the exact Σ_j |act(x·g_j)·(x·u_j)|·|n_j| (n = down_norm); every other expert's logit is below all
    candidates'; the block selects the top-k among the candidates. Computed here neuron by neuron."""
    config = _config(router_score="gate", router_type="flat", router_rank=0, router_candidates=2, num_experts_per_tok=1)
    block = TinyOnnSparseMoeBlock(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
    router, experts = block.router, block.experts
    x = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(1))
    act = torch.nn.functional.silu
    logits = router.scores(x)
    for n in range(tokens):
        estimate, exact = torch.zeros(4), torch.zeros(4)
        for e in range(4):
            for i in range(8):
                g, u = experts.gate_up_proj[e, i] @ x[n], experts.gate_up_proj[e, 8 + i] @ x[n]
                estimate[e] += abs(act(g)) * abs(router.neuron_scale[e * 8 + i])
                exact[e] += abs(act(g) * u) * abs(router.down_norm[e * 8 + i])
        candidates = estimate.topk(2).indices
        outside = [e for e in range(4) if e not in candidates.tolist()]
        torch.testing.assert_close(logits[n, candidates], exact[candidates].log())
        assert logits[n, outside].max() < logits[n, candidates].min()
        with torch.no_grad():
            _, _, selected, _ = block(x[n : n + 1])  # top-1 of the candidates by the exact score
        assert selected[0].nonzero().item() == candidates[exact[candidates].argmax()].item()
    # the one-GEMM and the gathering computation agree, token by token
    pre_all = router.preactivations(x)
    for n in range(tokens):
        one = router.preactivations(x[n : n + 1])
        torch.testing.assert_close(one.up_NF[0], pre_all.up_NF[n], rtol=1e-5, atol=1e-6)


def test_two_stage_gate_router_config_is_validated():
    with pytest.raises(ValueError, match="needs router_score 'gate'"):
        _config(router_candidates=2)
    with pytest.raises(ValueError, match="between the experts chosen per token"):
        _config(router_score="gate", router_type="flat", router_candidates=1)  # fewer than top-2
    with pytest.raises(ValueError, match="between the experts chosen per token"):
        _config(router_score="gate", router_type="flat", router_candidates=5)  # more than the 4 experts


@pytest.mark.parametrize("tokens", [1, 3, 40])  # decode (kernel + bag of down columns); few tokens; prefill (GEMMs)
@pytest.mark.parametrize("shared", [0, 4])
def test_two_stage_selection_fast_path_equals_a_hand_computation(tokens, shared):
    """The inference-only path for two-stage gate routers over one-neuron experts (`_two_stage_selection`): per token,
    the M neurons of largest |act(x·g_j)|·|c_j| are candidates, the k of them with the largest exact
    |act(x·g_j)·(x·u_j)|·|n_j| run, y = Σ act(x·g_j)·(x·u_j)·d_j + shared expert + output bias. Also equal to the general
    path (routing outputs asked for)."""
    E, M, K = 24, 12, 6
    config = _config(router_score="gate", router_type="flat", router_rank=0, router_candidates=M,
                     num_experts=E, num_experts_per_tok=K, moe_intermediate_size=1, moe_output_bias=True,
                     shared_expert_intermediate_size=shared)
    block = TinyOnnSparseMoeBlock(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(1, tokens, 16, generator=torch.Generator().manual_seed(2))
    x_ND = x[0]
    with torch.no_grad():
        assert block.runs_two_stage_selection(x_ND) == (tokens * M >= E or tokens == 1)
        fast = block(x, routing_outputs=False)[0][0]
        general = block(x)[0][0]
        router, experts = block.router, block.experts
        g = x_ND @ experts.gate_up_proj[:, 0].T  # [N, E]
        u = x_ND @ experts.gate_up_proj[:, 1].T
        h = torch.nn.functional.silu(g) * u
        hand = torch.zeros(tokens, 16)
        for n in range(tokens):
            estimate = torch.nn.functional.silu(g[n]).abs() * router.neuron_scale.abs()
            candidates = estimate.topk(M).indices
            exact = (h[n] * router.down_norm).abs()[candidates]
            for j in candidates[exact.topk(K).indices]:
                hand[n] += h[n, j] * experts.down_proj[j, :, 0]
        if shared:
            hand += block.shared_expert(x_ND)
        hand += block.output_bias
    torch.testing.assert_close(fast, hand, rtol=1e-4, atol=1e-4)
    # bit for bit: a last-bit difference would flip near-ties of later layers' top-k (outputs of whole models differ)
    assert torch.equal(fast, general)


def test_two_stage_fast_path_breaks_ties_as_the_general_path():
    """Exact scores below 1e-12 tie in the general path's log-scores; the fast path ranks the same tensor, so it
    selects the same neurons even then (a different neuron of ~0 output could flip a later layer's near-tie)."""
    E, M, K = 24, 16, 8
    config = _config(router_score="gate", router_type="flat", router_rank=0, router_candidates=M,
                     num_experts=E, num_experts_per_tok=K, moe_intermediate_size=1)
    block = TinyOnnSparseMoeBlock(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
        block.router.down_norm[: E * 2 // 3] = 1e-20  # most candidates' exact scores at the clamp floor: ties
    x = torch.randn(1, 30, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert block.runs_two_stage_selection(x[0])
        assert torch.equal(block(x, routing_outputs=False)[0], block(x)[0])
