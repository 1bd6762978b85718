"""Interop: lm-eval-harness's `hf` model runs a local-file multiple-choice task on an exported TinyOnn MoE."""

from __future__ import annotations

import pytest

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
    )
    acc = results["results"]["tiny_onn_local_arc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
