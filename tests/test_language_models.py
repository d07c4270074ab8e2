"""Pretrained Hugging Face models federated on raw text: LoRA adapters (or the whole model)
trained on devices, the merged model in ONNX with its tokenizer, predicting strings.

The text is real (the machine's Debian package descriptions, labelled by section); the
model is either the real pretrained all-MiniLM-L6-v2 or a tiny BERT written by the test,
a folder like any a user would give.
"""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from safetensors import safe_open

import fedge
from fedge.models.inference import TOKENIZER_KEY

from conftest import assert_simulation_refused, run_fedge
from test_deployment import Deployment
from textdata import corpus_texts, minilm_folder, write_corpus, write_tiny_bert

NO_TRACEBACK = "Traceback"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Package descriptions of 4 sections, 36 each, dealt to stores s0 and s1."""
    path = tmp_path_factory.mktemp("text") / "packages.csv"
    write_corpus(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, corpus) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny") / "tiny-bert", corpus_texts(corpus))


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _state_names(checkpoint: Path) -> list[str]:
    import torch

    return list(torch.load(checkpoint, weights_only=True)["state_dict"])


def _test_rows(corpus: Path, run_dir: Path) -> tuple[list[str], list[str]]:
    """Some texts with their sections: the corpus' last rows."""
    with corpus.open(newline="") as file:
        rows = list(csv.DictReader(file))[-40:]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def test_lora_adapts_a_pretrained_model_on_devices_and_its_onnx_model_reads_raw_text(
        corpus, tmp_path):
    """all-MiniLM-L6-v2 with rank-8 adapters, two stores as clients: the adapters and the
    head alone travel, the merged model classifies package descriptions it never saw,
    from strings, with onnxruntime and the tokenizer inside the ONNX file."""
    run_dir = tmp_path / "run"
    result = run_fedge("simulate", "--model", f"hf:{minilm_folder()}", "--data", str(corpus),
                       "--lora", "8", "--partition", "column:store", "--rounds", "3",
                       "--local-epochs", "2", "--batch-size", "16", "--out", str(run_dir),
                       timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert NO_TRACEBACK not in result.stderr
    metrics = _metrics(run_dir)
    assert metrics["test"]["accuracy"] >= 0.75, metrics["test"]
    assert metrics["test"]["macro_f1"] >= 0.7, metrics["test"]

    # Only the adapters (query and value of 6 layers: A and B) and the head travel.
    names = _state_names(run_dir / "best.pt")
    assert len(names) == 6 * 2 * 2 + 2
    assert all("lora_" in n or n.startswith("head.") for n in names), names
    with safe_open(minilm_folder() / "model.safetensors", "pt") as weights:
        full_bytes = sum(weights.get_tensor(k).numel() * 4 for k in weights.keys())  # noqa: SIM118
    sent = metrics["rounds"][0]["bytes_per_client"]
    assert 50 * sent < full_bytes, (sent, full_bytes)

    model = run_dir / "model.onnx"
    assert TOKENIZER_KEY in {p.key for p in onnx.load(str(model), load_external_data=False)
                             .metadata_props}
    texts, sections = _test_rows(corpus, run_dir)
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    predicted = run_fedge("predict", str(model), str(tmp_path / "texts.txt"))
    assert predicted.returncode == 0, predicted.stderr
    lines = predicted.stdout.splitlines()
    assert len(lines) == len(texts)
    assert np.mean([a == b for a, b in zip(lines, sections, strict=True)]) >= 0.7
    one = run_fedge("predict", str(model), texts[0])
    assert one.returncode == 0 and one.stdout.strip() == lines[0], one.stderr
    judged = fedge.evaluate(model, corpus)  # its text column and labels
    assert judged["samples"] == len(corpus_texts(corpus)) and judged["accuracy"] >= 0.75

    # int8: transformers quantize dynamically; the int8 model reads strings too.
    int8 = tmp_path / "int8.onnx"
    exported = run_fedge("export", str(run_dir / "best.pt"), "-o", str(int8),
                         "--quantize", "int8", "--eval-data", str(corpus))
    assert exported.returncode == 0, exported.stderr
    assert "int8 (dynamic)" in exported.stdout
    assert int8.stat().st_size < model.stat().st_size / 2
    agree = fedge.predict(int8, texts)
    assert np.mean([a == b for a, b in zip(agree, lines, strict=True)]) >= 0.8


def test_only_the_adapters_and_head_train_and_travel_and_full_fine_tuning_sends_all(
        corpus, tiny_bert, tmp_path):
    common = {"data": str(corpus), "partition": "column:store", "rounds": 1,
              "local_epochs": 1}
    lora = fedge.simulate(f"hf:{tiny_bert}", out=tmp_path / "lora", lora=4,
                          lora_targets=["query", "key", "value"], **common)
    stores = tmp_path / "stores"  # the same clients, one file each (--client-data)
    stores.mkdir()
    with corpus.open(newline="") as file:
        rows = list(csv.DictReader(file))
    for store in ("s0", "s1"):
        _write_device_csv(stores / f"{store}.csv", [r["text"] for r in rows if r["store"] == store],
                          [r["label"] for r in rows if r["store"] == store])
    full = fedge.simulate(f"hf:{tiny_bert}", out=tmp_path / "full", client_data=str(stores),
                          rounds=1, local_epochs=1)

    names = _state_names(lora.run_dir / "best.pt")
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names if "lora_" in n} == {
        "query", "key", "value"}
    full_names = _state_names(full.run_dir / "best.pt")
    assert "encoder.embeddings.word_embeddings.weight" in full_names
    sent_lora = _metrics(lora.run_dir)["rounds"][0]["bytes_per_client"]
    sent_full = _metrics(full.run_dir)["rounds"][0]["bytes_per_client"]
    assert sent_lora * 5 < sent_full
    # The base stays as it was: the merged export equals base + adapters, and the
    # adapters moved away from their start (B starts at zero).
    import torch

    state = torch.load(lora.run_dir / "best.pt", weights_only=True)["state_dict"]
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)


