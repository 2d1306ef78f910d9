"""A synthetic QA task and a tiny *copying* reader built by hand, for tests that need a real reader signal.

The reader has one attention layer with zero query/key projections (so it attends uniformly, scaled by the
DMA mask) and identity value/output projections, tied to random embeddings. Its answer loss drops exactly
when the document holding the answer word is visible: the signal G-Rerank needs. The answer document also
carries the marker word 'gold' the reranker can learn to spot; distractors never do.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

FILLER = "apple river stone cloud music paper garden window silver forest candle mirror".split()  # noqa: SIM905
ANSWERS = ["tiger", "piano", "rocket", "violin", "dragon", "castle", "pepper", "lemon"]


def synthetic_split(path: Path, size: int, n: int, seed: int) -> Path:
    """FiD-layout questions whose answer word sits in one of ``n`` documents, next to the marker 'gold'."""
    rng = random.Random(seed)
    rows = []
    for i in range(size):
        answer = rng.choice(ANSWERS)
        target = rng.randrange(n)
        ctxs = []
        for j in range(n):
            words = rng.sample(FILLER, 5)
            if j == target:
                words[rng.randrange(5)] = f"gold {answer}"
            ctxs.append({"title": "", "text": " ".join(words), "has_answer": j == target})
        rows.append({"id": f"s{i}", "question": "which word?", "answers": [answer], "ctxs": ctxs})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_copy_reader(tokenizer_dir: Path, folder: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=30522,
        hidden_size=64,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=102,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.5)
        attention = model.model.layers[0].self_attn
        attention.q_proj.weight.zero_()
        attention.k_proj.weight.zero_()
        attention.v_proj.weight.copy_(10 * torch.eye(64))  # what is attended outweighs the own token
        attention.o_proj.weight.copy_(torch.eye(64))
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(0.3)  # keeps logits, and so the answer loss, in a readable range
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder
