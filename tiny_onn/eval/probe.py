"""A small built-in probe of 24 easy questions with exact answers, answered greedily; the score is the fraction right.

Matching is the fact benchmark's (tiny_onn.eval.facts): the answer as a whole word or phrase in the reply's first
sentence, so "Au" is not found in "because" nor "7" in "17". The fact benchmark (`--tasks facts`) is the measure to
use; this probe stays for continuity with earlier tables."""

from __future__ import annotations

import torch

from tiny_onn.data.facts import Fact
from tiny_onn.eval.facts import answer_matches
from tiny_onn.generate import plain_decoding

PROBE = (
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is the largest planet in our solar system?", "Jupiter"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the chemical symbol for gold?", "Au"),
    ("What is the chemical symbol for water?", "H2O"),
    ("How many days are in a week?", "7"),
    ("How many legs does a spider have?", "8"),
    ("What is 2 + 2?", "4"),
    ("What is 10 times 10?", "100"),
    ("What is 15 minus 7?", "8"),
    ("Who wrote 'Romeo and Juliet'?", "Shakespeare"),
    ("What is the freezing point of water in degrees Celsius?", "0"),
    ("What color is the sky on a clear day?", "blue"),
    ("What is the opposite of hot?", "cold"),
    ("Which animal is known as the king of the jungle?", "lion"),
    ("What gas do plants absorb from the air?", "carbon dioxide"),
    ("How many continents are there on Earth?", "7"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("In which country are the pyramids of Giza?", "Egypt"),
    ("What is the boiling point of water in degrees Celsius?", "100"),
)


@torch.no_grad()
def factual_probe(model, tokenizer, max_new_tokens: int = 24) -> dict:
    device = next(model.parameters()).device
    right, answers = 0, []
    for question, answer in PROBE:
        chat = [{"role": "user", "content": question}]
        if tokenizer.chat_template:
            ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")["input_ids"]
        else:
            ids = tokenizer(question, return_tensors="pt")["input_ids"]
        with plain_decoding(model):
            out = model.generate(ids.to(device), max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        reply = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        ok = answer_matches(reply, Fact("probe", question, (answer,)))
        right += int(ok)
        answers.append({"question": question, "expected": answer, "reply": reply.strip(), "correct": ok})
    return {"accuracy": right / len(PROBE), "n": len(PROBE), "answers": answers}
