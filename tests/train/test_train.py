"""Training: masked experts do not move, bit-exact resume, 2-process equivalence, PI, bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from tiny_onn.cli import main
from tiny_onn.model import TinyOnnConfig, TinyOnnForCausalLM
from tiny_onn.train import MaskedAdamW, update_mask
from tiny_onn.train.losses import performance_index
from tiny_onn.train.policies import expert_grad_norms


def _tiny_moe() -> TinyOnnForCausalLM:
    torch.manual_seed(0)
    cfg = TinyOnnConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                        num_experts=6, num_experts_per_tok=3, moe_intermediate_size=4)
    return TinyOnnForCausalLM(cfg)


@pytest.mark.parametrize("policy", ["smk", "smk2"])
def test_masked_experts_do_not_move(policy):
    model = _tiny_moe()
    model.track_expert_stats(True)
    opt = MaskedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 60, (4, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # build up momentum everywhere first
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    experts = model.model.layers[0].mlp.experts
    assert opt.state[experts.gate_up_proj]["exp_avg"].abs().sum() > 0
    experts.reset_stats()
    model(input_ids=ids, labels=ids).loss.backward()
    grad = expert_grad_norms(experts)
    act = experts.output_norm_sum / experts.routed_count.clamp_min(1)
    mask = update_mask(policy, grad, act, experts.routed_count > 0, k=2)
    assert int(mask.sum()) == 2
    before = {name: t.clone() for name, t in [("w", experts.gate_up_proj.data), ("d", experts.down_proj.data),
                                                 ("m", opt.state[experts.gate_up_proj]["exp_avg"]),
                                                 ("v", opt.state[experts.gate_up_proj]["exp_avg_sq"]),
                                                 ("s", opt.state[experts.gate_up_proj]["step"])]}
    opt.set_update_mask(experts.gate_up_proj, mask)
    opt.set_update_mask(experts.down_proj, mask)
    opt.step()
    after = {"w": experts.gate_up_proj.data, "d": experts.down_proj.data,
             "m": opt.state[experts.gate_up_proj]["exp_avg"], "v": opt.state[experts.gate_up_proj]["exp_avg_sq"],
             "s": opt.state[experts.gate_up_proj]["step"]}
    for key in before:
        assert torch.equal(after[key][~mask], before[key][~mask]), f"masked expert moved: {key}"
        assert not torch.equal(after[key][mask], before[key][mask]), f"updated expert did not change: {key}"
    if policy == "smk":
        assert set(mask.nonzero().squeeze(-1).tolist()) == set(grad.topk(2, largest=False).indices.tolist())


def test_full_policy_and_pi():
    grad = torch.tensor([0.0, 1.0, 2.0])
    assert update_mask("full", grad, grad, grad > 0, k=1).tolist() == [False, True, True]
    assert performance_index(2.0, 2.0, 0.0, alpha=1.0, gamma=0.0) == pytest.approx(torch.e**-1)
    assert performance_index(0.0, 1.0, 0.0, 1.0, 0.5) == 1.0


def _train_args(moe, data, out, steps=6, extra=()):
    return ["train", "--model", str(moe), "--data", str(data), "--steps", str(steps), "--batch-size", "2",
            "--seq-len", "32", "--checkpoint-every", "3", "--eval-tokens", "128", "--device", "cpu",
            "--warmup-steps", "2", "--policy", "smk2", "--max-k", "2", "--out", str(out), *extra]


def _ce(out):
    return [h["ce"] for h in json.loads((out / "train.json").read_text())["history"]]


def _resumable(out) -> dict:
    """What an interrupted and resumed run must reproduce exactly: the history (without timings), the per-category
    update rates and the emergent shared experts."""
    report = json.loads((out / "train.json").read_text())
    timing = ("tokens_per_second", "step_seconds")
    return {"history": [{k: v for k, v in h.items() if k not in timing} for h in report["history"]],
            "update_rate_per_category": report["update_rate_per_category"],
            "emergent_shared_experts": report["emergent_shared_experts"]}


# phase 1 (dense mixture) until PI reaches 0.2, which happens after the first step (PI ≈ 0.44): phase and PI must
# survive the checkpoint at step 3, or the resumed run would fall back to phase 1
_PHASES = ["--phase1-steps", "5", "--phase2-pi", "0.2"]


def test_resume_after_interrupt_is_bit_exact(tiny_moe, tmp_path, monkeypatch, capsys):
    moe, data = tiny_moe
    assert main(_train_args(moe, data, tmp_path / "a", extra=_PHASES)) == 0
    reference = _resumable(tmp_path / "a")
    assert len(reference["history"]) == 6 and (tmp_path / "a" / "model" / "config.json").is_file()
    assert [h["phase"] for h in reference["history"]] == [1, 2, 2, 2, 2, 2]

    calls = {"n": 0}
    original = MaskedAdamW.step

    def interrupted(self, closure=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, closure)

    monkeypatch.setattr(MaskedAdamW, "step", interrupted)
    assert main(_train_args(moe, data, tmp_path / "b", extra=_PHASES)) == 130
    monkeypatch.setattr(MaskedAdamW, "step", original)
    assert "checkpoints in" in capsys.readouterr().err  # the interrupted run says what is kept and how to resume
    assert not (tmp_path / "b" / "model").exists()
    assert main(_train_args(moe, data, tmp_path / "b", extra=_PHASES)) == 2  # refuses to overwrite without --resume
    assert "--resume" in capsys.readouterr().err
    assert main(_train_args(moe, data, tmp_path / "b", extra=[*_PHASES, "--resume"])) == 0
    resumed = _resumable(tmp_path / "b")
    assert resumed["history"] == reference["history"]
    assert resumed["update_rate_per_category"] == reference["update_rate_per_category"]
    assert resumed["emergent_shared_experts"] == reference["emergent_shared_experts"]
    # resuming under other settings, or past the run's end, is refused and leaves the run as it was
    model_mtime = (tmp_path / "b" / "model" / "model.safetensors").stat().st_mtime_ns
    assert main(_train_args(moe, data, tmp_path / "b", steps=9, extra=[*_PHASES, "--resume", "--lr", "0.5"])) == 2
    assert "other settings (lr: 5e-05 -> 0.5)" in capsys.readouterr().err
    assert main(_train_args(moe, data, tmp_path / "b", extra=[*_PHASES, "--resume"])) == 2
    assert "is at step 6, so --steps 6 leaves nothing to train" in capsys.readouterr().err
    assert (tmp_path / "b" / "model" / "model.safetensors").stat().st_mtime_ns == model_mtime


def test_two_processes_match_one(tiny_moe, tmp_path):
    moe, data = tiny_moe
    assert main(_train_args(moe, data, tmp_path / "one", steps=3, extra=["--grad-accum", "2"])) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", str(port),
           "-m", "tiny_onn.cli", *_train_args(moe, data, tmp_path / "two", steps=3)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _ce(tmp_path / "one"), _ce(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two, strict=True):
        assert abs(a - b) < 1e-4, (one, two)


def test_train_bad_inputs(tiny_moe, tmp_path, capsys, monkeypatch):
    moe, data = tiny_moe
    assert main(_train_args(moe, data, tmp_path / "x", extra=["--max-k", "9"])) == 2
    assert "larger than the model's 4 experts" in capsys.readouterr().err
    # NaN loss: stops with a clear message, keeps the last good checkpoint
    import tiny_onn.train.trainer as trainer

    real = trainer.response_ce_sum
    calls = {"n": 0}

    def poisoned(logits, labels):
        calls["n"] += 1
        ce, ent = real(logits, labels)
        return (ce * float("nan"), ent) if calls["n"] > 4 else (ce, ent)

    monkeypatch.setattr(trainer, "response_ce_sum", poisoned)
    assert main(_train_args(moe, data, tmp_path / "nan")) == 2
    err = capsys.readouterr().err
    assert "the loss became nan at step 4" in err and "step-000003" in err
    assert (tmp_path / "nan" / "checkpoints" / "step-000003" / "model.safetensors").is_file()
    monkeypatch.setattr(trainer, "response_ce_sum", real)
    # resuming with a different model layout is refused
    from tiny_onn.carve import CarveConfig, run

    other = tmp_path / "other_moe"
    run(CarveConfig(scan=str(moe.parent / "scan"), model=str(moe.parent / "dense"), experts=2, top_k=1,
                    calib_tokens=256, calib_steps=2, eval_tokens=0, plots=False, device="cpu", out=str(other)))
    assert main(_train_args(other, data, tmp_path / "nan", extra=["--resume", "--max-k", "1"])) == 2
    assert "was made for a different model" in capsys.readouterr().err
    # a diverged run (finite training loss, weights blown up) writes no model
    assert main(_train_args(moe, data, tmp_path / "diverged", steps=3, extra=["--lr", "1e6", "--policy", "full"])) == 2
    err = capsys.readouterr().err
    assert "training diverged" in err and "Lower --lr" in err
    assert not (tmp_path / "diverged" / "model").exists()
    # a teacher of the same vocabulary size with another tokenizer is refused
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(moe.parent / "dense", teacher)
    tok = json.loads((teacher / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens swap ids: same size, another tokenizer
    (teacher / "tokenizer.json").write_text(json.dumps(tok))
    assert main(_train_args(moe, data, tmp_path / "kd", steps=1, extra=["--teacher", str(teacher), "--kd", "1"])) == 2
    assert "tokenizes differently from the student" in capsys.readouterr().err
    # the same tokenizer with embeddings padded to another size: the sizes are named, not the tokenizer
    from tests.conftest import make_tiny_model

    padded = tmp_path / "padded"
    config = json.loads((moe.parent / "dense" / "config.json").read_text())
    make_tiny_model("qwen3" if config["model_type"] == "qwen3" else "llama", config["vocab_size"] + 64).save_pretrained(padded)
    for name in (moe.parent / "dense").glob("*token*"):
        shutil.copy(name, padded / name.name)
    assert main(_train_args(moe, data, tmp_path / "kd2", steps=1, extra=["--teacher", str(padded), "--kd", "1"])) == 2
    assert f"{config['vocab_size'] + 64} output rows" in capsys.readouterr().err


def test_training_phases_route_without_changing_the_saved_config(tiny_moe, tmp_path):
    """Phase 1 (dense mixture) and phase 2's top-p are runtime routing: the config (what a save writes) stays as
    carved while the blocks route by phase, and only a run that reached phase 2 saves the top-p it trained with."""
    from tiny_onn.train import TrainConfig
    from tiny_onn.train.trainer import Trainer

    moe, data = tiny_moe
    cfg = TrainConfig(model=str(moe), data=str(data), steps=3, batch_size=2, seq_len=32, eval_tokens=0, device="cpu",
                      policy="full", phase1_steps=2, top_p=0.6, checkpoint_every=0, out=str(tmp_path / "t"))
    trainer = Trainer(cfg)
    blocks = [layer.mlp for layer in trainer.model.model.layers]
    trainer._enter_phase(0)
    assert {b.routing.mode for b in blocks} == {"dense_mixture"}
    assert trainer.model.config.moe_mode == "sparse" and trainer.model.config.router_top_p == 0.0
    trainer.state.phase = 1
    trainer._enter_phase(2)  # phase 1 ends at phase1_steps
    assert {(b.routing.mode, b.routing.top_p) for b in blocks} == {("sparse", 0.6)}
    assert trainer.model.config.router_top_p == 0.0
    phase1 = ["--phase1-steps", "5", "--top-p", "0.6", "--policy", "full"]
    assert main(_train_args(moe, data, tmp_path / "p1", steps=3, extra=phase1)) == 0
    assert [h["phase"] for h in json.loads((tmp_path / "p1" / "train.json").read_text())["history"]] == [1, 1, 1]
    saved = json.loads((tmp_path / "p1" / "model" / "config.json").read_text())
    assert saved["moe_mode"] == "sparse" and saved["router_top_p"] == 0.0
    phase2 = ["--phase1-steps", "1", "--top-p", "0.6", "--policy", "full"]
    assert main(_train_args(moe, data, tmp_path / "p2", steps=3, extra=phase2)) == 0
    saved = json.loads((tmp_path / "p2" / "model" / "config.json").read_text())
    assert saved["moe_mode"] == "sparse" and saved["router_top_p"] == 0.6


def test_step_without_response_tokens_updates_nothing(tiny_moe, tmp_path):
    """A step whose packed rows all fall inside a long prompt has no CE to learn from: it is skipped (no optimizer
    step, PI kept, losses None in its record) instead of logging CE 0, which PI would read as a perfect prediction."""
    from tiny_onn.data import scored_positions
    from tiny_onn.train import TrainConfig
    from tiny_onn.train.trainer import Trainer

    moe, _ = tiny_moe
    long_prompt = " ".join(f"word{i}" for i in range(200))
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{long_prompt} {i}"},
                                                     {"role": "assistant", "content": f"ok {i}"}]}) + "\n"
                            for i in range(12)))
    cfg = TrainConfig(model=str(moe), data=str(data), steps=8, batch_size=1, seq_len=16, eval_tokens=0, device="cpu",
                      policy="full", checkpoint_every=0, warmup_steps=0, out=str(tmp_path / "t"))
    trainer = Trainer(cfg)
    has_response = scored_positions(trainer.data.labels)[1].any(1)  # [rows]
    empty, scored = int((~has_response).nonzero()[0]), int(has_response.nonzero()[0])
    trainer.state.pi = 0.25
    before = [p.detach().clone() for p in trainer.model.parameters()]
    rec = trainer.train_step(empty)
    assert rec["skipped"] and rec["ce"] is None and rec["scored_tokens"] == 0 and rec["pi"] == 0.25
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters(), strict=True))
    assert not trainer.optimizer.state  # AdamW took no step
    rec = trainer.train_step(scored)
    assert not rec.get("skipped") and rec["ce"] > 0 and rec["scored_tokens"] == int(
        scored_positions(trainer.data.labels[scored : scored + 1])[1].sum())
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters(), strict=True))


def test_warm_up_longer_than_the_run_still_reaches_the_full_rate():
    from tiny_onn.train.trainer import lr_lambda

    # 10 warm-up steps asked for a 4-step run: the ramp is cut to the run's 4 steps, 1/4, 2/4, 3/4, 1
    assert [lr_lambda(s, 10, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # a normal run: 2 warm-up steps, then the cosine from 1 down to 0.1 over the remaining 4
    assert [lr_lambda(s, 2, 6) for s in range(2)] == [0.5, 1.0]
    assert lr_lambda(2, 2, 6) == 1.0 and abs(lr_lambda(4, 2, 6) - (0.1 + 0.9 * 0.5)) < 1e-12


def test_a_resumed_run_with_more_steps_keeps_its_warm_up(tiny_moe, tmp_path):
    """The first run of 3 steps cuts its 10 warm-up steps to 3; resumed to 5 steps, it goes on from the full rate
    (the cosine's start) instead of dropping back into a 5-step warm-up."""
    moe, data = tiny_moe
    out = tmp_path / "run"
    assert main(_train_args(moe, data, out, steps=3, extra=["--warmup-steps", "10"])) == 0
    assert main(_train_args(moe, data, out, steps=5, extra=["--warmup-steps", "10", "--resume"])) == 0
    lrs = [h["lr"] for h in json.loads((out / "train.json").read_text())["history"]]
    base = lrs[2]  # the full rate, reached on the first run's last step
    assert lrs[:3] == pytest.approx([base / 3, 2 * base / 3, base])
    assert lrs[3] == pytest.approx(base) and lrs[4] == pytest.approx(base * 0.55)  # cosine: 1 at the start, 0.55 midway


def test_a_finished_run_keeps_a_checkpoint_of_its_last_step(tiny_moe, tmp_path):
    """--steps 3 with --checkpoint-every 2 saves step 2 and step 3, so extending the run with --resume goes on from
    step 3 instead of training step 3 again."""
    moe, data = tiny_moe
    out = tmp_path / "run"
    assert main(_train_args(moe, data, out, steps=3, extra=["--checkpoint-every", "2"])) == 0
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 3
    first = json.loads((out / "train.json").read_text())["history"]
    assert main(_train_args(moe, data, out, steps=4, extra=["--checkpoint-every", "2", "--resume"])) == 0
    history = json.loads((out / "train.json").read_text())["history"]
    assert len(history) == 4 and history[:3] == first


def test_resume_refuses_data_edited_in_place(tiny_moe, tmp_path, capsys):
    moe, data = tiny_moe
    copy = tmp_path / "data.jsonl"
    lines = data.read_text().splitlines(keepends=True)
    copy.write_text("".join(lines))
    out = tmp_path / "run"
    assert main(_train_args(moe, copy, out, steps=2, extra=["--checkpoint-every", "2"])) == 0
    copy.write_text("".join(lines[: len(lines) // 2]))  # same path, other examples
    capsys.readouterr()
    assert main(_train_args(moe, copy, out, steps=4, extra=["--checkpoint-every", "2", "--resume"])) == 2
    assert "a file edited in place?" in capsys.readouterr().err


def test_annealed_top_k_falls_linearly_to_the_models_own():
    from tiny_onn.train.trainer import anneal_span, annealed_top_k

    # 10 steps, from 8 to 2 over half of them: steps 0..4 step down by 6/5 per step, then 2 to the end
    assert anneal_span(10, 0.5) == 5
    assert [annealed_top_k(s, 5, 8, 2) for s in range(10)] == [8, 7, 6, 4, 3, 2, 2, 2, 2, 2]
    # annealing over all steps still trains the last step at the model's own top-k
    assert anneal_span(10, 1.0) == 9 and annealed_top_k(9, 9, 8, 2) == 2 and annealed_top_k(8, 9, 8, 2) == 3
    assert anneal_span(1, 1.0) == 0 and annealed_top_k(0, 0, 8, 2) == 2  # one step: nothing to anneal over


def test_top_k_start_anneals_the_routing_not_the_saved_config(tiny_moe, tmp_path, capsys, caplog):
    moe, data = tiny_moe
    args = ["--top-k-start", "4", "--top-k-anneal", "1.0", "--policy", "full"]
    assert main(_train_args(moe, data, tmp_path / "a", steps=6, extra=args)) == 0
    history = json.loads((tmp_path / "a" / "train.json").read_text())["history"]
    assert [h["top_k"] for h in history] == [4, 4, 3, 3, 2, 2]  # the tiny MoE routes top-2 of 4 experts
    assert json.loads((tmp_path / "a" / "model" / "config.json").read_text())["num_experts_per_tok"] == 2
    # extended with --resume --steps, the schedule stays the one the run started with: no denser steps again
    assert main([*_train_args(moe, data, tmp_path / "a", steps=9, extra=args), "--resume"]) == 0
    history = json.loads((tmp_path / "a" / "train.json").read_text())["history"]
    assert [h["top_k"] for h in history] == [4, 4, 3, 3, 2, 2, 2, 2, 2]
    for bad, says in ((["--top-k-start", "5"], "between the model's top-k (2) and its 4 experts"),
                      (["--top-k-start", "1"], "in 2..4"),
                      (["--top-k-start", "3", "--top-p", "0.5"], "give one"),
                      (["--top-k-start", "3", "--phase1-steps", "2"], "--phase1-steps runs every expert first"),
                      (["--top-k-start", "3", "--top-k-anneal", "0"], "--top-k-anneal in (0, 1]")):
        out = tmp_path / f"bad{bad[1]}{len(bad)}"
        assert main(_train_args(moe, data, out, steps=2, extra=[*bad, "--policy", "full"])) == 2
        assert says in capsys.readouterr().err
        assert not out.exists()
    top_p = tmp_path / "top_p_moe"  # a MoE carved with top-p: its threshold decides, a top-k anneal would not
    shutil.copytree(moe, top_p)
    config = json.loads((top_p / "config.json").read_text())
    (top_p / "config.json").write_text(json.dumps({**config, "router_top_p": 0.6}))
    assert main(_train_args(top_p, data, tmp_path / "p", steps=2, extra=["--top-k-start", "3", "--policy", "full"])) == 2
    assert "routes by top-p 0.6" in capsys.readouterr().err
    with caplog.at_level("WARNING"):  # a schedule shorter than one step, and a teacher nothing reads
        assert main(_train_args(moe, data, tmp_path / "s", steps=1, extra=[
            "--top-k-start", "3", "--policy", "full", "--teacher", str(moe.parent / "dense")])) == 0
    assert "less than one step" in caplog.text and "loaded but unused" in caplog.text


def test_resume_takes_the_same_data_file_spelt_another_way(tiny_moe, tmp_path, monkeypatch):
    moe, data = tiny_moe
    monkeypatch.chdir(data.parent)
    args = _train_args(moe, data.name, tmp_path / "r", steps=3)
    assert main(args) == 0
    args = _train_args(moe, f"./{data.name}", tmp_path / "r", steps=6)
    assert main([*args, "--resume"]) == 0
    assert len(json.loads((tmp_path / "r" / "train.json").read_text())["history"]) == 6
