"""Generative fine-tuning with fastft.Trainer: prompt/completion and chat data (token-exact masking),
validation by generation, LoRA through peft (save / load / merge / resume), bad input."""

import json
import warnings

import pytest
import torch

from lm_helpers import tiny_bpe_tokenizer, tiny_gpt2_for, tiny_llama, tiny_bert_mlm

import fastft
from fastft.train.generative import generative_examples

peft = pytest.importorskip("peft")

PC = [{"prompt": f"Summarise: the weather in city {i} was mild. Answer:", "completion": f" city {i}"}
      for i in range(16)]
CHAT = [{"messages": [{"role": "system", "content": "be brief"},
                      {"role": "user", "content": f"where was it mild {i}?"},
                      {"role": "assistant", "content": f"city {i}"},
                      {"role": "user", "content": "and then?"},
                      {"role": "assistant", "content": "nowhere else"}]} for i in range(12)]


@pytest.fixture(scope="module")
def tok():
    return tiny_bpe_tokenizer()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2_for}


def lora(model, **kw):
    llama = type(model).__name__.startswith("Llama")
    cfg = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"] if llama else ["c_attn"],
               fan_in_fan_out=not llama)
    cfg.update(kw)
    return peft.get_peft_model(model, peft.LoraConfig(**cfg))


def targets(example):
    return [t for t, y in zip(example["input_ids"], example["labels"]) if y != -100]


