"""Oracle routing: the expert oracle selects each token's top-k experts by their true gain (computed here from the
experts' outputs one by one), the neuron oracle keeps each token's top neurons by |h|·‖d‖; both restore the model."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_tiny_model
from tests.model.helpers import tiny_moe
from tiny_onn.errors import TinyOnnError
from tiny_onn.eval.oracle import (
    KeptNeurons,
    allocate_neuron_fractions,
    calibrate_neuron_thresholds,
    neuron_oracle,
    neuron_threshold_oracle,
    oracle_expert_routing,
    run_with_hooks,
)


def _expected_oracle_block(block, x_ND: torch.Tensor) -> torch.Tensor:
    """Each token alone: its experts' outputs, its gains, its top-k by gain summed, plus the shared expert."""
    rows = []
    for x in x_ND:
        y_ED = torch.stack([block.experts.expert_forward(e, x[None])[0] for e in range(block.experts.num_experts)])
        R = y_ED.sum(0)
        gains = torch.tensor([2 * torch.dot(R, y) - torch.dot(y, y) for y in y_ED])
        top = sorted(range(len(gains)), key=lambda e: -gains[e])[: block.routing.top_k]
        rows.append(sum(y_ED[e] for e in top) + block.shared_expert(x[None])[0])
    return torch.stack(rows)


def test_oracle_expert_routing_takes_the_top_gain_experts_and_restores_the_router():
    model = tiny_moe(seed=4).double().eval()
    block = model.model.layers[1].mlp
    x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        routed, *_ = block(x)
        with oracle_expert_routing(model):
            oracle, _, selected_NE, _ = block(x)
            ids = torch.randint(2, 64, (1, 7), generator=torch.Generator().manual_seed(1))
            model(ids)  # the whole model runs under the oracle
        restored, *_ = block(x)
        want = _expected_oracle_block(block, x[0])
    torch.testing.assert_close(oracle[0], want, atol=1e-10, rtol=1e-10)
    assert selected_NE.sum(-1).eq(block.routing.top_k).all()
    assert not torch.allclose(routed, oracle)  # the model's own (random) router routes otherwise
    torch.testing.assert_close(restored, routed, atol=0, rtol=0)


