"""Instruction and chat data for ``moesaic train --hf``: files read through ``datasets``, tokenized once to disk.

``data.path`` may be a ``.jsonl`` / ``.json`` / ``.parquet`` file, a folder of them, or a folder
written by ``datasets``' ``save_to_disk``. Files are streamed (``load_dataset(..., streaming=True)``)
and saved datasets memory-mapped, so no file is ever held in memory. Each row is one document in one
of three schemas, detected from the first row of each file:

* ``text``: plain language modelling; every token is a target;
* ``prompt`` + ``completion``: the completion (and the end-of-text token after it) are the targets;
* ``messages``: a list of ``{role, content}`` rendered with the tokenizer's own chat template;
  the assistant turns are the targets.

``data.train_on = "all"`` makes every token a target. Targets are found on the text, not the
tokens: the template renders the conversation up to each assistant turn with
``add_generation_prompt=True`` and then with the turn, the turn is the characters between, and a
token is a target when it holds a character of one (``return_offsets_mapping``; a token straddling
the prompt's end is one the model must produce). This needs a
template under which a conversation grows by appending (every template we know of); a row where it
does not is a bad row.

A bad row (a missing field, a role the template rejects, more tokens than ``model.block_size`` with
``data.truncate`` off, no target token) is counted, its file and row number kept, and never silently
dropped: the report names the count and the first rows, and a split whose bad rows exceed
``data.max_bad_fraction`` stops the run.

The result is a :class:`TokenStore` on disk (flat int32 tokens, a uint8 target mask, int64 offsets),
read back memory-mapped by every rank. The validation split is ``data.val_path`` or else the rows
whose ``crc32(file name, row)`` falls under ``data.val_percent``.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SCHEMAS = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "messages": ("messages",)}
FIRST_BAD_SHOWN = 5


def is_dataset_path(path) -> bool:
    """Whether ``data.path`` names instruction/chat data (a data file, a folder of them, a saved dataset)."""
    if path is None:
        return False
    p = Path(path)
    if p.is_file():
        return p.suffix in DATA_SUFFIXES
    if p.is_dir():
        return _is_saved_dataset(p) or any(f.suffix in DATA_SUFFIXES for f in p.rglob("*") if f.is_file())
    return False


def _is_saved_dataset(p: Path) -> bool:
    return (p / "dataset_info.json").exists() and (p / "state.json").exists()


def data_files(path) -> List[Path]:
    """The files of ``path`` in a fixed order (a saved dataset: its arrow files and state)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data.path {str(p)!r} does not exist")
    if p.is_file():
        if p.suffix not in DATA_SUFFIXES:
            raise ValueError(f"data.path {str(p)!r}: expected a {'/'.join(DATA_SUFFIXES)} file")
        return [p]
    if _is_saved_dataset(p):
        return sorted(f for f in p.iterdir() if f.is_file())
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in DATA_SUFFIXES)
    if not files:
        raise ValueError(f"data.path {str(p)!r} holds no {'/'.join(DATA_SUFFIXES)} file and is not a saved dataset")
    return files


def file_signature(files: Sequence[Path]) -> Dict[str, str]:
    """``{path: sha256}`` of every file (read in 1 MiB pieces): a resume refuses data that changed."""
    out = {}
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for piece in iter(lambda: fh.read(1 << 20), b""):
                h.update(piece)
        out[str(f)] = h.hexdigest()
    return out


def check_same_data(saved: Dict[str, str], now: Dict[str, str]) -> None:
    """Refuse to resume on data files that differ from the run's (naming them)."""
    changed = sorted(set(saved) ^ set(now)) + sorted(k for k in set(saved) & set(now) if saved[k] != now[k])
    if changed:
        raise ValueError(f"the data changed since the run started: {', '.join(changed)} "
                         f"({'added, removed or ' if set(saved) != set(now) else ''}modified); a resume needs the same "
                         "data to see the same rows: restore it or start a new run (another --out)")


# --- reading rows -------------------------------------------------------------------------------------

def _rows(path: Path) -> Iterator[Tuple[str, int, dict]]:
    """``(file name, row number from 1, row)`` for every row under ``path``."""
    import datasets

    p = Path(path)
    if p.is_dir() and _is_saved_dataset(p):
        ds = datasets.load_from_disk(str(p))  # memory-mapped arrow
        if isinstance(ds, datasets.DatasetDict):
            raise ValueError(f"{p} is a DatasetDict with splits {list(ds)}; point data.path at one split's folder")
        for i, row in enumerate(ds):
            yield p.name, i + 1, row
        return
    for f in data_files(p):
        ds = datasets.load_dataset(DATA_SUFFIXES[f.suffix], data_files=[str(f)], split="train", streaming=True)
        for i, row in enumerate(ds):
            yield f.name, i + 1, row


def detect_schema(row: dict, where: str) -> str:
    """The schema of a row (by its fields); a ValueError listing the fields found and the schemas accepted."""
    for name in ("messages", "prompt_completion", "text"):
        if all(k in row for k in SCHEMAS[name]):
            return name
    accepted = "; ".join(f"{n}: {' + '.join(fields)}" for n, fields in SCHEMAS.items())
    raise ValueError(f"{where}: no known schema: the rows have the fields {sorted(row)}; accepted schemas are "
                     f"{accepted} (messages: a list of {{role, content}})")


# --- tokenizing -------------------------------------------------------------------------------------

class BadRow(ValueError):
    """A row that cannot be trained on (the reason is the message)."""