@pytest.mark.parametrize("settings", [
    {"strategy": "fedprox"},
    {"strategy": "fedadam"},
    {"strategy": "fedmedian"},
    {"strategy": "fedbuff", "concurrency": 2, "buffer": 1, "rounds": 2},
    {"dp_clip_norm": 1.0, "dp_noise_multiplier": 0.1, "strategy": "fedavg"},
    {"secagg": True, "clients": 3, "partition": "iid"},
    {"compress": "int8"},
], ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_lora_federates_with_every_strategy_and_privacy_setting(corpus, tiny_bert, tmp_path,
                                                                 settings):
    settings = {"partition": "column:store", "rounds": 1, "local_epochs": 1, **settings}
    result = fedge.simulate(f"hf:{tiny_bert}", str(corpus), out=tmp_path / "run", lora=4,
                            **settings)
    metrics = _metrics(result.run_dir)
    assert metrics["status"] == "finished"
    assert (result.run_dir / "model.onnx").exists()
    steps = metrics.get("versions") or metrics["rounds"]
    assert steps and all("lora_" in n or n.startswith("head.")
                         for n in _state_names(result.run_dir / "best.pt"))


def test_a_lora_run_resumes_and_runs_on_worker_processes(corpus, tiny_bert, tmp_path):
    run_dir = tmp_path / "run"
    common = {"data": str(corpus), "partition": "column:store", "local_epochs": 1,
              "lora": 4, "patience": 10, "out": run_dir, "rounds": 2}

    def stop_after_the_first(record, best):
        raise KeyboardInterrupt  # Ctrl-C once round 1 is checkpointed

    with pytest.raises(KeyboardInterrupt):
        fedge.simulate(f"hf:{tiny_bert}", on_round=stop_after_the_first, **common)
    first = _state_names(run_dir / "checkpoint.pt")
    resumed = fedge.simulate(f"hf:{tiny_bert}", resume=True, workers=2, **common)
    metrics = _metrics(resumed.run_dir)
    assert metrics["status"] == "finished"
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert _state_names(run_dir / "checkpoint.pt") == first


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_lora_trains_on_rays_clientapp_actors(corpus, tiny_bert, tmp_path):
    result = run_fedge("simulate", "--backend", "ray", "--model", f"hf:{tiny_bert}",
                       "--lora", "4", "--data", str(corpus), "--partition", "column:store",
                       "--rounds", "1", "--local-epochs", "1", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = _metrics(tmp_path / "run")
    assert metrics["status"] == "finished" and metrics["rounds"][0]["num_clients"] == 2
    assert all("lora_" in n or n.startswith("head.")
               for n in _state_names(tmp_path / "run" / "best.pt"))


def test_a_model_folder_that_is_missing_is_one_error_line_and_nothing_is_downloaded(
        corpus, tmp_path):
    result = run_fedge("simulate", "--model", f"hf:{tmp_path / 'all-MiniLM-L6-v2'}", "--data",
                       str(corpus), "--out", str(tmp_path / "run"),
                       env={"HF_HUB_OFFLINE": "0"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: no Hugging Face model folder at {tmp_path / 'all-MiniLM-L6-v2'}: fedge reads "
        "models only from a local folder and never downloads one (HF_HUB_OFFLINE=1); give "
        "the path of a Hugging Face model folder with config.json, model.safetensors and "
        "tokenizer.json"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("options", "message"), [
    (["--lora", "4"], "--lora adapts a pretrained Hugging Face model: give --model hf:FOLDER"),
    (["--model", "HF", "--lora-alpha", "8"], "--lora-alpha sets up LoRA adapters: give their "
                                             "rank with --lora too"),
    (["--model", "HF", "--lora", "4", "--lora-targets", "nothing"], "LoRA cannot adapt this "
                                                                    "model"),
    (["--model", "HF", "--max-length", "65"], "--max-length 65 is more than the 64 tokens"),
    (["--model", "HF", "--vectorize"], "vectorize does not work with a Hugging Face model"),
    (["--model", "HF", "--text-column", "words"], "has no 'words' column"),
    (["--model", "BROKEN"], "lacks model.safetensors"),
])
def test_settings_a_text_model_cannot_run_with_are_refused_before_anything_starts(
        corpus, tiny_bert, tmp_path, options, message):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bert, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    named = {"HF": f"hf:{tiny_bert}", "BROKEN": f"hf:{broken}"}
    assert_simulation_refused(tmp_path, ["--data", str(corpus),
                                         *(named.get(o, o) for o in options)], message)


def _write_device_csv(path: Path, texts: list[str], labels: list[str]) -> str:
    with path.open("w", newline="") as file:
        table = csv.writer(file)
        table.writerow(["text", "label"])
        table.writerows(zip(texts, labels, strict=True))
    return path.name


def test_a_tls_deployment_trains_adapters_on_devices_with_their_own_copy_of_the_base(
        corpus, tiny_bert, tmp_path):
    """Each device names its own copy of the model folder; a device whose base model is
    another one (another fingerprint) is refused, and says why, as does the server."""
    with corpus.open(newline="") as file:
        rows = [(r["text"], r["label"]) for r in csv.DictReader(file)]
    texts, labels = [t for t, _ in rows], [label for _, label in rows]
    d = Deployment(tmp_path, rounds=1, model=f'"hf:{tiny_bert}"', lora=4,
                   **{"local-epochs": 1, "min-clients": 3})
    try:
        np.savez(d.root / "val.npz", x=np.array(texts[:24]), y=np.array(labels[:24]))
        np.savez(d.root / "test.npz", x=np.array(texts[24:48]), y=np.array(labels[24:48]))
        for i, rows_of_device in enumerate(np.array_split(np.arange(48, len(texts)), 3)):
            _write_device_csv(d.root / f"device{i}.csv", [texts[r] for r in rows_of_device],
                              [labels[r] for r in rows_of_device])
        for i in (0, 1):
            shutil.copytree(tiny_bert, d.root / f"model{i}")
        write_tiny_bert(d.root / "model2", texts, seed=1)  # the same shapes, other weights
        server = d.server()
        clients = [d.client(f"device{i}", f"device{i}.csv", "--model", f"hf:model{i}")
                   for i in range(3)]

        assert clients[2].wait(timeout=300) == 2, d.logs()
        refusal = d.log("device2")
        assert "is not the federation's" in refusal and "fingerprint" in refusal, refusal
        assert server.wait(timeout=300) == 0, d.logs()
        assert "is not the federation's" in d.log("server")
        metrics = d.metrics()
        assert [(r["num_clients"], r["failures"]) for r in metrics["rounds"]] == [(2, 1)]
        for client in clients[:2]:
            assert client.wait(timeout=60) == 0, d.logs()
        for name in ("server", "device0", "device1", "device2"):
            assert NO_TRACEBACK not in d.log(name), d.log(name)
        predicted = fedge.predict(d.root / "run" / "model.onnx", texts[:5])
        assert set(predicted) <= set(labels)
    finally:
        d.stop_all()