def test_neuron_oracle_keeps_each_tokens_top_neurons():
    dense = make_tiny_model("llama", 64).double().eval()
    mlp = dense.model.layers[0].mlp
    x = torch.randn(5, dense.config.hidden_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    F = mlp.gate_proj.weight.shape[0]
    with torch.no_grad():
        full = mlp(x)
        with neuron_oracle(dense, 1.0):
            torch.testing.assert_close(mlp(x), full)
        with neuron_oracle(dense, 0.25):
            got = mlp(x)
        h = torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
        d = mlp.down_proj.weight  # [D, F]
        keep = round(0.25 * F)
        want = []
        for n in range(5):
            order = sorted(range(F), key=lambda j: -(abs(h[n, j]) * d[:, j].norm()))
            want.append(sum(h[n, j] * d[:, j] for j in order[:keep]))
        torch.testing.assert_close(got, torch.stack(want))
        torch.testing.assert_close(mlp(x), full)  # restored


def test_neuron_oracle_with_given_weights_ranks_by_them():
    dense = make_tiny_model("llama", 64).double().eval()
    mlps = [layer.mlp for layer in dense.model.layers]
    x = torch.randn(4, dense.config.hidden_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    F = mlps[0].gate_proj.weight.shape[0]
    weights = [torch.rand(F, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(len(mlps))]
    mlp, w = mlps[0], weights[0]
    with torch.no_grad(), neuron_oracle(dense, 0.5, neuron_weights=weights):
        got = mlp(x)
    h = torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
    keep = F // 2
    want = []
    for n in range(4):
        order = sorted(range(F), key=lambda j: -(abs(h[n, j]) * w[j]))  # the given weight, not the down norm
        want.append(sum(h[n, j] * mlp.down_proj.weight[:, j] for j in order[:keep]))
    torch.testing.assert_close(got, torch.stack(want))
    with pytest.raises(TinyOnnError, match="neuron-weight vectors"), neuron_oracle(dense, 0.5, neuron_weights=weights[:1]):
        pass
    bad = [w.clone() for w in weights]
    bad[1][0] = float("nan")
    with pytest.raises(TinyOnnError, match="FFN 1 must be"), neuron_oracle(dense, 0.5, neuron_weights=bad):
        pass


def test_oracles_refuse_wrong_inputs():
    dense = make_tiny_model("llama", 64)
    with pytest.raises(TinyOnnError, match="carved TinyOnn model"), oracle_expert_routing(dense):
        pass
    with pytest.raises(TinyOnnError, match=r"in \(0, 1\]"), neuron_oracle(dense, 0.0):
        pass


def _scores(mlp, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
    return h, h.abs() * mlp.down_proj.weight.norm(dim=0)


def _ffn_inputs(dense, ids: torch.Tensor) -> list[torch.Tensor]:
    inputs = []
    handles = [layer.mlp.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
               for layer in dense.model.layers]
    with torch.no_grad():
        dense(input_ids=ids)
    for h in handles:
        h.remove()
    return inputs


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_neuron_thresholds_keep_the_asked_fraction_of_the_calibration_scores(scope):
    dense = make_tiny_model("llama", 64).double().eval()
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    thresholds = calibrate_neuron_thresholds(dense, [{"input_ids": ids}], 0.25, scope=scope)
    scores = [_scores(layer.mlp, x)[1] for layer, x in zip(dense.model.layers, _ffn_inputs(dense, ids), strict=True)]
    passed = [int((s >= t).sum()) for s, t in zip(scores, thresholds, strict=True)]
    total = sum(s.numel() for s in scores)
    if scope == "layer":
        assert all(p == round(0.25 * s.numel()) for p, s in zip(passed, scores, strict=True))
    else:
        assert len(set(thresholds)) == 1 and sum(passed) == round(0.25 * total)


def test_neuron_threshold_oracle_keeps_the_neurons_above_its_threshold_and_counts_them():
    dense = make_tiny_model("llama", 64).double().eval()
    mlp = dense.model.layers[0].mlp
    x = torch.randn(5, dense.config.hidden_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        h, score = _scores(mlp, x)
    tau = float(score.median())
    kept = KeptNeurons(len(dense.model.layers))
    with torch.no_grad():
        full = mlp(x)
        with neuron_threshold_oracle(dense, [tau] * len(dense.model.layers), counts=kept):
            got = mlp(x)
        torch.testing.assert_close(mlp(x), full)  # restored
    want = torch.stack([sum(h[n, j] * mlp.down_proj.weight[:, j] for j in range(h.shape[1]) if score[n, j] >= tau)
                        for n in range(5)])
    torch.testing.assert_close(got, want)
    assert kept.kept[0] == int((score >= tau).sum()) and kept.offered[0] == score.numel()
    assert kept.fraction() == pytest.approx(kept.kept[0] / score.numel())


def test_threshold_oracles_refuse_wrong_inputs():
    dense = make_tiny_model("llama", 64)
    with pytest.raises(TinyOnnError, match="scope"):
        calibrate_neuron_thresholds(dense, [], 0.25, scope="token")
    with pytest.raises(TinyOnnError, match="no calibration batches"):
        calibrate_neuron_thresholds(dense, [], 0.25)
    with pytest.raises(TinyOnnError, match="FFNs"), neuron_threshold_oracle(dense, [0.1]):
        pass


def test_allocated_fractions_spend_the_budget_on_the_largest_relative_gains():
    dense = make_tiny_model("llama", 64).double().eval()
    with torch.no_grad():  # layer 1: a few neurons carry nearly all of its output, so it needs few
        dense.model.layers[1].mlp.up_proj.weight[:3] *= 50.0
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    got = allocate_neuron_fractions(dense, [{"input_ids": ids}], 0.25, min_fraction=0.05)
    layers = dense.model.layers
    F = layers[0].mlp.gate_proj.weight.shape[0]
    # independently: each FFN's mean r-th largest score² ÷ its mean ‖y‖², then one neuron at a time to the largest gain
    gains = []
    for layer, x in zip(layers, _ffn_inputs(dense, ids), strict=True):
        with torch.no_grad():
            score = _scores(layer.mlp, x)[1]
            y = layer.mlp(x)
        gains.append([float(v) for v in score.sort(dim=-1, descending=True).values.pow(2).mean(0) / y.pow(2).sum(-1).mean()])
    floor = round(0.05 * F)
    keep = [floor] * len(layers)
    for _ in range(round(0.25 * F * len(layers)) - floor * len(layers)):
        best = max(range(len(layers)), key=lambda i: gains[i][keep[i]] if keep[i] < F else -1.0)
        keep[best] += 1
    assert got == [k / F for k in keep]
    assert sum(got) / len(got) == pytest.approx(0.25, abs=1 / F) and got[1] < got[0]
    with pytest.raises(TinyOnnError, match="min_fraction"):
        allocate_neuron_fractions(dense, [{"input_ids": ids}], 0.25, min_fraction=0.5)
    with pytest.raises(TinyOnnError, match="fractions for a model"), neuron_oracle(dense, [0.25]):
        pass


def test_run_with_hooks_removes_the_hooks_when_the_model_fails():
    class Failing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(2, 2)

        def forward(self, input_ids, attention_mask=None, use_cache=None):
            self.inner(input_ids.float())
            raise RuntimeError("boom")

    model, calls = Failing(), []
    handles = [model.inner.register_forward_hook(lambda m, a, o: calls.append(o.shape))]
    with pytest.raises(RuntimeError, match="boom"):
        run_with_hooks(model, [{"input_ids": torch.ones(3, 2)}], handles)
    assert calls == [torch.Size([3, 2])]
    assert not model.inner._forward_hooks
