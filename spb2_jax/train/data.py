"""Training data with grain: documents -> tokens -> pieces of at most ``seq_len`` -> first-fit packed rows with
segment ids -> batches, resumable (the iterator's state goes into every checkpoint).

Sources (``DataSection``): text files or directories (one document per file), jsonl (one document per line, the
``field`` value), chat jsonl (``format: chat``: per line a list of ``{"role", "content"}`` messages under
``field``, written in ChatML with the loss only on the assistant turns, ``_EncodeChat``), pre-tokenised ``.npy``
files (one 1-D integer array per file), pre-tokenised ArrayRecord files
(``format: arrayrecord``; one document per record: its tokens as little-endian int32 bytes, read with
``grain.sources.ArrayRecordDataSource``; ``write_array_record`` writes them), ``"python-stdlib"`` (the ``.py``
files of the running Python's standard library: text every machine has without a download) and ``"recall"``
(synthetic multi-query associative recall, ``recall_example``). Text is tokenized by the checkpoint's tokenizer
(or ``data.tokenizer``; default the tiny byte-level BPE shipped in ``spb2_jax/assets/tiny``) with an end-of-text
token appended.

Pipeline (per host; hosts take every ``process_count``-th document): the first ``eval_documents`` of a fixed
seed-shuffled document order are held out for the eval, the rest are shuffled by ``seed`` (a new order every
epoch) and repeated forever; every document is split into pieces of at most ``seq_len`` tokens (each piece its
own segment: positions restart at 0), and ``grain.experimental.FirstFitPackIterDataset`` packs the pieces into
rows of ``seq_len`` tokens (1-based segment ids, 0 = padding). A batch is ``{"input_ids", "segment_ids",
"loss_mask"}`` int32 ``[rows, seq_len]``; ``loss_mask`` marks the tokens that are prediction targets (all real
tokens, except in ``recall`` where only the answers are, and in ``chat`` where only the assistant turns are).
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig

import grain
import numpy as np
from tokenizers import Tokenizer

from spb2_jax.train.config import DataSection

TINY_TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "tiny", "tokenizer.json")
MAX_PIECES = 1 << 16  # documents split into more pieces than this are an error (grain's FlatMap fan-out bound)


def load_tokenizer(data: DataSection, checkpoint: str | None = None) -> Tokenizer:
    """``data.tokenizer``, else the checkpoint's ``tokenizer.json``, else the tiny byte-level BPE."""
    path = data.tokenizer
    if path is None and checkpoint is not None and os.path.exists(os.path.join(checkpoint, "tokenizer.json")):
        path = os.path.join(checkpoint, "tokenizer.json")
    path = path or TINY_TOKENIZER
    if not os.path.exists(path):
        raise ValueError(f"data.tokenizer={path!r}: no such file")
    return Tokenizer.from_file(path)


def _files(source: str, extensions: tuple[str, ...]) -> list[str]:
    if source == "python-stdlib":
        root = sysconfig.get_paths()["stdlib"]
        files = [f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                 if "site-packages" not in f and "dist-packages" not in f]
    elif os.path.isdir(source):
        files = [f for f in glob.glob(os.path.join(source, "**", "*"), recursive=True)
                 if os.path.isfile(f) and (not extensions or f.endswith(tuple(extensions)))]
    elif os.path.isfile(source):
        files = [source]
    else:
        raise ValueError(f"data.source={source!r}: no such file or directory")
    if not files:
        raise ValueError(f"data.source={source!r}: no files ending in {list(extensions)}")
    return sorted(files)


def _jsonl_records(files: list[str]):
    """``(path, line number, record)`` for every non-blank line of the jsonl ``files``."""
    for path in files:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield path, n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None


def _jsonl_documents(files: list[str], field: str) -> list[str]:
    docs = []
    for path, n, record in _jsonl_records(files):
        if not isinstance(record, dict) or field not in record:
            raise ValueError(f"{path}:{n}: no field data.field={field!r}")
        docs.append(str(record[field]))
    return docs


def _chat_documents(files: list[str], field: str) -> list[list[dict]]:
    """Chat conversations: per jsonl line, the list of ``{"role", "content"}`` messages under ``field``."""
    convs = []
    for path, n, record in _jsonl_records(files):
        messages = record.get(field) if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{path}:{n}: data.field={field!r} must hold a non-empty list of messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"{path}:{n}: message {i} must be {{'role': str, 'content': str}}")
        convs.append(messages)
    return convs


