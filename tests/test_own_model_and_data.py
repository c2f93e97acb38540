"""A user's own model folder and dataset file, through the real `fedpeft run` command.

The test writes everything itself: two tiny random-weight checkpoints saved
with ``save_pretrained`` (a 2-layer BERT, a 2-layer Llama; both on the bundled
MiniLM tokenizer) and small CSV / JSON Lines / Parquet / ``save_to_disk``
datasets. Federations run on the in-process engine to stay within seconds.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_SCRIPT = Path(sys.executable).with_name("fedpeft")
COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "fedpeft.cli"]
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)


# ---------------------------------------------------------------- assets written by the tests


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """Model folders and dataset files, written once for the module."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

    from fedpeft.models.minilm import model_dir

    root = tmp_path_factory.mktemp("own")
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # An encoder saved without a classification head: fedpeft must infer
        # "classification" and add a fresh head.
        BertForMaskedLM(BertConfig(vocab_size=tokenizer.vocab_size, **TINY)).save_pretrained(root / "bert")
        LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, num_key_value_heads=2, **TINY)).save_pretrained(
            root / "llama")
    tokenizer.save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "llama")

    rng = random.Random(0)
    rows = []
    for i in range(48):
        mood = rng.choice(["great", "awful", "fine"])
        rows.append({"review": f"an {mood} film, number {i}", "sentiment": mood, "user": f"user{i % 4}"})
    with open(root / "reviews.csv", "w") as fh:
        fh.write("review,sentiment,user\n")
        fh.writelines(f'"{r["review"]}",{r["sentiment"]},{r["user"]}\n' for r in rows)
    with open(root / "alpaca.jsonl", "w") as fh:
        for i in range(40):
            fh.write(json.dumps({"instruction": f"Add one to {i}.", "input": "" if i % 2 else "a number",
                                 "output": f"The answer is {i + 1}."}) + "\n")
    return root


def fedpeft(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "400", "NO_COLOR": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([*COMMAND, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    proc.stdout, proc.stderr = ANSI.sub("", proc.stdout), ANSI.sub("", proc.stderr)
    return proc


def write_config(path: Path, data: dict, model: dict, federation: dict | None = None) -> Path:
    """A TOML config: a tiny in-process federation with the given [data] and [model] keys."""
    tables = {
        "federation": {"num_clients": 2, "num_rounds": 2, "engine": "inprocess", "threads": 1, "name": "own",
                       **(federation or {})},
        "data": data,
        "model": model,
        "train": {"local_steps": 3, "batch_size": 8, "eval_batch_size": 16},
    }
    lines = []
    for section, keys in tables.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def read_summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


# ---------------------------------------------------------------- federations through the CLI


def test_bert_folder_on_a_csv_with_natural_clients(assets, tmp_path):
    """Classification: string labels, one client per user, and adapter/ reproduces the reported metrics."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedpeft.validation import config_from_dict, data_columns
    from fedpeft.data import load_dataset
    from fedpeft.training import encode
    from fedpeft.training.loop import evaluate

    config = write_config(
        tmp_path / "own.toml",
        data={"dataset": str(assets / "reviews.csv"), "text_column": "review", "label_column": "sentiment",
              "client_column": "user", "partition": "natural"},
        model={"name": str(assets / "bert"), "max_length": 32},
        federation={"num_clients": 4},
    )
    out = tmp_path / "run"
    proc = fedpeft("run", "--config", str(config), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = read_summary(out)
    cfg = config_from_dict(summary["config"])
    # The architecture's defaults, from peft's own mapping; the head is the new
    # classifier plus the pooler, which a masked-LM checkpoint lacks.
    assert cfg.peft.target_modules == ["query", "value"]
    assert cfg.peft.modules_to_save == ["classifier", "bert.pooler.dense"]
    assert {"final_accuracy", "final_loss"} <= summary.keys()
    assert 0.0 <= summary["final_accuracy"] <= 1.0 and np.isfinite(summary["final_loss"])

    data = load_dataset(cfg.data.dataset, test_fraction=cfg.data.test_fraction, columns=data_columns(cfg),
                        task="classification")
    assert data.label_names == ("awful", "fine", "great")  # sorted: the documented label order
    base = AutoModelForSequenceClassification.from_pretrained(assets / "bert", num_labels=3)
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    test = encode(data.test_texts, data.test_labels, _tokenizer(assets / "bert"), cfg.model.max_length)
    result = evaluate(model, test, task="classification", batch_size=16)
    assert result["accuracy"] == pytest.approx(summary["final_accuracy"], abs=1e-9)
    assert result["loss"] == pytest.approx(summary["final_loss"], rel=1e-5)


def test_llama_folder_on_alpaca_jsonl(assets, tmp_path):
    """Causal LM: the task is inferred, the loss counts response tokens only, and adapter/ gives the same loss."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedpeft.validation import config_from_dict, data_columns
    from fedpeft.data import load_dataset
    from fedpeft.training import encode
    from fedpeft.training.loop import evaluate

    config = write_config(
        tmp_path / "alpaca.toml",
        data={"dataset": str(assets / "alpaca.jsonl"), "prompt_template": "alpaca", "response_column": "output",
              "partition": "iid"},
        model={"name": str(assets / "llama"), "max_length": 96},
        federation={"num_rounds": 1},
    )
    out = tmp_path / "run"
    proc = fedpeft("run", "--config", str(config), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = read_summary(out)
    cfg = config_from_dict(summary["config"])
    assert cfg.peft.target_modules == ["q_proj", "v_proj"] and cfg.peft.modules_to_save == []
    assert {"final_accuracy", "final_loss"} <= summary.keys() and np.isfinite(summary["final_loss"])

    data = load_dataset(cfg.data.dataset, test_fraction=cfg.data.test_fraction, columns=data_columns(cfg),
                        task="causal_lm")
    tokenizer = _tokenizer(assets / "llama")
    test = encode(data.test_texts, data.test_labels, tokenizer, cfg.model.max_length, data.test_response_starts)
    batch = test.batch(np.arange(len(test)), "causal_lm")
    for row, text in enumerate(data.test_texts):
        counted = batch["labels"][row][batch["labels"][row] != -100]
        response = text[data.test_response_starts[row]:]
        assert tokenizer.decode(counted, skip_special_tokens=True) == tokenizer.decode(
            tokenizer(response, add_special_tokens=False)["input_ids"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets / "llama"), out / "adapter").eval()
    result = evaluate(model, test, task="causal_lm", batch_size=16)
    assert result["loss"] == pytest.approx(summary["final_loss"], rel=1e-5)
    assert result["accuracy"] == pytest.approx(summary["final_accuracy"], abs=1e-9)


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------- user errors: one line, exit 2, nothing written


def test_bert_folder_takes_mean_pooling_and_a_llama_folder_says_it_cannot(assets, assert_user_error, tmp_path,
                                                                           fedpeft_cli_in_process):
    """model.pooling = "mean" on a BERT folder: the pooler becomes the masked mean (no pooler weights
    train, padding does not change a text's logits); on a Llama folder it is one clear line."""
    from fedpeft.models.pooling import MeanPooler
    from fedpeft.runtime import runtime
    from fedpeft.validation import load_config

    cfg = load_config(None, [f"data.dataset={assets / 'reviews.csv'}", "data.text_column=review",
                             "data.label_column=sentiment", f"model.name={assets / 'bert'}", 'model.pooling="mean"',
                             "model.max_length=32", "federation.num_clients=2"])
    assert cfg.peft.modules_to_save == ["classifier"]
    rt = runtime(cfg)
    assert isinstance(rt.model.model.base_model.model.bert.pooler, MeanPooler)
    tok = rt.model.tokenizer
    with torch.inference_mode():
        alone = tok(["a fine film"], return_tensors="pt")
        padded = tok(["a fine film", "an awful film that nobody should ever watch again"], return_tensors="pt",
                     padding=True)
        assert padded["attention_mask"][0].sum() < padded["attention_mask"].shape[1]  # the short text is padded
        a = rt.model.model(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"]).logits[0]
        b = rt.model.model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    proc = fedpeft_cli_in_process("run", "--set", f"data.dataset={assets / 'reviews.csv'}", "--set",
                                  "data.text_column=review", "--set", "data.label_column=sentiment", "--set",
                                  f"model.name={assets / 'llama'}", "--set", "model.task=classification", "--set",
                                  'model.pooling="mean"', "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert_user_error(proc, "model.pooling = 'mean' is not available", "choose one of: cls")
    assert not (tmp_path / "run").exists()


def test_wrong_column_is_one_line_naming_the_columns(assets, tmp_path, assert_user_error, fedpeft_cli_in_process):
    out = tmp_path / "run"
    proc = fedpeft_cli_in_process("run", "--set", f"data.dataset={assets / 'reviews.csv'}", "--set",
                                  "data.text_column=review", "--set", "data.label_column=stars", "--set",
                                  f"model.name={assets / 'bert'}", "--out", str(out), cwd=tmp_path)
    assert_user_error(proc, "data.label_column", "'stars'", "review, sentiment, user")
    assert not out.exists()


@pytest.mark.parametrize("breakage, named", [
    pytest.param("no-config", ["model.name", "no config.json"], id="no-config"),
    pytest.param("broken-weights", ["model.name", "cannot read the weights", "model.safetensors"], id="broken-weights"),
    pytest.param("unknown-architecture", ["model.name", "cannot read its config.json"], id="unknown-architecture"),
    pytest.param("no-tokenizer", ["model.name", "no tokenizer files", "tokenizer.save_pretrained"], id="no-tokenizer"),
])
def test_unloadable_model_folder_is_one_line(assets, tmp_path, breakage, named, assert_user_error,
                                             fedpeft_cli_in_process):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(assets / "bert", folder)
    if breakage == "no-config":
        (folder / "config.json").unlink()
    elif breakage == "broken-weights":
        (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    elif breakage == "no-tokenizer":
        for file in ("tokenizer.json", "tokenizer_config.json"):
            (folder / file).unlink()
    else:
        config = json.loads((folder / "config.json").read_text())
        config["model_type"] = "no-such-architecture"
        (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    proc = fedpeft_cli_in_process("run", "--set", f"model.name={folder}", "--out", str(out), cwd=tmp_path)
    assert_user_error(proc, *named)
    assert not out.exists()


# ---------------------------------------------------------------- the loaders, without a federation


def test_task_is_inferred_or_asked_for(assets, tmp_path):
    from transformers import GPT2Config

    from fedpeft.errors import ConfigError
    from fedpeft.models import get_model_spec

    assert get_model_spec(str(assets / "bert")).task == "classification"
    assert get_model_spec(str(assets / "llama")).task == "causal_lm"
    assert get_model_spec(str(assets / "llama"), "classification").head_modules == ("score",)
    # GPT-2 saved without architectures could be either: the error says what to set.
    folder = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=16, n_head=2, architectures=None).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes((assets / "llama" / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match=r"model\.task.*'classification' or 'causal_lm'"):
        get_model_spec(str(folder))
    with pytest.raises(ConfigError, match=r"model\.task = 'causal_lm' does not fit model 'minilm'"):
        get_model_spec("minilm", "causal_lm")


def test_architecture_without_a_peft_default_asks_for_target_modules(assets, tmp_path):
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    from fedpeft.validation import load_config
    from fedpeft.errors import ConfigError

    folder = tmp_path / "distilbert"
    tokenizer = AutoTokenizer.from_pretrained(assets / "bert")
    DistilBertForSequenceClassification(DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=16, n_layers=1, n_heads=2,
                                                         hidden_dim=32)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(ConfigError, match=r"peft\.target_modules.*'distilbert'"):
        load_config(None, [f"model.name={folder}"])
    cfg = load_config(None, [f"model.name={folder}", 'peft.target_modules=["q_lin", "v_lin"]'])
    assert cfg.peft.modules_to_save == ["classifier"]


def test_labels_map_to_sorted_ids_in_every_format(tmp_path):
    """Integer and string labels from CSV, Parquet and a saved DatasetDict (whose ClassLabel order is kept)."""
    import datasets

    from fedpeft.data import DataColumns, load_dataset

    labels = [10, 2, 3] * 10
    frame = {"text": [f"row {i}" for i in range(30)], "label": labels}
    datasets.Dataset.from_dict(frame).to_parquet(str(tmp_path / "ints.parquet"))
    data = load_dataset(str(tmp_path / "ints.parquet"), test_fraction=0.2)
    assert data.label_names == ("2", "3", "10")  # numeric order, not "10" < "2"
    by_text = dict(zip(data.train_texts + data.test_texts, np.concatenate([data.train_labels, data.test_labels])))
    assert all(by_text[f"row {i}"] == ("2", "3", "10").index(str(labels[i])) for i in range(30))
    assert len(data.test_texts) == 6 and sorted(np.bincount(data.test_labels)) == [2, 2, 2]  # stratified

    features = datasets.Features({"sentence": datasets.Value("string"), "y": datasets.ClassLabel(names=["pos", "neg"])})
    split = {"sentence": [f"s{i}" for i in range(12)], "y": [i % 2 for i in range(12)]}
    saved = datasets.DatasetDict({"train": datasets.Dataset.from_dict(split, features=features),
                                  "test": datasets.Dataset.from_dict(split, features=features).select(range(4))})
    saved.save_to_disk(str(tmp_path / "saved"))
    data = load_dataset(str(tmp_path / "saved"), columns=DataColumns(text="sentence", label="y"))
    assert data.label_names == ("pos", "neg")  # the ClassLabel's own order, not the sorted one
    assert len(data.train_texts) == 12 and data.test_texts == ("s0", "s1", "s2", "s3")  # its own test split


def test_natural_partition_gives_each_client_one_user(assets):
    from fedpeft.data import DataColumns, load_dataset, partition_indices

    data = load_dataset(str(assets / "reviews.csv"), columns=DataColumns(text="review", label="sentiment",
                                                                          client="user"))
    parts = partition_indices(data, "natural", 4)
    users = [sorted({data.train_groups[i] for i in part}) for part in parts]
    assert users == [[0], [1], [2], [3]]
    assert sorted(np.concatenate(parts)) == list(range(len(data.train_texts)))


def test_prompt_template_marks_where_the_response_starts(assets):
    from fedpeft.data import DataColumns, load_dataset
    from fedpeft.errors import ConfigError

    columns = DataColumns(prompt_template="Q: {instruction} ({input})\nA: ", response="output")
    data = load_dataset(str(assets / "alpaca.jsonl"), columns=columns, task="causal_lm")
    for text, start in zip(data.train_texts, data.train_response_starts):
        assert text.startswith("Q: Add one to ") and text[:start].endswith(")\nA: ")
        assert text[start:].startswith("The answer is ")
    assert data.label_names == ("text",) and not data.train_labels.any()
    with pytest.raises(ConfigError, match=r"uses column 'question': no such column .*instruction, input, output"):
        load_dataset(str(assets / "alpaca.jsonl"), columns=DataColumns(prompt_template="{question}"), task="causal_lm")


def test_audit_runs_on_a_model_folder_and_a_dataset_file(assets, tmp_path):
    """`fedpeft audit` on the BERT folder and the CSV: at batch 1 the head's gradient gives the label
    exactly and inverts the classifier's input, above the prior-only baselines."""
    out = tmp_path / "audit"
    proc = fedpeft("audit", "--set", f"data.dataset={assets / 'reviews.csv'}", "--set", "data.text_column=review",
                   "--set", "data.label_column=sentiment", "--set", f"model.name={assets / 'bert'}",
                   "--set", "audit.victims=4", "--set", "audit.studies=false", "--set", "audit.empirical=false",
                   "--set", 'audit.attacks=["label-recovery", "linear-inversion"]', "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "audit.json").read_text())
    assert report["settings"]["model"] == str(assets / "bert")
    main = next(e for e in report["experiments"] if e["name"] == "main")
    labels = main["attacks"]["label-recovery"]["metrics"]["label accuracy"]
    assert labels["attack"]["mean"] == 1.0 and labels["attack"]["n"] == 4
    head = main["attacks"]["linear-inversion"]["metrics"]["cosine classifier input"]
    assert head["attack"]["mean"] > 0.999 > head["baseline"]["mean"]
