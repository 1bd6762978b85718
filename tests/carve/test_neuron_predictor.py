"""Low-rank neuron predictors: the input second moments are the FFN inputs' x xᵀ averaged over non-padding tokens; at full
rank the predicted selection is the neuron oracle's; at lower rank the prediction is the projection onto the top
eigenvectors of W C Wᵀ (computed here by an eigendecomposition, not the module's SVD), and each token keeps exactly the
top neurons of that prediction."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_tiny_model
from tiny_onn.carve.calibrate import collect_ffn_inputs
from tiny_onn.carve.neuron_predictor import fit_neuron_predictors, input_second_moments, predicted_neurons
from tiny_onn.data.encoding import PackedData
from tiny_onn.errors import TinyOnnError
from tiny_onn.eval.oracle import neuron_oracle


def _random_data(vocab: int, sequences: int = 8, length: int = 24, seed: int = 0) -> PackedData:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (sequences, length), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, length // 2 :] = 0  # padding must not count
    return PackedData(input_ids=ids, labels=ids.clone(), attention_mask=mask, category=torch.zeros_like(ids),
                      category_names=["x"])


def test_second_moments_average_the_ffn_inputs_over_real_tokens():
    dense = make_tiny_model("qwen3", 64).double()
    data = _random_data(64)
    moments = input_second_moments(dense, data, batch_size=3)
    for x_TD, c_DD in zip(collect_ffn_inputs(dense, data, batch_size=5), moments, strict=True):
        assert x_TD.shape[0] == data.num_tokens
        torch.testing.assert_close(c_DD, (x_TD.T @ x_TD) / x_TD.shape[0])


def test_full_rank_predictor_selects_like_the_neuron_oracle():
    dense = make_tiny_model("llama", 64).double()
    predictors = fit_neuron_predictors(dense, _random_data(64), rank=dense.config.hidden_size)
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        with neuron_oracle(dense, 0.25):
            want = dense(ids).logits
        with predicted_neurons(dense, predictors, 0.25):
            got = dense(ids).logits
        full = dense(ids).logits
    torch.testing.assert_close(got, want)
    assert not torch.allclose(full, want)  # a quarter of the neurons is not the whole FFN


def test_low_rank_predictor_is_the_projection_on_the_top_output_directions():
    dense = make_tiny_model("llama", 64).double()
    data = _random_data(64)
    rank = 5
    predictors = fit_neuron_predictors(dense, data, rank=rank)
    moments = input_second_moments(dense, data)
    mlp, predictor, c_DD = dense.model.layers[1].mlp, predictors[1], moments[1]
    x = torch.randn(7, dense.config.hidden_size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    act = torch.nn.functional.silu

    def projected(w_FD: torch.Tensor) -> torch.Tensor:
        _, vecs = torch.linalg.eigh(w_FD @ c_DD @ w_FD.T)  # ascending eigenvalues
        u = vecs[:, -rank:]
        return x @ w_FD.T @ u @ u.T  # [7, F]

    g, u = projected(mlp.gate_proj.weight), projected(mlp.up_proj.weight)
    want_scores = (act(g) * u).abs() * mlp.down_proj.weight.norm(dim=0)
    torch.testing.assert_close(predictor.scores(x, act), want_scores)

    F = mlp.gate_proj.weight.shape[0]
    keep = round(0.5 * F)
    h = act(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
    d = mlp.down_proj.weight
    want = torch.stack([
        sum(h[n, j] * d[:, j] for j in sorted(range(F), key=lambda j: -want_scores[n, j])[:keep]) for n in range(7)
    ])
    with torch.no_grad():
        with predicted_neurons(dense, predictors, 0.5):
            got = mlp(x)
        restored = mlp(x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(restored, mlp.down_proj(h))


def test_exact_gate_predictor_scores_with_the_gate_and_the_up_rms():
    """exact_gate, rank 0: score_j = |act(x·g_j)| · sqrt(mean over the data of (x·u_j)²) · ‖d_j‖, computed here from
    the collected FFN inputs neuron by neuron; rank ≥ D: exactly the neuron oracle's scores."""
    dense = make_tiny_model("llama", 64).double()
    data = _random_data(64)
    mlp = dense.model.layers[0].mlp
    x_TD = collect_ffn_inputs(dense, data)[0].double()
    x = torch.randn(4, dense.config.hidden_size, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    act = torch.nn.functional.silu
    predictor = fit_neuron_predictors(dense, data, rank=0, exact_gate=True)[0]
    assert predictor.rank == 0
    for j in range(mlp.gate_proj.weight.shape[0]):
        rms = (x_TD @ mlp.up_proj.weight[j]).pow(2).mean().sqrt()
        want = act(x @ mlp.gate_proj.weight[j]).abs() * rms * mlp.down_proj.weight[:, j].norm()
        torch.testing.assert_close(predictor.scores(x, act)[:, j], want)
    full = fit_neuron_predictors(dense, data, rank=dense.config.hidden_size, exact_gate=True)[0]
    h = act(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
    torch.testing.assert_close(full.scores(x, act), h.abs() * mlp.down_proj.weight.norm(dim=0))


def test_two_stage_selection_keeps_the_truly_best_of_the_predicted_candidates():
    """candidate_factor c: per token the c·k neurons of largest predicted score, then the k of them with the largest
    true |h_j|·‖d_j‖ — checked against a token-by-token selection; c·k = F is the neuron oracle, c = 1 one stage."""
    dense = make_tiny_model("llama", 64).double()
    predictors = fit_neuron_predictors(dense, _random_data(64), rank=0, exact_gate=True)
    mlp, act = dense.model.layers[0].mlp, torch.nn.functional.silu
    F_ = mlp.gate_proj.weight.shape[0]
    keep = F_ // 4
    x = torch.randn(5, dense.config.hidden_size, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    h = act(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)  # [5, F]
    true = h.abs() * mlp.down_proj.weight.norm(dim=0)
    predicted = predictors[0].scores(x, act)
    with torch.no_grad():
        for factor in (1.0, 2.0, 3.0):
            want = torch.zeros(5, dense.config.hidden_size, dtype=torch.float64)
            for t in range(5):
                cand = sorted(range(F_), key=lambda j, t=t: -float(predicted[t, j]))[: round(factor * keep)]
                kept = sorted(cand, key=lambda j, t=t: -float(true[t, j]))[:keep]
                want[t] = mlp.down_proj.weight[:, kept] @ h[t, kept]
            with predicted_neurons(dense, predictors, 0.25, candidate_factor=factor):
                got = mlp(x)
            torch.testing.assert_close(got, want)
        with predicted_neurons(dense, predictors, 0.25, candidate_factor=4.0):  # every neuron a candidate
            got = mlp(x)
        with neuron_oracle(dense, 0.25):
            torch.testing.assert_close(got, mlp(x))
    with pytest.raises(TinyOnnError, match="at least 1"), predicted_neurons(dense, predictors, 0.25, candidate_factor=0.5):
        pass


def test_predictors_refuse_wrong_inputs():
    dense = make_tiny_model("llama", 64)
    data = _random_data(64)
    with pytest.raises(TinyOnnError, match="at least 1"):
        fit_neuron_predictors(dense, data, rank=0)
    with pytest.raises(TinyOnnError, match="at least 0"):
        fit_neuron_predictors(dense, data, rank=-1, exact_gate=True)
    predictors = fit_neuron_predictors(dense, data, rank=4)
    with pytest.raises(TinyOnnError, match=r"in \(0, 1\]"), predicted_neurons(dense, predictors, 1.5):
        pass
    with pytest.raises(TinyOnnError, match="2 SwiGLU FFNs"), predicted_neurons(dense, predictors[:1], 0.5):
        pass
    empty = _random_data(64)
    empty.attention_mask.zero_()
    with pytest.raises(TinyOnnError, match="empty"):
        fit_neuron_predictors(dense, empty, rank=4)