class _EncodeChat:
    """A conversation -> ChatML tokens (``<|im_start|>role\\ncontent<|im_end|>\\n`` per message) and a loss mask
    that is 1 exactly on the assistant messages' content and their ``<|im_end|>`` (Qwen's SFT convention): the
    model learns to answer and to stop, never to write the user's or the system's turns."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def __call__(self, messages: list[dict]) -> dict[str, np.ndarray]:
        tokens, mask = [], []
        for m in messages:
            answer = m["role"] == "assistant"
            for text, learn in ((f"<|im_start|>{m['role']}\n", False), (m["content"] + "<|im_end|>", answer),
                                ("\n", False)):
                ids = self._ids(text)
                tokens += ids
                mask += [int(learn)] * len(ids)
        return {"tokens": np.asarray(tokens, np.int32), "loss_mask": np.asarray(mask, np.int32)}


def write_array_record(path: str, documents) -> None:
    """Write pre-tokenised ``documents`` (1-D integer arrays) to an ArrayRecord file, one record per document
    (little-endian int32 bytes): the ``format: arrayrecord`` source."""
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(os.fspath(path), "group_size:1")
    try:
        for doc in documents:
            writer.write(np.asarray(doc, "<i4").tobytes())
    finally:
        writer.close()


class _Encode:
    """Document (a file path, a string, an ``.npy`` path, or a record index) -> ``int32`` tokens (+ end-of-text)."""

    def __init__(self, kind: str, tokenizer: Tokenizer | None, eos: int | None, records=None):
        self.kind, self.tokenizer, self.eos, self.records = kind, tokenizer, eos, records

    def __call__(self, doc) -> np.ndarray:
        if self.kind == "arrayrecord":
            record = self.records[int(doc)]
            if len(record) % 4:
                raise ValueError(f"ArrayRecord record {doc}: {len(record)} bytes is not a whole number of int32 "
                                 f"tokens (records must be pre-tokenised little-endian int32)")
            return np.frombuffer(record, "<i4").astype(np.int32)
        if self.kind == "npy":
            tokens = np.load(doc)
            if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
                raise ValueError(f"{doc}: a pre-tokenised document must be a 1-D integer array, got "
                                 f"{tokens.dtype}{list(tokens.shape)}")
            return tokens.astype(np.int32)
        if self.kind == "file":
            with open(doc, encoding="utf-8", errors="replace") as f:
                doc = f.read()
        ids = self.tokenizer.encode(doc).ids
        if self.eos is not None:
            ids = ids + [self.eos]
        return np.asarray(ids, np.int32)


def recall_example(index: int, seed: int, pairs: int, queries: int, vocab_size: int, symbols: int = 0,
                   ramp_examples: int = 0) -> dict[str, np.ndarray]:
    """Multi-query associative recall (Zoology's MQAR): ``p`` distinct keys each followed by its value, then ``q``
    queries of those keys each followed by its value again; only those answers are targets (``loss_mask``).

    A full-length example has ``p = pairs`` and ``q = queries`` (``p`` when 0). The first ``ramp_examples`` of the
    stream are a curriculum (the training stream of ``recall`` is not shuffled; each example is random already):
    example ``i`` has ``p`` uniform in ``[1, ceil(pairs * (i + 1) / ramp_examples)]`` and ``q = p``, so the stream
    starts with short examples, which teach the lookup quickly (trained on full-length examples only, a tiny model
    sits on the "predict any value in the context" plateau for many hundreds of steps: BENCHMARKS.md), and grows
    to full length; packing puts several short ones in a row. Held-out examples are always full-length. Queries
    ask the keys in a random order, every key once before any key again. Keys are ids ``3 .. 3 + S - 1`` and
    values ids ``3 + S .. 3 + 2 S - 1`` with ``S = symbols`` (0: half of the ids above the 3 special tokens), so
    chance accuracy is ``1 / S``. Example ``index`` of stream ``seed`` is always the same
    (``np.random.default_rng``)."""
    rng = np.random.default_rng([seed, index])
    half = symbols or (vocab_size - 3) // 2
    if 2 * half + 3 > vocab_size:
        raise ValueError(f"data.recall_vocab={symbols} needs a vocabulary of at least {2 * half + 3} ids, the model "
                         f"has {vocab_size}")
    if pairs > half:
        raise ValueError(f"data.recall_pairs={pairs} needs at least {pairs} key ids, data.recall_vocab gives {half}")
    if index < ramp_examples:
        p = int(rng.integers(1, -(-pairs * (index + 1) // ramp_examples) + 1))
        q = p
    else:
        p, q = pairs, queries or pairs
    keys = 3 + rng.choice(half, p, replace=False)
    values = 3 + half + rng.integers(0, half, p)
    asked = np.concatenate([rng.permutation(p) for _ in range(-(-q // p))])[:q]
    context = np.stack([keys, values], 1).reshape(-1)
    probe = np.stack([keys[asked], values[asked]], 1).reshape(-1)
    tokens = np.concatenate([context, probe]).astype(np.int32)
    mask = np.zeros_like(tokens)
    mask[2 * p + 1::2] = 1
    return {"tokens": tokens, "loss_mask": mask}


class _Pieces(grain.experimental.FlatMapTransform):
    """A document ``{"tokens", "loss_mask"}`` -> its pieces of at most ``length`` tokens (empty: none)."""

    max_fan_out = MAX_PIECES

    def __init__(self, length: int):
        self.length = length

    def flat_map(self, element):
        n = len(element["tokens"])
        return [{k: v[i:i + self.length] for k, v in element.items()} for i in range(0, n, self.length)]


def _with_mask(tokens: np.ndarray) -> dict[str, np.ndarray]:
    return {"tokens": tokens, "loss_mask": np.ones_like(tokens)}


def _model_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"input_ids": batch["tokens"].astype(np.int32), "segment_ids": batch["tokens_segment_ids"],
            "loss_mask": batch["loss_mask"].astype(np.int32)}


def documents(data: DataSection, tokenizer: Tokenizer | None, vocab_size: int, seed: int, eos: int | None):
    """``(train, held_out)`` ``grain.MapDataset`` of documents ``{"tokens", "loss_mask"}`` (module docstring)."""
    if data.source == "recall":
        make = lambda i: recall_example(i, seed, data.recall_pairs, data.recall_queries, vocab_size,  # noqa
                                        data.recall_vocab, data.recall_ramp_examples)
        held = lambda i: recall_example(i, seed + 1_000_003, data.recall_pairs, data.recall_queries,  # noqa
                                        vocab_size, data.recall_vocab)
        n = data.max_documents or 1 << 30
        return grain.MapDataset.range(n).map(make), grain.MapDataset.range(max(data.eval_documents, 1)).map(held)
    files = _files(data.source, () if data.format in ("jsonl", "chat", "arrayrecord") else data.extensions)
    if data.format == "jsonl":
        docs, encode = _jsonl_documents(files, data.field), _Encode("text", tokenizer, eos)
    elif data.format == "chat":
        docs, encode = _chat_documents(files, data.field), _EncodeChat(tokenizer)
    elif data.format == "npy":
        docs, encode = files, _Encode("npy", None, None)
    elif data.format == "arrayrecord":
        records = grain.sources.ArrayRecordDataSource(files)
        docs, encode = list(range(len(records))), _Encode("arrayrecord", None, None, records)
    else:
        docs, encode = files, _Encode("file", tokenizer, eos)
    order = np.random.default_rng(seed).permutation(len(docs))
    docs = [docs[i] for i in order]
    if data.max_documents:
        docs = docs[:data.max_documents + data.eval_documents]
    if len(docs) <= data.eval_documents:
        raise ValueError(f"data.source={data.source!r} has {len(docs)} documents, not more than "
                         f"data.eval_documents={data.eval_documents}")
    held, train = docs[:data.eval_documents], docs[data.eval_documents:]
    if data.format == "chat":  # the encoder makes the loss mask
        as_dataset = lambda d: grain.MapDataset.source(d).map(encode)  # noqa: E731
    else:
        as_dataset = lambda d: grain.MapDataset.source(d).map(encode).map(_with_mask)  # noqa: E731
    return as_dataset(train), as_dataset(held)


def batches(docs: grain.MapDataset, data: DataSection, rows: int, seed: int, *, process_index: int = 0,
            process_count: int = 1, repeat: bool = True, shuffle: bool | None = None) -> grain.IterDataset:
    """Packed batches of ``rows`` rows of ``data.seq_len`` tokens from this host's share of ``docs``."""
    ds = docs[process_index::process_count]
    if (data.shuffle if shuffle is None else shuffle) and data.source != "recall":
        ds = ds.shuffle(seed)
    if repeat:
        ds = ds.repeat(None)
    it = grain.experimental.FlatMapIterDataset(ds.to_iter_dataset(), _Pieces(data.seq_len))
    lengths = {"tokens": data.seq_len, "loss_mask": data.seq_len}
    packed = grain.experimental.FirstFitPackIterDataset(it, length_struct=lengths, num_packing_bins=rows,
                                                        shuffle_bins=False, meta_features=("loss_mask",))
    return packed.batch(rows, drop_remainder=True).map(_model_batch)

