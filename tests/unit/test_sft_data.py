"""Instruction/chat data: schemas, targets, bad rows, the tokenized store, best-fit rows and micro-batches."""

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

from moesaic.train.packing import IGNORE, RowStream, best_fit, collate  # noqa: E402
from moesaic.train.sft_data import (Tokenizing, check_same_data, data_files, file_signature,  # noqa: E402
                                    is_dataset_path, prepare)
from support.hf_models import tiny_tokenizer  # noqa: E402

CHAT = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"add {i} and 1"},
                      {"role": "assistant", "content": f"{i + 1}"}, {"role": "user", "content": "twice?"},
                      {"role": "assistant", "content": f"{2 * i + 2}"}]} for i in range(40)]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(["add and twice be brief the answer is 0123456789 system user assistant"] * 5, 300)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_messages_train_on_assistant_turns_only(tok, tmp_path):
    t = Tokenizing(tok, block_size=64)
    ids, targets = t.document(CHAT[3], "messages")
    assert tok.decode(ids) == tok.apply_chat_template(CHAT[3]["messages"], tokenize=False)
    learned = tok.decode([i for i, m in zip(ids, targets) if m])
    assert learned == "4<|im_end|>\n8<|im_end|>\n"  # the two answers and their end-of-turn, nothing else
    ids_all, targets_all = Tokenizing(tok, block_size=64, train_on="all").document(CHAT[3], "messages")
    assert ids_all == ids and all(targets_all)


def test_prompt_completion_and_text(tok):
    t = Tokenizing(tok, block_size=64)
    ids, targets = t.document({"prompt": "add 2 and 1 ", "completion": "the answer is 3"}, "prompt_completion")
    # " the": the token holds the completion's first character
    assert tok.decode([i for i, m in zip(ids, targets) if m]) == " the answer is 3<|endoftext|>"
    ids, targets = t.document({"text": "add 2 and 1"}, "text")
    assert all(targets) and ids[-1] == tok.eos_token_id


def test_store_splits_counts_bad_rows_and_stops_past_the_fraction(tok, tmp_path):
    rows = CHAT + [{"messages": [{"role": "user", "content": "no answer"}]},  # row 41: no assistant turn
                   {"messages": "not a list"},  # row 42
                   {"messages": [{"role": "assistant", "content": "9 " * 150}]}]  # row 43: too long
    data = _jsonl(tmp_path / "chat.jsonl", rows)
    assert is_dataset_path(data) and is_dataset_path(tmp_path) and not is_dataset_path(tmp_path / "none.txt")
    t = Tokenizing(tok, block_size=96)
    with pytest.raises(ValueError, match=r"3 of \d+ rows of the train split are bad.*chat.jsonl row 41: no assistant "
                                         r"turn; chat.jsonl row 42: messages must be.*row 43: \d+ tokens, more than"):
        prepare(data, tmp_path / "cache", t, val_percent=10)
    train, val = prepare(data, tmp_path / "cache", t, val_percent=10, max_bad_fraction=0.2)
    assert train.report.bad == 3 and len(train) + len(val) == 40 and len(val) > 0
    assert train.report.rows + val.report.rows == 43
    ids, targets = train.document(0)
    assert len(ids) == train.lengths[0] and train.doc_targets[0] == targets[1:].sum() > 0
    # a separate validation file; the same store is reused for the same files and settings
    val_file = _jsonl(tmp_path / "val" / "v.jsonl" if (tmp_path / "val").mkdir() is None else None, CHAT[:5])
    train2, val2 = prepare(data, tmp_path / "cache", t, val_path=val_file, max_bad_fraction=0.2)
    assert len(val2) == 5 and len(train2) == 40


def test_no_schema_no_template_empty_and_changed_data_are_refused(tok, tmp_path):
    t = Tokenizing(tok, block_size=96)
    odd = _jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"fields \['answer', 'question'\]; accepted schemas are text: text; "
                                         r"prompt_completion: prompt \+ completion; messages: messages"):
        prepare(odd, tmp_path / "c1", t)
    bare = tiny_tokenizer(["add"], 270, chat_template=None)
    chat = _jsonl(tmp_path / "chat.jsonl", CHAT)
    with pytest.raises(ValueError, match="no chat template; add one to the model folder"):
        prepare(chat, tmp_path / "c2", Tokenizing(bare, block_size=96))
    (tmp_path / "e").mkdir()
    empty = _jsonl(tmp_path / "e" / "empty.jsonl", CHAT[:1])
    with pytest.raises(ValueError, match="the val split .* is empty"):
        prepare(empty, tmp_path / "c3", t, val_percent=1)
    before = file_signature(data_files(chat))
    _jsonl(chat, CHAT[:-1])
    with pytest.raises(ValueError, match="chat.jsonl"):
        check_same_data(before, file_signature(data_files(chat)))


def test_parquet_and_saved_dataset_folders(tok, tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": f"add {i} ", "completion": f"the answer is {i}"} for i in range(30)])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    t = Tokenizing(tok, block_size=96)
    a = prepare(tmp_path / "d.parquet", tmp_path / "c1", t, val_percent=20)
    b = prepare(tmp_path / "saved", tmp_path / "c2", t, val_percent=20)
    assert len(a[0]) + len(a[1]) == 30 and len(b[0]) + len(b[1]) == 30


def test_best_fit_fills_rows_and_the_stream_is_the_same_on_resume():
    lengths = np.array([7, 3, 5, 2, 8, 1, 4, 6, 6, 2])
    rows = best_fit(range(10), lengths, 10)
    assert sorted(d for r in rows for d in r) == list(range(10))
    assert all(sum(lengths[d] for d in r) <= 10 for r in rows)
    assert rows[0] == [0, 1] and len(rows) == 5  # 44 tokens in 5 rows of 10
    a, b = RowStream(lengths, 10, seed=3), RowStream(lengths, 10, seed=3)
    assert a.rows(0, 13) == b.rows(0, 13)  # across epochs
    assert RowStream(lengths, 10, seed=3).rows(7, 6) == a.rows(7, 6)  # a fresh stream (a resume) from row 7
    assert all(len(r) == 1 for r in RowStream(lengths, 10, seed=3, packing=False).rows(0, 10))
    with pytest.raises(ValueError, match="packing needs 1..block_size=10"):
        best_fit([0], np.array([11]), 10)


def test_collate_labels_never_cross_documents():
    class Store:
        lengths = np.array([3, 2])

        def document(self, i):
            return [(np.array([1, 2, 3]), np.array([0, 1, 1])), (np.array([4, 5]), np.array([1, 1]))][i]

    b = collate(Store(), [[0, 1], [1]])
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [4, 5, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert b["shift_labels"].tolist() == [[2, 3, IGNORE, 5, IGNORE], [5, IGNORE, IGNORE, IGNORE, IGNORE]]
    assert b["token_mask"].tolist() == [[True] * 5, [True, True, False, False, False]]
    assert b["targets"] == 4 and torch.is_tensor(b["input_ids"])
