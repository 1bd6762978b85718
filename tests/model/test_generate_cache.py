"""Generation with the KV cache must equal generation without it (transformers >= 5.2x passes the cache as `cache`;
a model that ignores it decodes every new token from that token alone)."""

from __future__ import annotations

import torch

from tiny_onn.model import TinyOnnConfig, TinyOnnForCausalLM


def test_greedy_generation_with_cache_equals_without():
    torch.manual_seed(0)
    cfg = TinyOnnConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                        shared_expert_intermediate_size=8, pad_token_id=0, eos_token_id=2)
    model = TinyOnnForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    prompt = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
        uncached = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0, use_cache=False)
        # and the logits of the last step equal a full forward over the whole sequence
        out = model(input_ids=cached[:, :-1], use_cache=True)
        full = model(input_ids=cached[:, :-1], use_cache=False).logits
    assert cached.tolist() == uncached.tolist()
    torch.testing.assert_close(out.logits, full, atol=1e-5, rtol=1e-5)
