"""Text data: sources, deterministic split, byte tokenizer, and batches as pure functions of (step, rank)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kubearch_trainer.config import load_config
from kubearch_trainer.data import DataError, Dataset, build_datasets
from kubearch_trainer.data.corpus import tiny_stories
from kubearch_trainer.data.text import ByteTokenizer, read_documents, split_documents

CPU = torch.device("cpu")


def cfg_for(path: Path | None = None, seq_len: int = 16, seed: int = 7, **data):
    d = {"seq_len": seq_len, **data}
    if path is not None:
        d["path"] = str(path)
    return load_config({"data": d, "training": {"seed": seed}})


def test_byte_tokenizer_round_trips_any_text() -> None:
    tok = ByteTokenizer()
    text = "héllo, wörld — 世界\n"
    ids = tok.encode(text)
    assert ids.dtype.name == "uint8" and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_generated_corpus_is_deterministic_ascii_and_sized() -> None:
    a, b = tiny_stories(50_000, seed=0), tiny_stories(50_000, seed=0)
    assert a == b and len(a) >= 50_000 and a.isascii()
    assert tiny_stories(50_000, seed=1) != a
    # A story keeps its character: the name of the opening reappears in the story.
    first = a.split("\n\n")[0]
    name = (
        first.split("named ")[-1].split(".")[0] if "named " in first else first.split("called ")[1].split()[0]
    )
    assert first.count(name) >= 3


def test_document_split_is_deterministic_and_order_independent() -> None:
    docs = [f"document number {i} " * 5 for i in range(200)]
    train1, val1 = split_documents(docs, 0.2)
    train2, val2 = split_documents(list(reversed(docs)), 0.2)
    assert set(val1.split("\n\n")) == set(val2.split("\n\n")) and set(train1.split("\n\n")) == set(
        train2.split("\n\n")
    )
    n_val = len(val1.split("\n\n"))
    assert 20 <= n_val <= 60  # ~20 % of 200, by hash
    assert not set(val1.split("\n\n")) & set(train1.split("\n\n"))


def test_single_document_holds_out_the_tail() -> None:
    train, val = split_documents(["abcdefghij" * 10], 0.1)
    assert train + val == "abcdefghij" * 10 and len(val) == 10


def test_sources_file_folder_jsonl(tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("hello world\n" * 50)
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bee " * 40)
    (folder / "sub" / "a.md").write_text("ay " * 40)
    (folder / "ignored.bin").write_bytes(b"\x00\x01")
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"line {i} " * 10, "id": i}) for i in range(30)) + "\n")

    assert read_documents(tmp_path / "one.txt") == ["hello world\n" * 50]
    assert read_documents(folder) == ["bee " * 40, "ay " * 40]  # sorted paths: b.txt < sub/a.md
    docs = read_documents(jsonl)
    assert len(docs) == 30 and docs[3] == "line 3 " * 10
    with pytest.raises(DataError, match=r"data.jsonl_field.*'body'"):
        read_documents(jsonl, jsonl_field="body")
    with pytest.raises(DataError, match=r"data.path.*does not exist"):
        read_documents(tmp_path / "missing.txt")

    ds = build_datasets(cfg_for(jsonl, seq_len=8), "lm")
    assert isinstance(ds, Dataset) and ds.task == "lm" and ds.tokens_per_sample == 8
    batch = ds.get_batch(0, 0, 0, 1, 4, CPU)
    text = "".join(ByteTokenizer().decode(row) for row in batch["input_ids"])
    assert "line" in text or "ine " in text


def test_too_little_text_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(DataError, match="seq_len"):
        build_datasets(cfg_for(tmp_path / "short.txt", seq_len=16), "lm")


def test_batches_are_pure_functions_of_step_micro_rank() -> None:
    ds = build_datasets(cfg_for(seq_len=16), "lm")
    b1 = ds.get_batch(3, 1, 0, 1, 8, CPU)
    b2 = ds.get_batch(3, 1, 0, 1, 8, CPU)
    assert torch.equal(b1["input_ids"], b2["input_ids"])
    assert b1["input_ids"].shape == (8, 16) and b1["input_ids"].dtype == torch.long
    # targets are inputs shifted by one token
    assert torch.equal(b1["input_ids"][:, 1:], b1["targets"][:, :-1])
    assert not torch.equal(b1["input_ids"], ds.get_batch(4, 1, 0, 1, 8, CPU)["input_ids"])
    assert not torch.equal(b1["input_ids"], ds.get_batch(3, 0, 0, 1, 8, CPU)["input_ids"])
    # The ranks' shards tile the one-process batch of the same global size exactly.
    r0, r1 = ds.get_batch(3, 1, 0, 2, 4, CPU), ds.get_batch(3, 1, 1, 2, 4, CPU)
    assert not torch.equal(r0["input_ids"], r1["input_ids"])
    assert torch.equal(torch.cat([r0["input_ids"], r1["input_ids"]]), b1["input_ids"])
    # Another seed draws other windows.
    other = build_datasets(cfg_for(seq_len=16, seed=8), "lm").get_batch(3, 1, 0, 1, 8, CPU)
    assert not torch.equal(other["input_ids"], b1["input_ids"])


def test_eval_batches_are_fixed_and_from_the_validation_split() -> None:
    ds = build_datasets(cfg_for(seq_len=16), "lm")
    e1, e2 = ds.eval_batches(3, 4, CPU), ds.eval_batches(3, 4, CPU)
    assert len(e1) == 3 and all(
        torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(e1, e2, strict=True)
    )
    val_text = ByteTokenizer().decode(ds.val)
    window = ByteTokenizer().decode(e1[1]["input_ids"][2])
    assert window in val_text
    # Same evaluation windows whatever the training seed: comparisons score the same text.
    other = build_datasets(cfg_for(seq_len=16, seed=99), "lm").eval_batches(3, 4, CPU)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(e1, other, strict=True))


def test_unknown_task_or_dataset_name_is_refused() -> None:
    with pytest.raises(DataError, match="not one of lm"):
        build_datasets(cfg_for(), "speech")
    with pytest.raises(DataError, match=r"data.dataset.*tiny_stories"):
        build_datasets(cfg_for(dataset="wikipedia"), "lm")
