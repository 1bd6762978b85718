"""The seed's training mechanisms: router distillation (teacher gains = the carve's oracle; gradient only in the routers),
the specificity loss, the PI schedule, perpetual mode's replay buffer (deterministic, resumable) and EWC."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_onn.train.trainer as trainer
from tiny_onn.carve.calibrate import collect_ffn_inputs, expert_and_group_gains
from tiny_onn.cli import main
from tiny_onn.data import DataArgs, build_dataset
from tiny_onn.errors import TinyOnnError
from tiny_onn.sources import SourceArgs, load_source
from tiny_onn.train import MaskedAdamW, TrainConfig
from tiny_onn.train.ewc import EWC
from tiny_onn.train.losses import pi_schedule, router_distill_kl, specificity_loss
from tiny_onn.train.replay import ReplayBuffer


def _cfg(moe, data, out, **kw) -> TrainConfig:
    base = dict(model=str(moe), data=str(data), steps=2, batch_size=2, seq_len=32, checkpoint_every=0, eval_tokens=0,
                device="cpu", warmup_steps=1, policy="full", out=str(out))
    return TrainConfig(**{**base, **kw})


# ---- router distillation ---------------------------------------------------------------------------------------------

def test_teacher_gains_are_the_carves_oracle(tiny_moe, tmp_path):
    """Before any training the student's experts are the teacher's neurons, so the gains the teacher hooks compute must
    equal the calibration's gains of the student's experts on the teacher's FFN inputs."""
    moe, data = tiny_moe
    recipe = trainer.Trainer(_cfg(moe, data, tmp_path / "g", teacher=str(moe.parent / "dense"), router_distill=1.0))
    batch = next(recipe.data.batches(2))
    with torch.no_grad():
        recipe.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    keep = batch["attention_mask"].reshape(-1).bool()
    one = type(recipe.data)(*(batch[k] for k in ("input_ids", "labels", "attention_mask", "category")),
                            recipe.data.category_names)
    ffn_inputs = collect_ffn_inputs(recipe.teacher, one)
    for li, layer in enumerate(recipe.model.model.layers):
        expected, _ = expert_and_group_gains(layer.mlp, ffn_inputs[li], layer.mlp.router.num_groups)
        torch.testing.assert_close(recipe.teacher_gains.gains[li][keep], expected, rtol=1e-4, atol=1e-5)


def test_router_distillation_refuses_a_teacher_that_is_not_the_carves_source(tiny_moe, tmp_path, tiny_tokenizer):
    """A teacher of the same shape with other weights passes every shape check; its gains would be no target."""
    from tests.conftest import make_tiny_model

    moe, data = tiny_moe
    other = tmp_path / "other"
    make_tiny_model("llama", len(tiny_tokenizer), seed=7).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    with pytest.raises(TinyOnnError, match="not those the MoE's experts were carved from"):
        trainer.Trainer(_cfg(moe, data, tmp_path / "o", teacher=str(other), kd=0.5, router_distill=1.0))
    assert not (tmp_path / "o").exists()


def test_router_distillation_gradient_reaches_only_the_routers(tiny_moe, tmp_path):
    moe, data = tiny_moe
    cfg = _cfg(moe, data, tmp_path / "rd", teacher=str(moe.parent / "dense"), router_distill=1.0, specificity=1.0,
               train_attention=True, train_embeddings=True)
    recipe = trainer.Trainer(cfg)
    micro, _ = trainer.step_batches(recipe.data, 0, cfg, 0, 1)
    mb = micro[0]
    out = recipe.model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False)
    with torch.no_grad():
        recipe.teacher(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"])
    rd, sp = recipe.routing_losses(mb)
    assert rd > 0 and sp > 0
    for loss in (rd, sp):
        recipe.model.zero_grad(set_to_none=True)
        (loss + 0 * out.logits.sum()).backward(retain_graph=True)  # the LM graph is there, but contributes nothing
        grads = {n: p.grad for n, p in recipe.model.named_parameters() if p.requires_grad}
        assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads if ".mlp.router." in n)
        leaked = [n for n, g in grads.items() if ".mlp.router." not in n and g is not None and g.abs().sum() > 0]
        assert not leaked, leaked