@pytest.mark.parametrize("arch", MODELS)
def test_prompt_tokens_are_masked_exactly(tok, arch):
    trainer = fastft.Trainer(MODELS[arch](len(tok)), PC, tokenizer=tok, epochs=1, progress=False)
    for e, raw in zip(trainer.train_examples, PC):
        prompt = tok(raw["prompt"])["input_ids"]
        completion = tok(raw["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert e["input_ids"] == prompt + completion
        assert e["labels"] == [-100] * len(prompt) + completion
        assert tok.decode(targets(e)) == raw["completion"] + tok.eos_token
    assert trainer.metrics == ("perplexity",)


@pytest.mark.parametrize("arch", MODELS)
def test_chat_trains_on_assistant_turns_only(tok, arch):
    trainer = fastft.Trainer(MODELS[arch](len(tok)), CHAT, tokenizer=tok, epochs=1, progress=False)
    for i, e in enumerate(trainer.train_examples):
        rendered = tok.apply_chat_template(CHAT[i]["messages"], tokenize=False)
        assert tok.decode(e["input_ids"]) == rendered
        assert tok.decode(targets(e)) == f"city {i}<|im_end|>nowhere else<|im_end|>"
        # Every target token sits inside an assistant turn: the system and user text never are.
        masked = tok.decode([t for t, y in zip(e["input_ids"], e["labels"]) if y == -100])
        assert "be brief" in masked and "where was it mild" in masked and "nowhere" not in masked
    gen = trainer.val_generation
    assert gen is None
    data = generative_examples(CHAT[:2], tok, None, "val_data", "t")
    assert tok.decode(data.prompts[0]).endswith("and then?<|im_end|>\n<|im_start|>assistant\n")
    assert data.references == ["nowhere else", "nowhere else"]


def test_truncation_keeps_the_completion_and_says_so(tok):
    long = [{"prompt": "word " * 200 + "Answer:", "completion": " city 7"}] + PC[:3]
    with pytest.warns(UserWarning, match="1 of 4 examples of train_data are longer than 24 tokens"):
        trainer = fastft.Trainer(tiny_llama(len(tok)), long, tokenizer=tok, max_length=24, epochs=1, progress=False)
    e = trainer.train_examples[0]
    assert len(e["input_ids"]) == 24
    assert tok.decode(targets(e)) == " city 7" + tok.eos_token
    assert tok.decode(e["input_ids"]).endswith("word Answer: city 7" + tok.eos_token)
    chat = [{"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}]
    with pytest.warns(UserWarning, match="1 of 1"):
        data = generative_examples(chat, tok, 16, "train_data", "t")
    assert tok.decode(targets(data.examples[0])) == "ok<|im_end|>"


def test_accumulation_equals_one_big_batch_on_generative_data(tok):
    kw = dict(tokenizer=tok, epochs=1, lr=1e-2, group_by_length=False, progress=False, warmup_ratio=0.0,
              scheduler="constant")
    data = PC + CHAT[:0]
    a = fastft.Trainer(tiny_llama(len(tok)), data, batch_size=8, **kw)
    b = fastft.Trainer(tiny_llama(len(tok)), data, batch_size=4, gradient_accumulation=2, **kw)
    a.fit()
    b.fit()
    assert a.global_step == b.global_step == 2
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_validation_by_generation_records_metrics_and_predictions(tok, tmp_path):
    es = fastft.EarlyStopping(monitor="val_rouge_l", patience=3)
    trainer = fastft.Trainer(tiny_llama(len(tok)), PC, PC[:4], tokenizer=tok, epochs=2, batch_size=4, lr=1e-2,
                             progress=False, output_dir=str(tmp_path), early_stopping=es,
                             generation_metrics=("rouge_l", "bleu", "exact_match", "token_f1"),
                             generation_kwargs={"max_new_tokens": 6})
    result = trainer.fit()
    last = result.history[-1]
    assert {"val_loss", "val_perplexity", "val_rouge_l", "val_bleu", "val_exact_match", "val_token_f1"} <= set(last)
    rows = [json.loads(x) for x in (tmp_path / "val_predictions.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in rows] == [p["completion"].strip() for p in PC[:4]]
    assert all(r["step"] == result.global_step for r in rows)
    # The recorded numbers are the metrics of the recorded predictions, and generate() agrees with them.
    from fastft.train.metrics import generation_scores

    trainer.model.load_state_dict(trainer.model.state_dict())
    preds = trainer.generate([p["prompt"] for p in PC[:4]])
    scores = generation_scores(("rouge_l", "token_f1"), [r["prediction"] for r in rows], [r["reference"] for r in rows])
    if es.best_step == result.global_step:  # the best weights are the last ones
        assert [p for p in preds] == [r["prediction"] for r in rows]
    assert scores["rouge_l"] == pytest.approx(last["val_rouge_l"])
    assert scores["token_f1"] == pytest.approx(last["val_token_f1"])


def test_generation_leaves_training_rng_alone(tok):
    kw = dict(tokenizer=tok, epochs=2, batch_size=4, lr=1e-2, progress=False)
    a = fastft.Trainer(tiny_llama(len(tok)), PC, PC[:4], **kw)
    b = fastft.Trainer(tiny_llama(len(tok)), PC, PC[:4], generation_metrics=["token_f1"],
                       generation_kwargs={"max_new_tokens": 3, "do_sample": True}, **kw)
    a.fit()
    b.fit()
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("arch", MODELS)
def test_lora_trains_saves_and_loads(tok, arch, tmp_path):
    model = lora(MODELS[arch](len(tok)))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = fastft.Trainer(model, PC, PC[:4], tokenizer=tok, epochs=2, batch_size=4, lr=1e-2, l2_init=0.1,
                             progress=False, output_dir=str(tmp_path), save_merged=True,
                             early_stopping=fastft.EarlyStopping(patience=2))
    trainer.fit()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainer.optimizer.state) == len(trainable) and trainable
    assert all(p in trainer.optimizer.state for p in trainable)
    lora_groups = [g for g in trainer.optimizer.param_groups if any(p.requires_grad for p in g["params"])]
    assert all(g["l2_init"] == 0.0 for g in lora_groups)  # LoRA's matrices are new: never anchored
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[n]), n
    assert set(trainer.early_stopping.best_weights) == {n for n, p in model.named_parameters() if p.requires_grad}
    folder = tmp_path / "model"
    assert (folder / "adapter_config.json").is_file() and not (folder / "model.safetensors").exists()
    prompts = [p["prompt"] for p in PC[:3]]
    ours = fastft.generate(model, tok, prompts, max_new_tokens=5)
    loaded = peft.PeftModel.from_pretrained(MODELS[arch](len(tok)), str(folder))
    assert fastft.generate(loaded, tok, prompts, max_new_tokens=5) == ours
    merged = __import__("transformers").AutoModelForCausalLM.from_pretrained(str(folder / "merged"))
    assert fastft.generate(merged, tok, prompts, max_new_tokens=5) == ours


def test_lora_resume_is_bit_identical(tok, tmp_path):
    from test_trainer import Crash, CrashAt

    kw = dict(tokenizer=tok, epochs=2, batch_size=4, lr=1e-2, checkpoint_every=2, progress=False,
              generation_metrics=["token_f1"], generation_kwargs={"max_new_tokens": 3})
    full = fastft.Trainer(lora(tiny_llama(len(tok)), lora_dropout=0.1), PC, PC[:4], output_dir=str(tmp_path / "a"),
                          early_stopping=fastft.EarlyStopping(patience=3), **kw)
    full_result = full.fit()
    crashing = fastft.Trainer(lora(tiny_llama(len(tok)), lora_dropout=0.1), PC, PC[:4],
                              output_dir=str(tmp_path / "b"), callbacks=[CrashAt(5)],
                              early_stopping=fastft.EarlyStopping(patience=3), **kw)
    with pytest.raises(Crash):
        crashing.fit()
    resumed = fastft.Trainer(lora(tiny_llama(len(tok), seed=5), lora_dropout=0.1), PC, PC[:4],
                             output_dir=str(tmp_path / "b"), early_stopping=fastft.EarlyStopping(patience=3), **kw)
    result = resumed.resume()
    for (n, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n
    assert result.history == full_result.history


def test_lora_with_freezing_and_replay(tok):
    model = lora(tiny_llama(len(tok)))
    replay = fastft.Replay([f"the market opened at {i} o'clock ." for i in range(20)], ratio=0.25)
    trainer = fastft.Trainer(model, PC, tokenizer=tok, epochs=1, batch_size=4, lr=1e-2, freeze=1, replay=replay,
                             progress=False)
    layer0 = [p.detach().clone() for n, p in model.named_parameters() if "layers.0." in n and "lora_" in n]
    trainer.fit()
    after = [p for n, p in model.named_parameters() if "layers.0." in n and "lora_" in n]
    assert layer0 and all(torch.equal(a, b) for a, b in zip(layer0, after))  # frozen block: its LoRA too
    assert trainer.global_step == 6  # 3 task rows and 1 replay row a batch


def test_bad_generative_input_is_named(tok):
    mk = lambda: tiny_llama(len(tok))
    with pytest.raises(ValueError, match=r"train_data\[1\] has no 'completion'"):
        fastft.Trainer(mk(), [PC[0], {"prompt": "x"}], tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match=r"train_data\[1\] has an empty completion"):
        fastft.Trainer(mk(), [PC[0], {"prompt": "x", "completion": "  "}], tokenizer=tok, progress=False)
    bad_role = [{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}]
    with pytest.raises(ValueError, match=r"train_data\[0\]\['messages'\]\[0\] has the role 'robot'"):
        fastft.Trainer(mk(), bad_role, tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match="no assistant turn"):
        fastft.Trainer(mk(), [{"messages": [{"role": "user", "content": "hi"}]}], tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match="no chat template"):
        fastft.Trainer(mk(), CHAT, tokenizer=tiny_bpe_tokenizer(chat_template=None), progress=False)
    with pytest.raises(ValueError, match="causal LM"):
        fastft.Trainer(tiny_bert_mlm(), PC, tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        fastft.Trainer(mk(), PC, progress=False)
    with pytest.raises(ValueError, match="generation_metrics.*tokenizer"):
        fastft.Trainer(mk(), [(torch.zeros(2), 0)], generation_metrics=["bleu"], progress=False)
    with pytest.raises(ValueError, match="unknown generation metric 'rougeL'.*Did you mean 'rouge_l'"):
        fastft.Trainer(mk(), PC, PC[:2], tokenizer=tok, generation_metrics=["rougeL"], progress=False)
    with pytest.raises(ValueError, match="give val_data of"):
        fastft.Trainer(mk(), PC, tokenizer=tok, generation_metrics=["bleu"], progress=False)
    with pytest.raises(ValueError, match="max_new_token"):
        fastft.Trainer(mk(), PC, PC[:2], tokenizer=tok, generation_metrics=["bleu"],
                       generation_kwargs={"max_new_token": 4}, progress=False)
    with pytest.raises(ValueError, match="save_merged"):
        fastft.Trainer(mk(), PC, tokenizer=tok, save_merged=True, progress=False)
    with pytest.raises(ValueError, match=r"train_data\[1\] is not of the form"):
        fastft.Trainer(mk(), [PC[0], CHAT[0]], tokenizer=tok, progress=False)


def test_cli_runs_a_tiny_generative_config_with_lora(tok, tmp_path):
    from fastft.cli import main

    folder = tmp_path / "tiny-llama"
    tiny_llama(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(e) + "\n" for e in CHAT[:8]))
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(e) + "\n" for e in CHAT[8:10]))
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(e) + "\n" for e in CHAT[10:]))
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"text": f"the market opened at {i} o'clock ."}) + "\n" for i in range(8)))
    config = tmp_path / "gen.yaml"
    config.write_text(f"""
model: {{path: {folder}, task: generate}}
data: {{source: {train}, validation: {val}, test: {test}}}
lora: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}}
forgetting: {{source: {general}, max_examples: 8}}
prompting: {{shots: [0, 1]}}
trainer:
  epochs: 1
  batch_size: 4
  lr: 1.0e-2
  generation_metrics: [rouge_l, exact_match]
  generation_kwargs: {{max_new_tokens: 4}}
  save_merged: true
output_dir: {tmp_path / "run"}
""")
    assert main(["finetune", str(config), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["prompting"]) == {"0-shot", "1-shot"}
    assert {"rouge_l", "exact_match", "loss", "perplexity"} <= set(summary["test"])
    assert "pretrain_loss_rise" in summary["history"][-1] and "val_rouge_l" in summary["history"][-1]
    assert (tmp_path / "run" / "model" / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "model" / "merged" / "config.json").is_file()
    assert (tmp_path / "run" / "val_predictions.jsonl").is_file()
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {{path: {folder}}}\ndata: {{source: {train}}}\nlora: {{r: 4}}\n")
    assert main(["finetune", str(bad)]) == 2


def test_generative_prompting_baseline(tok):
    from fastft.prompting import few_shot_generation_prompt

    built = few_shot_generation_prompt(CHAT[:2], CHAT[5])
    assert [m["role"] for m in built] == ["system"] + ["user", "assistant"] * 4 + ["user", "assistant", "user"]
    assert built[0]["content"] == "be brief" and built[-1]["content"] == "and then?"
    assert few_shot_generation_prompt(PC[:2], PC[3]) == (PC[0]["prompt"] + PC[0]["completion"] + "\n\n" +
                                                         PC[1]["prompt"] + PC[1]["completion"] + "\n\n" +
                                                         PC[3]["prompt"])
    model = tiny_llama(len(tok))
    res = fastft.evaluate_generation_prompting(model, tok, PC[:8], PC[8:12], shots=(0, 2), metrics=("token_f1",),
                                               generation_kwargs={"max_new_tokens": 4})
    assert set(res) == {"0-shot", "2-shot"} and set(res["0-shot"]) == {"token_f1"}
    # The 0-shot number is the metric of exactly what fastft.generate writes for the bare prompts.
    from fastft.train.metrics import token_f1

    preds = fastft.generate(model, tok, [p["prompt"] for p in PC[8:12]], max_new_tokens=4)
    assert res["0-shot"]["token_f1"] == pytest.approx(token_f1([p.strip() for p in preds],
                                                               [p["completion"].strip() for p in PC[8:12]]))
    with pytest.raises(ValueError, match="need 9 demonstrations"):
        fastft.evaluate_generation_prompting(model, tok, PC[:8], PC[8:], shots=(9,))
    with pytest.raises(ValueError, match="causal LM"):
        fastft.evaluate_generation_prompting(tiny_bert_mlm(), tok, PC[:8], PC[8:])


def test_multitask_trainer_trains_a_lora_encoder_and_loads_it_back(tmp_path):
    import transformers

    from test_multitask import make_tasks

    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    encoder = peft.get_peft_model(transformers.BertModel(cfg), peft.LoraConfig(r=4, target_modules=["query", "value"]))
    trainer = fastft.MultiTaskTrainer(encoder, make_tasks(), epochs=1, batch_size=8, lr=1e-2, progress=False,
                                      output_dir=str(tmp_path), early_stopping=fastft.EarlyStopping(patience=2))
    trainer.fit()
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert len(trainer.optimizer.state) == len(trainable)  # the adapter and the heads, nothing of the base
    assert (tmp_path / "model" / "encoder" / "adapter_config.json").is_file()
    torch.manual_seed(0)
    loaded = fastft.MultiTaskModel.from_pretrained(str(tmp_path / "model"), encoder=transformers.BertModel(cfg))
    x = torch.randint(1, 40, (3, 6))
    trainer.model.eval()
    torch.testing.assert_close(loaded("a", input_ids=x).logits, trainer.model("a", input_ids=x).logits)