@dataclass
class Tokenizing:
    """How rows become tokens and targets."""

    tokenizer: object
    block_size: int
    train_on: str = "answers"  # or "all"
    truncate: bool = False

    def __post_init__(self) -> None:
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("the tokenizer must be a fast tokenizer (tokenizer.json): targets are found with "
                             "return_offsets_mapping")

    def document(self, row: dict, schema: str) -> Tuple[List[int], List[int]]:
        """``(token ids, target mask)`` of one row (raises :class:`BadRow`)."""
        eos = self.tokenizer.eos_token_id
        if schema == "text":
            text = _string(row, "text")
            ids, targets = self._tokenize(text, [(0, len(text))], special=True)
            if eos is not None and (not ids or ids[-1] != eos):
                ids, targets = ids + [eos], targets + [1]
        elif schema == "prompt_completion":
            prompt, completion = _string(row, "prompt"), _string(row, "completion")
            if not completion:
                raise BadRow("empty completion")
            ids, targets = self._tokenize(prompt + completion, [(len(prompt), len(prompt) + len(completion))],
                                          special=True)
            if eos is not None:
                ids, targets = ids + [eos], targets + [1]
        else:
            text, spans = self._render(row.get("messages"))
            ids, targets = self._tokenize(text, spans, special=False)
        if self.train_on == "all":
            targets = [1] * len(ids)
        if len(ids) > self.block_size:
            if not self.truncate:
                raise BadRow(f"{len(ids)} tokens, more than model.block_size={self.block_size} (data.truncate=true "
                             "cuts such rows)")
            ids, targets = ids[:self.block_size], targets[:self.block_size]
        if not any(targets[1:]):
            raise BadRow("no target token (nothing to learn from)")
        return ids, targets

    def _tokenize(self, text: str, spans, special: bool) -> Tuple[List[int], List[int]]:
        enc = self.tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        targets = []
        for start, end in enc["offset_mapping"]:
            inside = end > start and any(start < hi and end > lo for lo, hi in spans)  # holds a target character
            targets.append(1 if inside else 0)
        return list(enc["input_ids"]), targets

    def _render(self, messages) -> Tuple[str, List[Tuple[int, int]]]:
        if not isinstance(messages, list) or not messages:
            raise BadRow("messages must be a non-empty list of {role, content}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise BadRow(f"message {i} must be {{'role': str, 'content': str}}, got {m!r:.80}")
        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        if not any(m["role"] == "assistant" for m in msgs):
            raise BadRow("no assistant turn")
        render = self.tokenizer.apply_chat_template
        try:
            text = render(msgs, tokenize=False)
            spans = []
            for i, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                before = render(msgs[:i], tokenize=False, add_generation_prompt=True) if i else ""
                upto = render(msgs[:i + 1], tokenize=False)
                if not upto.startswith(before) or not text.startswith(upto):
                    raise BadRow("the chat template does not render this conversation by appending turns, so the "
                                 f"assistant turn {i} cannot be located")
                spans.append((len(before), len(upto)))
        except BadRow:
            raise
        except Exception as e:  # jinja's TemplateError (e.g. "roles must alternate") and the like
            raise BadRow(f"the chat template rejects it: {e}") from None
        return text, spans


def _string(row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise BadRow(f"field {key!r} is {'missing' if value is None else type(value).__name__}, not a string")
    return value


# --- the tokenized store ------------------------------------------------------------------------

@dataclass
class SplitReport:
    """Rows read, documents kept, bad rows (count and the first few ``file:row: reason``) of one split."""

    name: str
    rows: int = 0
    documents: int = 0
    tokens: int = 0
    targets: int = 0
    bad: int = 0
    first_bad: List[str] = field(default_factory=list)

    @property
    def bad_fraction(self) -> float:
        return self.bad / self.rows if self.rows else 0.0

    def line(self) -> str:
        text = (f"{self.name}: {self.documents} documents, {self.tokens} tokens, {self.targets} targets; "
                f"{self.bad} bad rows of {self.rows}")
        return text + (f" (first: {'; '.join(self.first_bad)})" if self.bad else "")


class TokenStore:
    """The documents of one split on disk: ``tokens`` (int32), ``targets`` (uint8), ``offsets`` (int64, N+1).

    ``targets[i]`` is 1 where token i is to be predicted (from token i-1). Opened memory-mapped.
    """

    def __init__(self, folder) -> None:
        folder = Path(folder)
        self.folder = folder
        self.offsets = np.load(folder / "offsets.npy", mmap_mode="r")
        self.tokens = np.load(folder / "tokens.npy", mmap_mode="r")
        self.targets = np.load(folder / "targets.npy", mmap_mode="r")
        self.report = SplitReport(**json.loads((folder / "report.json").read_text()))
        self.lengths = np.diff(np.asarray(self.offsets)).astype(np.int64)
        # targets of a document, not counting its first token (it has no predecessor in the document)
        first = np.asarray(self.offsets[:-1])
        cum = np.concatenate([[0], np.cumsum(np.asarray(self.targets, dtype=np.int64))])
        self.doc_targets = cum[np.asarray(self.offsets[1:])] - cum[first] - np.asarray(self.targets)[first]

    def __len__(self) -> int:
        return len(self.lengths)

    def document(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return np.asarray(self.tokens[lo:hi]), np.asarray(self.targets[lo:hi])


class _Writer:
    def __init__(self, folder: Path, name: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.report = folder, SplitReport(name)
        self.tok = open(folder / "tokens.bin", "wb")
        self.tgt = open(folder / "targets.bin", "wb")
        self.offsets = [0]

    def add(self, ids: List[int], targets: List[int]) -> None:
        self.tok.write(np.asarray(ids, dtype=np.int32).tobytes())
        self.tgt.write(np.asarray(targets, dtype=np.uint8).tobytes())
        self.offsets.append(self.offsets[-1] + len(ids))
        self.report.documents += 1
        self.report.tokens += len(ids)
        self.report.targets += sum(targets[1:])

    def bad(self, where: str, reason: str) -> None:
        self.report.bad += 1
        if len(self.report.first_bad) < FIRST_BAD_SHOWN:
            self.report.first_bad.append(f"{where}: {reason}")

    def close(self) -> None:
        self.tok.close()
        self.tgt.close()
        n = self.offsets[-1]
        for name, dtype in (("tokens", np.int32), ("targets", np.uint8)):
            raw = np.fromfile(self.folder / f"{name}.bin", dtype=dtype, count=n) if n else np.zeros(0, dtype)
            np.save(self.folder / f"{name}.npy", raw)  # (a few bytes per token; .npy for memory-mapped reads)
            os.remove(self.folder / f"{name}.bin")
        np.save(self.folder / "offsets.npy", np.asarray(self.offsets, dtype=np.int64))
        (self.folder / "report.json").write_text(json.dumps(self.report.__dict__))


def tokenize_to_disk(path, out: Path, tok: Tokenizing, val_path=None, val_percent: int = 5) -> None:
    """Read every row of ``path`` (and ``val_path``), tokenize, and write ``out/train`` and ``out/val`` stores.

    Raises:
        ValueError: a file whose rows match no schema (naming its fields and the schemas accepted);
            a ``messages`` file and a tokenizer without a chat template.
    """
    writers = {name: _Writer(out / name, name) for name in ("train", "val")}
    sources = [(path, None)] + ([(val_path, "val")] if val_path is not None else [])
    for source, fixed in sources:
        schema_of: Dict[str, str] = {}
        for fname, row_no, row in _rows(Path(source)):
            if fname not in schema_of:
                schema_of[fname] = detect_schema(row, f"{source} ({fname})")
                if schema_of[fname] == "messages" and not getattr(tok.tokenizer, "chat_template", None):
                    raise ValueError(f"{fname} holds chat messages but the model's tokenizer has no chat template; "
                                     "add one to the model folder (a 'chat_template' entry in tokenizer_config.json "
                                     "or a chat_template.jinja file, e.g. the template of the model's instruct "
                                     "release) or convert the data to prompt/completion")
            split = fixed or ("val" if zlib.crc32(f"{fname}:{row_no}".encode()) % 100 < val_percent and
                              val_path is None else "train")
            w = writers[split]
            w.report.rows += 1
            try:
                w.add(*tok.document(row, schema_of[fname]))
            except BadRow as e:
                w.bad(f"{fname} row {row_no}", str(e))
    for w in writers.values():
        w.close()


def prepare(path, out: Path, tok: Tokenizing, val_path=None, val_percent: int = 5,
            max_bad_fraction: float = 0.01,
            signature: Optional[Dict[str, str]] = None) -> Tuple[TokenStore, TokenStore]:
    """Tokenize (if not done for these files and settings) and open both splits; check bad rows and emptiness.

    ``signature``: the files' :func:`file_signature` if the caller has it (else computed here).
    """
    if signature is None:
        signature = file_signature(data_files(path) + (data_files(val_path) if val_path is not None else []))
    key = json.dumps({"files": signature, "block_size": tok.block_size, "train_on": tok.train_on,
                      "truncate": tok.truncate, "val_path": str(val_path), "val_percent": val_percent,
                      "tokenizer": hashlib.sha256(json.dumps(tok.tokenizer.get_vocab(), sort_keys=True).encode()
                                                  + str(getattr(tok.tokenizer, "chat_template", "")).encode())
                      .hexdigest()}, sort_keys=True)
    folder = out / hashlib.sha256(key.encode()).hexdigest()[:16]
    if not (folder / "done").exists():
        tokenize_to_disk(path, folder, tok, val_path, val_percent)
        (folder / "done").write_text(key)
    stores = TokenStore(folder / "train"), TokenStore(folder / "val")
    for store in stores:
        r = store.report
        if r.bad_fraction > max_bad_fraction:
            raise ValueError(f"{r.bad} of {r.rows} rows of the {r.name} split are bad ({100 * r.bad_fraction:.1f}%, "
                             f"more than data.max_bad_fraction={max_bad_fraction}); first: {'; '.join(r.first_bad)}")
        if len(store) == 0:
            hint = ("raise data.val_percent or give data.val_path" if r.name == "val" and val_path is None
                    else "check data.path")
            raise ValueError(f"the {r.name} split of {val_path if r.name == 'val' and val_path else path} is empty "
                             f"({r.rows} rows read, {r.bad} bad): {hint}")
    return stores
