"""Texts as samples: reading them, tokenizing them to one length, and a text model's
settings, without a model (the tokenizers library alone)."""

import json
from pathlib import Path

import numpy as np
import pytest

from fedge.config import ModelSettings
from fedge.datafiles import load_labelled_data
from fedge.errors import FedgeError
from fedge.models.hf import check_pretrained_settings, load_tokenizer, token_ids
from fedge.models.inference import text_inputs

TEXTS = ["my card was charged twice", "where is my parcel", "reset my password, please",
         "the app crashes when I open my statement"]


def _tokenizer_folder(folder: Path, max_positions: int = 64) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(TEXTS * 3, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": max_positions}))
    return folder


def test_a_csv_of_texts_keeps_commas_quotes_and_line_breaks_inside_a_text(tmp_path):
    path = tmp_path / "tickets.csv"
    path.write_text('id,text,label,store\n1,"reset my password, please",account,a\n'
                    '2,"two lines\nin one ""ticket""",billing,b\n3,where is my parcel,delivery,a\n')
    samples = load_labelled_data(path, text_column="text", group_column="store")
    assert samples.x.tolist() == ["reset my password, please", 'two lines\nin one "ticket"',
                                  "where is my parcel"]
    assert samples.class_names == ("account", "billing", "delivery")
    assert samples.y.tolist() == [0, 1, 2] and samples.groups.tolist() == ["a", "b", "a"]


@pytest.mark.parametrize(("content", "options", "message"), [
    ("text,label\nhello,a\n", {"text_column": "body"}, "has no 'body' column; its columns "
                                                       "are: text, label"),
    ("text,label\nhello,a\n", {"text_column": "label"}, "cannot be both the text and the "
                                                        "label"),
    ("text,label\nhello,\n", {"text_column": "text"}, "sample 1 of"),
    ("text,label\nhello,a,b\n", {"text_column": "text"}, "has 3 values, but the header names 2"),
])
def test_a_csv_of_texts_that_does_not_fit_is_named(tmp_path, content, options, message):
    path = tmp_path / "t.csv"
    path.write_text(content)
    with pytest.raises(FedgeError, match=message):
        load_labelled_data(path, **options)


def test_an_npz_of_strings_is_texts_and_numbers_are_not(tmp_path):
    np.savez(tmp_path / "texts.npz", x=np.array(TEXTS), y=np.array([0, 1, 0, 1]))
    assert load_labelled_data(tmp_path / "texts.npz", text_column="text").x.tolist() == TEXTS
    np.savez(tmp_path / "numbers.npz", x=np.zeros((4, 3)), y=np.array([0, 1, 0, 1]))
    with pytest.raises(FedgeError, match="must hold one string per sample for a text model"):
        load_labelled_data(tmp_path / "numbers.npz", text_column="text")
    with pytest.raises(FedgeError, match=r"a text model reads a \.csv file"):
        load_labelled_data(tmp_path, text_column="text")


def test_texts_become_token_ids_of_one_length_that_holds_the_longest(tmp_path):
    folder = _tokenizer_folder(tmp_path / "model")
    short, long = token_ids([np.array(TEXTS[:2]), np.array(TEXTS[2:])], folder, None)
    longest = max(len(load_tokenizer(folder).encode(t).ids) for t in TEXTS)
    assert short.shape[1] == long.shape[1] == -(-longest // 8) * 8
    assert short.dtype == np.int64 and (long[:, 0] == 2).all()  # [CLS] first
    assert (short[:, -1] == 0).all()  # padded with [PAD]
    (cut,) = token_ids([np.array(TEXTS)], folder, 4)
    assert cut.shape == (4, 4) and (cut[:, 0] == 2).all()
    with pytest.raises(FedgeError, match="--max-length 65 is more than the 64 tokens"):
        token_ids([np.array(TEXTS)], folder, 65)


def test_a_text_model_predicts_a_text_a_txt_file_or_a_csv_column(tmp_path):
    assert text_inputs(Path("my card was charged twice")).samples.tolist() == [
        "my card was charged twice"]
    (tmp_path / "t.txt").write_text("first text\n\n  second text\n")
    assert text_inputs(tmp_path / "t.txt").samples.tolist() == ["first text", "  second text"]
    (tmp_path / "t.csv").write_text('ticket,text\nA1,"hello, world"\nA2,bye\n')
    inputs = text_inputs(tmp_path / "t.csv", id_column="ticket")
    assert inputs.samples.tolist() == ["hello, world", "bye"] and inputs.ids == ["A1", "A2"]
    with pytest.raises(FedgeError, match="does not exist"):
        text_inputs(tmp_path / "typo.csv")
    with pytest.raises(FedgeError, match="has no 'body' column"):
        text_inputs(tmp_path / "t.csv", text_column="body")


def test_lora_settings_need_a_pretrained_model_and_a_rank(tmp_path):
    with pytest.raises(FedgeError, match="--lora adapts a pretrained Hugging Face model"):
        check_pretrained_settings(ModelSettings(name="mlp", lora=8))
    with pytest.raises(FedgeError, match="--lora-targets sets up LoRA adapters: give their "
                                         "rank"):
        check_pretrained_settings(ModelSettings(name=f"hf:{tmp_path}", lora_targets=["query"]))
    with pytest.raises(FedgeError, match=r"lacks config\.json, model\.safetensors, "
                                         r"tokenizer\.json"):
        check_pretrained_settings(ModelSettings(name=f"hf:{tmp_path}"))
    assert ModelSettings(lora_targets=["query,value", "dense"]).lora_targets == [
        "query", "value", "dense"]


def test_devices_without_python_cannot_train_a_hugging_face_model(tmp_path):
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / name).write_text("{}")
    check_pretrained_settings(ModelSettings(name=f"hf:{tmp_path}", lora=4))
    with pytest.raises(FedgeError, match="--edge-programs: devices without Python cannot "
                                         "train a Hugging Face model"):
        check_pretrained_settings(ModelSettings(name=f"hf:{tmp_path}"), edge_programs=True)
