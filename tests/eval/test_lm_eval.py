"""Interop: lm-eval-harness's `hf` model runs a local-file multiple-choice task on an exported TinyOnn MoE."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import write_jsonl

lm_eval = pytest.importorskip("lm_eval", reason="lm_eval is in the dev extra")

TASK = """task: tiny_onn_local_arc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def test_lm_eval_scores_an_exported_moe(tiny_moe, tmp_path):
    moe, _ = tiny_moe
    data = write_jsonl(tmp_path / "items.jsonl", [
        {"question": f"What is {i} + 1?", "choices": [str(i + 1), str(i + 2), str(i)], "answer": 0} for i in range(6)
    ])
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local.yaml").write_text(TASK.format(data=data))
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model="hf", model_args=f"pretrained={moe},trust_remote_code=True,dtype=float32",
        tasks=["tiny_onn_local_arc"], task_manager=TaskManager(include_path=str(tasks)), device="cpu", batch_size=2,
        log_samples=True,
    )
    # the same numbers by hand: log-probability of " choice" after "Question: …\nAnswer:", from one plain forward pass
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(moe, trust_remote_code=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(moe)
    samples = sorted(results["samples"]["tiny_onn_local_arc"], key=lambda s: s["doc_id"])
    correct = 0
    for sample in samples:
        doc = sample["doc"]
        context = f"Question: {doc['question']}\nAnswer:"
        by_hand = [_loglik(model, tok, context, " " + choice) for choice in doc["choices"]]
        theirs = [float(r[0]) for r in sample["filtered_resps"]]
        assert theirs == pytest.approx(by_hand, abs=1e-4)
        correct += int(max(range(len(by_hand)), key=by_hand.__getitem__) == doc["answer"])
    assert len(samples) == 6
    assert results["results"]["tiny_onn_local_arc"]["acc,none"] == pytest.approx(correct / len(samples))


def _loglik(model, tok, context: str, continuation: str) -> float:
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    full = tok(context + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), dim=-1)
    return sum(float(logp[t - 1, full[t]]) for t in range(len(ctx), len(full)))
