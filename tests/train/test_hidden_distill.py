"""Hidden-state distillation: the loss against a per-token, per-layer loop, its gradient in the trainer against the same
loss computed outside the trainer, and its bad inputs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import tiny_onn.train.trainer as trainer
from tests.conftest import make_tiny_model, tiny_config
from tiny_onn.data.scoring import IGNORE_INDEX
from tiny_onn.errors import TinyOnnError
from tiny_onn.train import TrainConfig
from tiny_onn.train.losses import hidden_distill_sum


def _loop_hidden_loss(student, teacher, labels) -> float:
    """Σ over positions t with a response token at t+1 of mean_l ‖s_l[t] − t_l[t]‖² / ‖t_l[t]‖², by hand."""
    total = 0.0
    B, T = labels.shape
    for b in range(B):
        for t in range(T - 1):
            if labels[b, t + 1] == IGNORE_INDEX:
                continue
            per_layer = [float(((s[b, t] - h[b, t]) ** 2).sum() / (h[b, t] ** 2).sum())
                         for s, h in zip(student, teacher, strict=True)]
            total += sum(per_layer) / len(per_layer)
    return total


def test_hidden_distill_sum_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(2, 5, 3, generator=g) for _ in range(3)]
    teacher = [torch.randn(2, 5, 3, generator=g) * (i + 1) for i in range(3)]
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 4, 5, 6], [IGNORE_INDEX, 7, 8, IGNORE_INDEX, IGNORE_INDEX]])
    got = hidden_distill_sum(student, teacher, labels)
    assert got.item() == pytest.approx(_loop_hidden_loss(student, teacher, labels), rel=1e-5)
    assert hidden_distill_sum(teacher, teacher, labels).item() == 0.0
    with pytest.raises(ValueError, match="one teacher state per student layer"):
        hidden_distill_sum(student[:2], teacher, labels)


def _trainer(student, data, teacher, out, hidden_kd: float) -> trainer.Trainer:
    cfg = TrainConfig(model=str(student), data=str(data), teacher=str(teacher), hidden_kd=hidden_kd, policy="full",
                      steps=1, batch_size=2, seq_len=32, eval_tokens=0, checkpoint_every=0, device="cpu", out=str(out))
    return trainer.Trainer(cfg)


def _layer_outputs(model, input_ids, attention_mask) -> list[torch.Tensor]:
    outputs = []
    handles = [layer.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o))
               for layer in model.model.layers]
    model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    for h in handles:
        h.remove()
    return outputs


def test_trainer_gradient_is_the_hidden_loss_gradient(tiny_moe, tmp_path, tiny_tokenizer):
    moe, data = tiny_moe
    dense = moe.parent / "dense"
    teacher = tmp_path / "teacher"
    make_tiny_model("llama", len(tiny_tokenizer), seed=1).save_pretrained(teacher)
    tiny_tokenizer.save_pretrained(teacher)
    grads = {}
    for w in (0.0, 2.0):
        recipe = _trainer(dense, data, teacher, tmp_path / f"h{w}", w)
        micro, scored = trainer.step_batches(recipe.data, 0, recipe.cfg, 0, 1)
        losses, _ = recipe.forward_backward(micro, scored, 0)
        grads[w] = {n: p.grad.clone() for n, p in recipe.model.named_parameters() if p.grad is not None}
    assert losses["hidden_kd"] > 0
    # the same loss outside the trainer: 2 · (Σ over the step's scored positions) / (scored positions)
    student = AutoModelForCausalLM.from_pretrained(dense)
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher)
    total = 0.0
    expected_sum = 0.0
    for mb in micro:
        s_states = _layer_outputs(student, mb["input_ids"], mb["attention_mask"])
        with torch.no_grad():
            t_states = _layer_outputs(teacher_model, mb["input_ids"], mb["attention_mask"])
        total = total + hidden_distill_sum(s_states, t_states, mb["labels"])
        expected_sum += _loop_hidden_loss([s.detach() for s in s_states], t_states, mb["labels"])
    assert losses["hidden_kd"] == pytest.approx(expected_sum / scored, rel=1e-4)
    (2.0 * total / scored).backward()
    params = dict(student.named_parameters())
    assert grads[2.0].keys() == grads[0.0].keys() and grads[2.0]
    for name, g in grads[2.0].items():
        torch.testing.assert_close(g - grads[0.0][name], params[name].grad, rtol=1e-3, atol=1e-6)


def test_hidden_kd_trains_a_carved_moe_toward_its_source(tiny_moe, tmp_path):
    moe, data = tiny_moe
    grads, losses = {}, {}
    for w in (0.0, 1.0):
        recipe = _trainer(moe, data, moe.parent / "dense", tmp_path / f"moe{w}", w)
        micro, scored = trainer.step_batches(recipe.data, 0, recipe.cfg, 0, 1)
        losses[w], _ = recipe.forward_backward(micro, scored, 0)
        grads[w] = {n: p.grad.clone() for n, p in recipe.model.named_parameters() if "experts" in n and p.grad is not None}
    assert losses[0.0]["hidden_kd"] == 0.0 and 0 < losses[1.0]["hidden_kd"] < float("inf")
    # the hidden loss adds its own gradient on the experts (the CE part is the same in both runs)
    assert grads[1.0].keys() == grads[0.0].keys() and grads[1.0]
    assert any(not torch.allclose(grads[1.0][n], grads[0.0][n]) for n in grads[1.0])


def test_hidden_kd_bad_inputs(tiny_moe, tmp_path, tiny_tokenizer):
    moe, data = tiny_moe
    with pytest.raises(TinyOnnError, match="--hidden-kd needs a --teacher"):
        TrainConfig(model=str(moe), hidden_kd=1.0)
    with pytest.raises(TinyOnnError, match="non-negative"):
        TrainConfig(model=str(moe), teacher=str(moe.parent / "dense"), hidden_kd=-1.0)
    deeper = tmp_path / "deeper"
    config = LlamaConfig(**{**tiny_config("llama", len(tiny_tokenizer)).to_dict(), "num_hidden_layers": 3})
    LlamaForCausalLM(config).save_pretrained(deeper)
    tiny_tokenizer.save_pretrained(deeper)
    with pytest.raises(TinyOnnError, match="teacher's depth and width"):
        _trainer(moe, data, deeper, tmp_path / "x", 1.0)
    assert not (tmp_path / "x").exists()
