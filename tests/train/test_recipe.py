"""Trainer recipe: clipping over what updates, a 4-bit teacher leaves the student unquantized, dense models (the
controls), ce_weight, and the artifact names of a trained folder."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import tiny_onn.train.trainer as trainer
from tests.conftest import make_tiny_model, tiny_config
from tiny_onn.cli import main
from tiny_onn.errors import TinyOnnError
from tiny_onn.model.export import CARVE_META, TRAIN_META, read_carve_metadata
from tiny_onn.train import MaskedAdamW, TrainConfig


def _args(model, data, out, steps=2, extra=()):
    return ["train", "--model", str(model), "--data", str(data), "--steps", str(steps), "--batch-size", "2",
            "--seq-len", "32", "--checkpoint-every", "0", "--eval-tokens", "0", "--device", "cpu", "--warmup-steps", "1",
            "--out", str(out), *extra]


def test_clipping_counts_only_the_experts_that_update(tiny_moe, tmp_path, monkeypatch):
    moe, data = tiny_moe
    seen = []
    original = MaskedAdamW.step

    def spy(self, closure=None):
        # the gradient norm over what this step updates, and over the masked experts' slices
        updating, masked = torch.zeros(()), torch.zeros(())
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                mask = self.update_masks.get(p)
                if mask is None:
                    updating += p.grad.pow(2).sum()
                else:
                    updating += p.grad[mask].pow(2).sum()
                    masked += p.grad[~mask].pow(2).sum()
        seen.append((float(updating.sqrt()), float(masked.sqrt())))
        return original(self, closure)

    monkeypatch.setattr(MaskedAdamW, "step", spy)
    clip = 1e-3  # far below the gradient norm (≈ 2-5), so every step clips
    assert main(_args(moe, data, tmp_path / "clip", extra=["--policy", "smk2", "--max-k", "1", "--clip", str(clip)])) == 0
    assert len(seen) == 2
    for updating, masked in seen:
        assert masked > 0  # masked experts did get gradients ...
        assert updating == pytest.approx(clip, rel=1e-4)  # ... but the clip norm holds for what updates
    history = json.loads((tmp_path / "clip" / "train.json").read_text())["history"]
    assert all(h["update_grad_norm"] < h["grad_norm"] for h in history)


def test_4bit_teacher_does_not_quantize_the_student(tiny_moe, tmp_path, monkeypatch):
    moe, data = tiny_moe
    dense = moe.parent / "dense"
    loads = []
    real = trainer.load_source

    def recording(args, dense_only=True):
        loads.append((args.model, args.load_in_4bit))
        return real(dataclasses.replace(args, load_in_4bit=False), dense_only)  # no bitsandbytes/GPU here

    monkeypatch.setattr(trainer, "load_source", recording)
    extra = ["--policy", "full", "--teacher", str(dense), "--kd", "0.5", "--load-in-4bit", "--steps", "1"]
    assert main(_args(moe, data, tmp_path / "q", extra=extra)) == 0
    assert loads == [(str(moe), False), (str(dense), True)]
    with pytest.raises(TinyOnnError, match="needs a --teacher"):
        TrainConfig(model=str(moe), load_in_4bit=True)


def test_trained_folder_names_its_metadata(tiny_moe, tmp_path):
    moe, data = tiny_moe
    out = tmp_path / "names"
    assert main(_args(moe, data, out, extra=["--policy", "full"])) == 0
    folder = out / "model"
    assert not (folder / "tiny_onn.json").exists() and not (moe / "tiny_onn.json").exists()
    # the carve metadata travels with the layout it describes; the training report has its own file
    assert json.loads((folder / CARVE_META).read_text()) == json.loads((moe / CARVE_META).read_text())
    assert json.loads((folder / CARVE_META).read_text())["format"] == "tiny_onn.moe/1"
    report = json.loads((folder / TRAIN_META).read_text())
    assert report["format"] == "tiny_onn.train/1" and report == json.loads((out / TRAIN_META).read_text())
    # eval counts the trained model's source neurons as the carve did (it used to fall back to the kept neurons)
    from tiny_onn.eval.harness import _source_neurons

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert _source_neurons(str(folder), model) == _source_neurons(str(moe), model) == 64
    # a folder written before the split (carve metadata in tiny_onn.json) still reads
    legacy = tmp_path / "legacy"
    shutil.copytree(moe, legacy)
    (legacy / CARVE_META).rename(legacy / "tiny_onn.json")
    assert read_carve_metadata(legacy) == json.loads((moe / CARVE_META).read_text())
    (legacy / "tiny_onn.json").write_text(json.dumps({"format": "tiny_onn.train/1"}))  # an old trained folder's report
    assert read_carve_metadata(legacy) is None


@pytest.fixture(scope="module")
def dense_models(tiny_moe, tmp_path_factory, tiny_tokenizer):
    """The carve's dense source, and a width-pruned copy (half the FFN neurons): the two dense controls."""
    moe, _ = tiny_moe
    pruned = tmp_path_factory.mktemp("pruned")
    full = make_tiny_model("llama", len(tiny_tokenizer))
    config = tiny_config("llama", len(tiny_tokenizer))
    config.intermediate_size //= 2
    small = type(full)(config)
    state = full.state_dict()
    keep = torch.arange(0, full.config.intermediate_size, 2)
    for key, value in state.items():
        if key.endswith(("gate_proj.weight", "up_proj.weight")):
            state[key] = value[keep]
        elif key.endswith("down_proj.weight"):
            state[key] = value[:, keep]
    small.load_state_dict(state)
    small.save_pretrained(pruned)
    tiny_tokenizer.save_pretrained(pruned)
    (pruned / "provenance.json").write_text(json.dumps({"method": "width-pruned (every other neuron)"}))
    return {"dense": moe.parent / "dense", "pruned": pruned}