def test_router_distillation_trains_routers_towards_the_oracle(tiny_moe, tmp_path):
    """From uniform routers (zeroed weights), training only the routers with a strong router distillation brings the
    KL to the teacher's oracle down."""
    moe, data = tiny_moe
    start = tmp_path / "uniform"
    shutil.copytree(moe, start)
    weights = load_file(start / "model.safetensors")
    save_file({k: torch.zeros_like(v) if ".mlp.router." in k else v for k, v in weights.items()},
              start / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "rd-run"
    assert main(["train", "--model", str(start), "--data", str(data), "--batch-size", "4", "--seq-len", "32",
                 "--checkpoint-every", "0", "--eval-tokens", "0", "--device", "cpu", "--warmup-steps", "1",
                 "--policy", "full", "--teacher", str(moe.parent / "dense"), "--router-distill", "10", "--steps", "8",
                 "--router-lr", "0.01", "--no-train-experts", "--no-train-shared", "--out", str(out)]) == 0
    rd = [h["router_distill"] for h in json.loads((out / "train.json").read_text())["history"]]
    assert sum(rd[-3:]) / 3 < 0.85 * rd[0], rd  # rd[0]: the uniform routers, before any update


def test_router_distill_kl_is_zero_on_the_target():
    gains = torch.randn(5, 4)
    g = gains - gains.mean(-1, keepdim=True)
    target = (g / g.std()).log_softmax(-1)
    assert float(router_distill_kl(target, gains)) == pytest.approx(0.0, abs=1e-6)
    assert float(router_distill_kl(torch.full((5, 4), 0.25).log(), gains)) > 0


# ---- specificity -----------------------------------------------------------------------------------------------------

def test_specificity_is_zero_for_specialised_routing_and_positive_otherwise():
    cat = torch.tensor([0, 0, 1, 1, 2, 2])
    specialised = torch.tensor([[1.0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 0, 1], [0, 0, 0, 1]])
    assert float(specificity_loss(specialised, cat, 3)) == pytest.approx(0.0, abs=1e-6)
    uniform = torch.full((6, 4), 0.25)
    assert float(specificity_loss(uniform, cat, 3)) == pytest.approx(1.0, abs=1e-6)  # every expert serves all alike
    leaky = specialised.clone()
    leaky[0] = torch.tensor([0.9, 0.1, 0, 0])  # expert 1 also fires on a category-0 token
    value = float(specificity_loss(leaky, cat, 3))
    assert 0 < value < 1
    # by hand: expert 1's mean probability per category (0.05, 0.75, 0), its entropy / log 3, weighted by its mass share
    m = torch.tensor([[0.95, 0.05, 0, 0], [0, 0.75, 0.25, 0], [0, 0, 0, 1.0]])  # [C, E]
    q = m / m.sum(0)
    h = -(q * q.clamp_min(1e-12).log()).sum(0) / torch.log(torch.tensor(3.0))
    assert value == pytest.approx(float((m.sum(0) / m.sum() * h).sum()), rel=1e-5)
    # padding / replayed tokens (category -1) do not count; one category alone cannot be unspecific
    assert float(specificity_loss(uniform, torch.tensor([0, 0, 0, -1, -1, -1]), 3)) == 0.0


# ---- PI schedule -----------------------------------------------------------------------------------------------------

def test_pi_schedule_function_and_log(tiny_moe, tmp_path):
    assert pi_schedule(0.0, 8, 0.1) == (1.0, 8)
    assert pi_schedule(1.0, 8, 0.1) == (pytest.approx(0.1), 1)
    assert pi_schedule(0.5, 8, 0.2) == (pytest.approx(0.6), 4)
    moe, data = tiny_moe
    out = tmp_path / "pi"
    assert main(["train", "--model", str(moe), "--data", str(data), "--steps", "3", "--batch-size", "2", "--seq-len",
                 "32", "--checkpoint-every", "0", "--eval-tokens", "0", "--device", "cpu", "--warmup-steps", "1",
                 "--policy", "smk2", "--pi-schedule", "--pi-lr-floor", "0.2", "--out", str(out)]) == 0
    report = json.loads((out / "train.json").read_text())
    for h in report["history"]:
        assert h["lr_scale"] == pytest.approx(0.2 + 0.8 * (1 - h["pi"]))
        # every expert of this tiny MoE computes each step (act_k = 4 per layer)
        assert h["experts_updated_mean"] == max(1, round(4 * (1 - h["pi"])))
        base = 5e-5 * trainer.lr_lambda(h["step"] - 1, 1, 3)
        assert h["lr"] == pytest.approx(base * h["lr_scale"])


# ---- perpetual mode: replay and EWC ------------------------------------------------------------------------------------

def test_replay_buffer_is_deterministic(tiny_moe, tiny_tokenizer):
    _, data = tiny_moe
    args = DataArgs(data=str(data), seq_len=32, seed=3)
    a = ReplayBuffer.build(tiny_tokenizer, args, str(data), size=10)
    b = ReplayBuffer.build(tiny_tokenizer, args, str(data), size=10)
    assert len(a) == 10 and torch.equal(a.data.input_ids, b.data.input_ids)
    expected = build_dataset(tiny_tokenizer, args, "train", max_tokens=10 * 32)
    assert torch.equal(a.data.input_ids, expected.input_ids[:10])
    draws = [a.draw(s, 4) for s in range(6)]
    assert all(torch.equal(d, b.draw(s, 4)) for s, d in enumerate(draws))  # same step, same rows, in any order of calls
    assert len({tuple(d.tolist()) for d in draws}) > 1 and all(len(set(d.tolist())) == 4 for d in draws)
    assert a.draw(0, 25).bincount(minlength=10).min() >= 2  # more than the buffer: every row, repeated
    rows = a.rows(draws[0])
    assert (rows["category"] == -1).all() and torch.equal(rows["input_ids"], a.data.input_ids[draws[0]])


def test_replay_batches_mix_new_and_replayed_sequences(tiny_moe, tiny_tokenizer, tmp_path):
    moe, data = tiny_moe
    cfg = _cfg(moe, data, tmp_path / "mix", categories="code", replay_data=str(data), replay_size=8, replay_ratio=0.5,
               batch_size=4, grad_accum=2)
    new = build_dataset(tiny_tokenizer, cfg, "train", max_tokens=64 * 32)
    replay = ReplayBuffer.build(tiny_tokenizer, cfg, str(data), 8)
    micro, scored = trainer.step_batches(new, 1, cfg, 0, 1, replay)
    assert len(micro) == 2 and all(mb["input_ids"].shape == (4, 32) for mb in micro)
    drawn = replay.draw(1, 4)
    for m, mb in enumerate(micro):
        assert torch.equal(mb["input_ids"][:2], new.input_ids[4 + 2 * m : 6 + 2 * m])  # step 1's new rows
        assert torch.equal(mb["input_ids"][2:], replay.data.input_ids[drawn[2 * m : 2 * m + 2]])
    assert scored == sum(int((mb["labels"][:, 1:] >= 0).sum()) for mb in micro)


def test_ewc_penalty_is_zero_at_the_anchor_and_quadratic(tiny_moe, tiny_tokenizer):
    moe, data = tiny_moe
    model = load_source(SourceArgs(model=str(moe), device="cpu"), dense_only=False).model.train()
    seqs = build_dataset(tiny_tokenizer, DataArgs(data=str(data), seq_len=32), "train", max_tokens=4 * 32)
    ewc = EWC.estimate(model, seqs, strength=3.0)
    assert set(ewc.params) and all(".mlp." in n and ".router." not in n for n in ewc.params)
    assert sum(float(f.sum()) for f in ewc.fisher.values()) / sum(f.numel() for f in ewc.fisher.values()) == \
        pytest.approx(1.0, rel=1e-5)  # normalised to mean 1
    assert float(ewc.penalty().detach()) == 0.0
    direction = {n: torch.randn_like(p) for n, p in ewc.params.items()}
    values = []
    for delta in (1e-3, 2e-3, 4e-3):
        with torch.no_grad():
            for n, p in ewc.params.items():
                p.copy_(ewc.anchor[n] + delta * direction[n])
        values.append(float(ewc.penalty().detach()))
        by_hand = 0.5 * 3.0 * sum(float((ewc.fisher[n] * (delta * direction[n]) ** 2).sum()) for n in ewc.params)
        assert values[-1] == pytest.approx(by_hand, rel=1e-3)
    assert values[1] / values[0] == pytest.approx(4.0, rel=1e-3) and values[2] / values[1] == pytest.approx(4.0, rel=1e-3)


def _perpetual_args(moe, data, out, extra=()):
    return ["train", "--model", str(moe), "--data", str(data), "--categories", "code", "--steps", "4",
            "--batch-size", "2", "--seq-len", "32", "--checkpoint-every", "2", "--eval-tokens", "0", "--device", "cpu",
            "--warmup-steps", "1", "--perpetual", "--replay-data", str(data), "--replay-size", "6", "--replay-ratio",
            "0.5", "--ewc", "10", "--ewc-samples", "3", "--lr", "1e-2", "--out", str(out), *extra]


def test_perpetual_run_with_replay_and_ewc_resumes_exactly(tiny_moe, tmp_path, monkeypatch):
    moe, data = tiny_moe
    assert main(_perpetual_args(moe, data, tmp_path / "a")) == 0
    report = json.loads((tmp_path / "a" / "train.json").read_text())
    assert report["config"]["policy"] == "smk" and report["config"]["min_k"] == 1
    history = report["history"]
    assert all(h["experts_updated_mean"] == 1 for h in history)
    assert history[0]["ewc"] == 0.0 and all(h["ewc"] > 0 for h in history[1:])  # the weights left the anchor
    calls = {"n": 0}
    original = MaskedAdamW.step

    def interrupted(self, closure=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, closure)

    monkeypatch.setattr(MaskedAdamW, "step", interrupted)
    assert main(_perpetual_args(moe, data, tmp_path / "b")) == 130
    monkeypatch.setattr(MaskedAdamW, "step", original)
    assert (tmp_path / "b" / "checkpoints" / "step-000002" / "extra.safetensors").is_file()  # EWC's anchor and Fisher
    assert main(_perpetual_args(moe, data, tmp_path / "b", ["--resume"])) == 0
    timing = ("tokens_per_second", "step_seconds")
    resumed = json.loads((tmp_path / "b" / "train.json").read_text())["history"]
    assert [{k: v for k, v in h.items() if k not in timing} for h in resumed] == \
        [{k: v for k, v in h.items() if k not in timing} for h in history]


@pytest.mark.parametrize(("extra", "message"), [
    (["--router-distill", "1"], "--router-distill needs a --teacher"),
    (["--replay-data", "default", "--replay-ratio", "0.1", "--batch-size", "4"],
     "must leave at least one new and one replayed sequence per micro-batch; use a --replay-ratio from 0.25 to 0.75"),
    (["--replay-data", "default", "--replay-ratio", "0.5", "--batch-size", "1"], "use --batch-size 2 or more"),
    (["--ewc", "1"], "--ewc needs earlier data"),
    (["--pi-lr-floor", "2"], "pi_lr_floor must be in [0, 1]"),
])
def test_bad_mechanism_options(tiny_moe, tmp_path, capsys, extra, message):
    moe, data = tiny_moe
    argv = ["train", "--model", str(moe), "--data", str(data), "--device", "cpu", "--out", str(tmp_path / "x"), *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_dense_model_refuses_router_losses(tiny_moe, tmp_path):
    moe, data = tiny_moe
    with pytest.raises(TinyOnnError, match="dense model"):
        trainer.Trainer(_cfg(moe.parent / "dense", data, tmp_path / "d", specificity=1.0))


@pytest.mark.parametrize(("given", "named"), [
    (dict(policy="smk2", max_k=2), "--max-k 2"),  # smk2 is the default policy: not told apart from none given
    (dict(policy="full", min_k=3), "--policy full and --min-k 3"),
    (dict(policy="full"), "--policy full"),  # a dense model's error said "got --policy smk", which nobody gave
    (dict(min_k=2), "--min-k 2"),
])
def test_perpetual_refuses_the_policy_options_it_would_override(tmp_path, given, named):
    with pytest.raises(TinyOnnError, match=f"--perpetual trains with --policy smk --min-k 1.*{named} would be overridden"):
        _cfg("m", "d", tmp_path / "o", perpetual=True, **given)
    cfg = _cfg("m", "d", tmp_path / "o", perpetual=True, policy="smk2")  # smk2: the default, so not given
    assert (cfg.policy, cfg.min_k) == ("smk", 1)


def test_phase2_pi_above_1_is_refused():
    with pytest.raises(TinyOnnError, match="--phase2-pi must be in \\[0, 1\\]"):
        _cfg("m", "d", "o", phase2_pi=5.0)
