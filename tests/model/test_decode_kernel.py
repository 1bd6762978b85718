"""The CPU decode kernel (`bag_products` on cached transposed weights): the same products as matrix multiplication,
the shared expert folded into the experts' two calls (zero-padded to whole units), and cached copies that follow every
change of the weights."""

from __future__ import annotations

import pytest
import torch

from tests.model.helpers import tiny_moe, use_path
from tiny_onn.model.modeling_tiny_onn import TinyOnnMLP, bag_products


def test_bag_products_are_weighted_sums_of_the_given_rows():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(10, 3, generator=g, dtype=torch.float64)
    rows = torch.tensor([[0, 4, 9], [2, 2, 5]])
    weights = torch.randn(2, 3, generator=g, dtype=torch.float64)
    want = torch.stack([sum(weights[x, r] * table[rows[x, r]] for r in range(3)) for x in range(2)])
    torch.testing.assert_close(bag_products(rows, table, weights), want)


@pytest.fixture(params=[1, 4], ids=["1-thread", "4-threads"])
def threads(request):
    """Runs a test with 1 and with 4 intra-op threads: with fewer tokens than threads the decode kernel splits each
    token's down projection into several bags (one per unit, or per thread), which must not change the sums."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("shared", [16, 12, 3, 0])  # whole units of 8 neurons, padded units, none
@pytest.mark.parametrize("fields", [dict(), dict(expert_weighting="probs"), dict(router_top_p=0.6, max_experts_per_tok=5)])
def test_the_shared_expert_folds_into_the_bag_path(shared, fields, threads):
    model = tiny_moe(seed=7, shared_expert_intermediate_size=shared, **fields).double()
    ids = torch.randint(2, 64, (2, 5), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        for n in (1, 3, 5):
            use_path(model, "padded")
            want = model(ids[:, :n]).logits
            use_path(model, "bag")
            torch.testing.assert_close(model(ids[:, :n]).logits, want, atol=1e-10, rtol=1e-10)


def _one_token_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_cached_tables_follow_every_change_of_the_weights():
    """An optimizer step, load_state_dict and a dtype change each rebuild the copies; training mode drops them."""
    model = tiny_moe(seed=9)
    reference = tiny_moe(seed=9)
    reference.use_decode_kernel(False)  # reads the parameters themselves
    ids = torch.randint(2, 64, (1, 1), generator=torch.Generator().manual_seed(10))
    experts = model.model.layers[0].mlp.experts
    torch.testing.assert_close(_one_token_logits(model, ids), _one_token_logits(reference, ids))
    assert experts.decode_tables._tables  # built by the first decode
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for m in (model, reference):
        m.zero_grad()
    for m in (model, reference):
        m(torch.randint(2, 64, (1, 6), generator=torch.Generator().manual_seed(11)), labels=torch.ones(1, 6).long()
          ).loss.backward()
    optimizer.step()
    torch.optim.SGD(reference.parameters(), lr=0.5).step()
    torch.testing.assert_close(_one_token_logits(model, ids), _one_token_logits(reference, ids))
    other = tiny_moe(seed=12)
    model.load_state_dict(other.state_dict())
    reference.load_state_dict(other.state_dict())
    torch.testing.assert_close(_one_token_logits(model, ids), _one_token_logits(reference, ids))
    model.double()
    reference.double()
    torch.testing.assert_close(_one_token_logits(model, ids), _one_token_logits(reference, ids))
    model.train()
    assert not experts.decode_tables._tables
    model.eval()


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_mlp_decode_kernel_equals_its_linear_layers(dtype, tokens, threads):
    model = tiny_moe(seed=13)
    mlp: TinyOnnMLP = model.model.layers[0].mlp.shared_expert.to(dtype)
    mlp.bag_max_tokens = tokens
    x = torch.randn(1, tokens, 32, generator=torch.Generator().manual_seed(14)).to(dtype)
    with torch.no_grad():
        got = mlp(x)
        want = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
    assert mlp.decode_tables._tables and got.shape == want.shape
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(got, want, **tol)
    y = mlp(x.requires_grad_(True))  # autograd: the linear layers
    assert y.grad_fn is not None


@pytest.mark.parametrize("fields", [
    dict(router_score="gate", router_rank=0),
    dict(router_score="gate", router_rank=0, router_candidates=4),
    dict(router_score="gate", router_rank=2, num_experts=48, moe_intermediate_size=1, num_experts_per_tok=8,
         router_candidates=16),
])
def test_gate_routers_read_their_rows_through_the_decode_kernel(fields):
    """One token without autograd: the gate (and candidates' up) pre-activations from the decode kernel equal the
    GEMM's, and so do the logits."""
    model = tiny_moe(seed=15, **fields).double()
    router = model.model.layers[0].mlp.router
    x = torch.randn(1, 32, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    ids = torch.randint(2, 64, (1, 1), generator=torch.Generator().manual_seed(17))
    with torch.no_grad():
        got, logits = router.preactivations(x), model(ids).logits
        assert router.decode_tables._tables  # the kernel ran
        for layer in model.model.layers:
            layer.mlp.router.bag_max_tokens = 0
        want, want_logits = router.preactivations(x), model(ids).logits
    torch.testing.assert_close(got.gate_NF, want.gate_NF)
    if "router_candidates" in fields:
        assert torch.equal(got.candidates_NM.sort().values, want.candidates_NM.sort().values)
        torch.testing.assert_close(got.up_NF, want.up_NF)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)  # pre-activations are float32


def test_weights_made_in_inference_mode_skip_the_decode_kernel():
    """They keep no version counter, so a cached copy could not follow them: the usual paths run instead."""
    ids = torch.randint(2, 64, (1, 1), generator=torch.Generator().manual_seed(18))
    with torch.no_grad():
        want = tiny_moe(seed=19)(ids).logits
    with torch.inference_mode():
        model = tiny_moe(seed=19)
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not model.model.layers[0].mlp.experts.decode_tables._tables


def test_the_decode_kernel_can_be_turned_off_and_on():
    model = tiny_moe(seed=20)
    ids = torch.randint(2, 64, (1, 1), generator=torch.Generator().manual_seed(21))
    block = model.model.layers[0].mlp
    with torch.no_grad():
        on = model(ids).logits
        assert block.experts.decode_tables._tables  # the shared expert folded into the experts' copies
        model.use_decode_kernel(False)
        assert not block.experts.decode_tables._tables
        off = model(ids).logits
        assert not block.experts.decode_tables._tables  # nothing rebuilt: the usual paths ran
        model.use_decode_kernel(True)
        assert block.experts.bag_max_tokens == type(block.experts).bag_max_tokens
        again = model(ids).logits
    assert block.experts.decode_tables._tables
    torch.testing.assert_close(off, on, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, on)