@pytest.mark.parametrize("which", ["dense", "pruned"])
def test_dense_model_trains_with_policy_full(dense_models, tiny_moe, tmp_path, which):
    _, data = tiny_moe
    source = dense_models[which]
    out = tmp_path / which
    assert main(_args(source, data, out, extra=["--policy", "full", "--eval-tokens", "128"])) == 0
    trained = AutoModelForCausalLM.from_pretrained(out / "model")  # a plain HF folder: no remote code
    before = AutoModelForCausalLM.from_pretrained(source)
    assert trained.config.model_type == "llama"
    after_w, before_w = dict(trained.named_parameters()), dict(before.named_parameters())
    ffn = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(after_w[ffn], before_w[ffn])  # the FFN trains (as the experts would)
    attn = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(after_w[attn], before_w[attn])  # attention stays frozen by default, as for the MoE
    report = json.loads((out / TRAIN_META).read_text())
    assert len(report["history"]) == 2 and "update_rate_per_category" not in report
    assert (out / "model" / "provenance.json").is_file() == (which == "pruned")  # a control keeps its provenance
    assert report["history"][-1]["lb"] == 0.0 and report["perplexity"]["after"]["ppl"] > 0


def test_dense_model_refuses_expert_options(tiny_moe, tmp_path, capsys):
    moe, data = tiny_moe
    dense = moe.parent / "dense"
    assert main(_args(dense, data, tmp_path / "x", extra=["--policy", "smk2"])) == 2
    err = capsys.readouterr().err
    assert "dense model" in err and "only --policy full applies" in err
    assert main(_args(dense, data, tmp_path / "y", extra=["--policy", "full", "--phase1-steps", "2"])) == 2
    assert "phase1_steps" in capsys.readouterr().err


def _step_grads(model, data, teacher, out, ce_weight: float, kd: float) -> dict[str, torch.Tensor]:
    """Gradients of the first step's loss (before clipping and the optimizer)."""
    cfg = TrainConfig(model=str(model), data=str(data), teacher=str(teacher) if kd else "", kd=kd, ce_weight=ce_weight,
                      policy="full", steps=1, batch_size=2, seq_len=32, eval_tokens=0, checkpoint_every=0,
                      device="cpu", out=str(out))
    recipe = trainer.Trainer(cfg)
    micro, scored = trainer.step_batches(recipe.data, 0, cfg, 0, 1)
    recipe.forward_backward(micro, scored, 0)
    return {n: p.grad.clone() for n, p in recipe.model.named_parameters() if p.grad is not None}


def test_ce_weight_scales_ce_and_zero_is_pure_distillation(tiny_moe, tmp_path, tiny_tokenizer):
    moe, data = tiny_moe
    dense = moe.parent / "dense"
    teacher = tmp_path / "teacher"
    make_tiny_model("llama", len(tiny_tokenizer), seed=1).save_pretrained(teacher)
    tiny_tokenizer.save_pretrained(teacher)
    g = {(w, kd): _step_grads(dense, data, teacher, tmp_path / f"ce{w}-kd{kd}", w, kd)
         for w, kd in [(1.0, 0.0), (0.5, 0.0), (0.0, 1.0), (1.0, 1.0)]}
    assert g[(1.0, 0.0)].keys() == g[(0.0, 1.0)].keys() and len(g[(1.0, 0.0)]) > 0
    for name, ce_only in g[(1.0, 0.0)].items():
        kd_only = g[(0.0, 1.0)][name]
        torch.testing.assert_close(g[(0.5, 0.0)][name], 0.5 * ce_only, rtol=1e-4, atol=1e-7)
        # loss = ce_weight·CE + kd·KL: the gradients add up, and ce_weight=0 keeps only the distillation part
        torch.testing.assert_close(g[(1.0, 1.0)][name], ce_only + kd_only, rtol=1e-4, atol=1e-6)
    assert any(float(v.abs().max()) > 1e-4 for v in g[(0.0, 1.0)].values())
    assert not torch.allclose(g[(0.0, 1.0)]["model.layers.0.mlp.down_proj.weight"],
                              g[(1.0, 0.0)]["model.layers.0.mlp.down_proj.weight"])
    with pytest.raises(TinyOnnError, match="pure distillation"):
        TrainConfig(model=str(dense), ce_weight=0.0)
