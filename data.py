"""Datasets: token streams, their train/validation splits, and random batches.

`load_dataset(spec)` understands:
- None or "default": the text every CPython install ships, as raw bytes
  (vocabulary 256): the pydoc topic documentation plus the standard library's
  own .py sources. No download, and written by no one here.
- a regular file not ending in .bin: read as raw bytes (vocabulary 256); the
  last 10% of the bytes are the validation split.
- a directory holding train.bin and val.bin: nanoGPT token files, raw uint16;
  or, when a meta.json beside them says so (`python data.py prepare` writes
  one), uint32, with the vocabulary size and tokenizer it records.
- an llm.c / modded-nanogpt FineWeb shard (a .bin file with a 256 x int32
  header: magic 20240520, version 1, token count; then uint16 tokens), a glob
  pattern of shards, or a directory of `*train*.bin` / `*val*.bin` shards.
  Shards whose file name contains "val" are the validation split; with none
  (a single shard, or only train shards) the last 10% of the last shard is.

Token files are memory-mapped, never read whole into RAM. Every dataset carries
a fingerprint (sizes and a sha256) so runs on different machines can tell
whether they trained on the same data.

Batches are random contiguous windows of seq_len + 1 tokens; their starts come
from a CPU torch.Generator, so a seed (or a saved generator state) fixes them.

`python data.py prepare SOURCE --tokenizer TOK --out DIR` makes such a
directory from a .txt file, a .jsonl file or a Hugging Face dataset (streamed),
tokenized by a Hugging Face tokenizer, a tokenizer.json file or raw bytes; see
prepare(). Only torch, numpy and tqdm are needed; `datasets`, `transformers`
and `tokenizers` only by the sources and tokenizers that use them.
"""
import argparse
import functools
import glob
import hashlib
import importlib
import itertools
import json
import os
import platform
import sysconfig
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

SHARD_MAGIC = 20240520  # llm.c's GPT-2 token shard format
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
GPT2_VOCAB_PADDED = 50304  # 50257 rounded up to a multiple of 64, as nanoGPT does
UINT16_VOCAB = 65536  # every uint16 token fits
SMALL_DATA_TOKENS = 1 << 27  # below this, finding the largest token id takes well under a second
HASH_WHOLE_FILE_BYTES = 64 << 20  # bigger files are fingerprinted by size, first and last MiB
HASH_EDGE_BYTES = 1 << 20
VAL_ONE_IN = 16  # the embedded corpus puts about 1 document in 16 into validation (5% of the bytes on 3.11)
# Left out of the embedded corpus: installed packages, the test suites (large and
# repetitive), and files generated at build time (they differ between machines).
SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
META_FILE = "meta.json"  # beside train.bin / val.bin: their dtype, vocabulary and origin
TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class DataError(Exception):
    """Bad data input; the message is one line naming the file and the problem."""


@dataclass
class Dataset:
    train: object  # 1-D token array: numpy array, memmap or ShardedTokens
    val: object
    vocab_size: int
    fingerprint: dict
    name: str
    byte_level: bool = False  # tokens are utf-8 bytes, so text can be encoded and decoded

    def check(self, seq_len):
        """Raise DataError unless both splits hold at least one window of seq_len + 1 tokens."""
        for split, tokens in (("train", self.train), ("val", self.val)):
            if len(tokens) < seq_len + 1:
                raise DataError(f"{self.name}: the {split} split has {len(tokens)} tokens, "
                                f"fewer than one window of seq_len + 1 = {seq_len + 1}")

    def decode(self, tokens):
        """Text of a token sequence (list, array or tensor): utf-8 for byte data, ids otherwise."""
        ids = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
        if self.byte_level:
            return bytes(ids).decode("utf-8", errors="replace")
        return " ".join(map(str, ids))

    def encode(self, text):
        """Token ids of a string (a sampling prompt). Token data has no tokenizer here: DataError."""
        if not self.byte_level:
            raise DataError(f"{self.name}: token data has no tokenizer, so a text prompt cannot be encoded")
        return list(text.encode("utf-8"))


class ShardedTokens:
    """Several 1-D token arrays (memmapped shards) indexed as one, without copying them.

    Supports len() and indexing with slices or arrays of non-negative ints, which is
    all get_batch needs. Windows may cross shard boundaries: shards are arbitrary
    cuts of one token stream.
    """

    def __init__(self, parts):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts[:-1]])
        self.length = sum(len(p) for p in parts)
        self.dtype = parts[0].dtype

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if isinstance(index, slice):
            index = np.arange(*index.indices(self.length))
        index = np.asarray(index)
        flat = index.reshape(-1)
        # side="right" skips empty parts that share a start with the next one
        part_ids = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=self.dtype)
        for p in np.unique(part_ids):
            mask = part_ids == p
            out[mask] = self.parts[p][flat[mask] - self.starts[p]]
        return out.reshape(index.shape)


# ----------------------------------------------------------------------------
# the embedded corpus: CPython's documentation and standard library sources

def _val_rank(document_name):
    # hashlib, not hash(): Python's str hash is salted per process
    return int.from_bytes(hashlib.sha256(document_name.encode()).digest()[:4], "big")


def python_documents():
    """(name, bytes) of every document of the embedded corpus, sorted by name.

    pydoc topics are named "pydoc_data/topics/<key>"; sources by their path
    relative to the stdlib directory, with '/' separators.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package the docs separately
        topics = {}
    documents = {f"pydoc_data/topics/{key}": text.encode("utf-8") for key, text in topics.items()}
    stdlib = sysconfig.get_paths()["stdlib"]
    for directory, subdirs, files in os.walk(stdlib):
        subdirs[:] = [d for d in subdirs if d not in SKIPPED_DIRS and not d.startswith("config-")]
        for file in files:
            path = os.path.join(directory, file)
            name = os.path.relpath(path, stdlib).replace(os.sep, "/")
            # topics.py holds the pydoc text above as string literals: skip the duplicate
            if file.endswith(".py") and not file.startswith("_sysconfigdata") and name != "pydoc_data/topics.py":
                with open(path, "rb") as f:
                    documents[name] = f.read()
    return sorted(documents.items())


def python_val_names(names):
    """Names of the validation documents: those whose sha256 rank is 0 mod VAL_ONE_IN.

    The rule looks at each name alone, so the split does not depend on which other
    files exist or their order; if it picks none, the lowest-ranked document is val.
    """
    return {n for n in names if _val_rank(n) % VAL_ONE_IN == 0} or {min(names, key=_val_rank)}


@functools.cache  # read the files once per process
def _load_python_corpus():
    documents = python_documents()
    if not documents:
        stdlib = sysconfig.get_paths()["stdlib"]
        raise DataError(f"{stdlib}: no pydoc topics or .py sources found for the default corpus")
    val_names = python_val_names([name for name, _ in documents])
    train = b"".join(text for name, text in documents if name not in val_names)
    val = b"".join(text for name, text in documents if name in val_names)
    version = platform.python_version()
    name = f"{platform.python_implementation().lower()}-{version}-stdlib"
    fingerprint = {
        "name": name, "format": "bytes", "python": version,
        "documents": len(documents), "val_documents": len(val_names),
        "train_tokens": len(train), "val_tokens": len(val), "vocab_size": 256,  # tokens are bytes
        "sha256": hashlib.sha256(train + val).hexdigest(),
    }
    return Dataset(np.frombuffer(train, dtype=np.uint8), np.frombuffer(val, dtype=np.uint8),
                   256, fingerprint, name, byte_level=True)


# ----------------------------------------------------------------------------
# files on disk

def _files_sha256(paths):
    """sha256 of the files' contents in order; a big file contributes its size, first and last MiB."""
    h = hashlib.sha256()
    for path in paths:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if size <= HASH_WHOLE_FILE_BYTES:
                h.update(f.read())
            else:
                h.update(size.to_bytes(8, "little"))
                h.update(f.read(HASH_EDGE_BYTES))
                f.seek(size - HASH_EDGE_BYTES)
                h.update(f.read(HASH_EDGE_BYTES))
    return h.hexdigest()


def _split_last_tenth(tokens):
    cut = len(tokens) - len(tokens) // 10
    return tokens[:cut], tokens[cut:]


def _nonempty_size(path):
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    size = os.path.getsize(path)
    if size == 0:
        raise DataError(f"{path}: empty file")
    return size


def _token_vocab_size(parts, default):
    """Largest token id + 1, rounded up to a multiple of 64; `default` when the data is too big to scan."""
    if sum(len(p) for p in parts) > SMALL_DATA_TOKENS:
        return default
    largest = max(int(p.max()) for p in parts if len(p))
    return (largest + 1 + 63) // 64 * 64


def _concat(parts):
    return parts[0] if len(parts) == 1 else ShardedTokens(parts)


def _load_bytes_file(path):
    _nonempty_size(path)
    train, val = _split_last_tenth(np.memmap(path, dtype=np.uint8, mode="r"))
    fingerprint = {"name": path, "format": "bytes", "train_tokens": len(train), "val_tokens": len(val),
                   "vocab_size": 256, "sha256": _files_sha256([path])}
    return Dataset(train, val, 256, fingerprint, path, byte_level=True)


def _read_meta(directory):
    """The checked contents of directory/meta.json, or None when there is none."""
    path = os.path.join(directory, META_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(meta, dict) or meta.get("dtype") not in TOKEN_DTYPES:
        raise DataError(f"{path}: 'dtype' must be one of {', '.join(TOKEN_DTYPES)}")
    for key, least in (("vocab_size", 1), ("train_tokens", 0), ("val_tokens", 0)):
        if not isinstance(meta.get(key), int) or meta[key] < least:
            raise DataError(f"{path}: '{key}' must be an integer of at least {least}")
    return meta


def _load_nanogpt_dir(directory):
    """train.bin and val.bin: in the dtype and with the vocabulary meta.json records, when there is
    one; without it, uint16 (nanoGPT's convention) and the vocabulary inferred from the tokens."""
    meta = _read_meta(directory)
    dtype = np.dtype(TOKEN_DTYPES[meta["dtype"]] if meta else np.uint16)
    paths = [os.path.join(directory, "train.bin"), os.path.join(directory, "val.bin")]
    splits = []
    for path, split in zip(paths, ("train", "val")):
        if _nonempty_size(path) % dtype.itemsize:
            raise DataError(f"{path}: size is not a whole number of {dtype.name} tokens")
        tokens = np.memmap(path, dtype=dtype, mode="r")
        if meta and len(tokens) != meta[f"{split}_tokens"]:
            raise DataError(f"{path}: holds {len(tokens)} tokens but {META_FILE} says {meta[f'{split}_tokens']}")
        splits.append(tokens)
    vocab_size = meta["vocab_size"] if meta else _token_vocab_size(splits, UINT16_VOCAB)
    fingerprint = {"name": directory, "format": "nanogpt", "train_tokens": len(splits[0]),
                   "val_tokens": len(splits[1]), "vocab_size": vocab_size, "sha256": _files_sha256(paths)}
    if meta:
        fingerprint.update(dtype=dtype.name, tokenizer=meta.get("tokenizer"))
    byte_level = bool(meta) and meta.get("tokenizer") == BYTES_TOKENIZER
    return Dataset(splits[0], splits[1], vocab_size, fingerprint, directory, byte_level=byte_level)


def _open_shard(path):
    """The tokens of one llm.c shard as a memmap, after checking its header against the file size."""
    size = _nonempty_size(path)
    header = np.fromfile(path, dtype=np.int32, count=SHARD_HEADER_INTS)
    if len(header) < SHARD_HEADER_INTS:
        raise DataError(f"{path}: {size} bytes, shorter than the {SHARD_HEADER_INTS * 4}-byte shard header")
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: bad shard magic {header[0]} (expected {SHARD_MAGIC}); "
                        "nanoGPT train.bin/val.bin are loaded by passing their directory")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    n_tokens = int(header[2])
    if n_tokens <= 0 or size != SHARD_HEADER_INTS * 4 + 2 * n_tokens:
        raise DataError(f"{path}: header says {n_tokens} tokens but the file holds "
                        f"{(size - SHARD_HEADER_INTS * 4) / 2:g}")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=SHARD_HEADER_INTS * 4, shape=(n_tokens,))


def _split_shards_by_name(name, paths):
    """Shards whose file name contains "val" are the validation split, the others train."""
    val_paths = [p for p in paths if "val" in os.path.basename(p)]
    train_paths = [p for p in paths if p not in val_paths]
    if not train_paths:
        raise DataError(f"{name}: no train shards, every file name contains 'val'")
    return train_paths, val_paths


def _load_shards(name, train_paths, val_paths):
    """llm.c shards; with no val_paths, the last 10% of the last train shard is the validation split."""
    train = [_open_shard(p) for p in train_paths]
    if val_paths:
        val = [_open_shard(p) for p in val_paths]
    else:
        train[-1], last_tenth = _split_last_tenth(train[-1])
        val = [last_tenth]
    # the magic says GPT-2 tokens, so a big FineWeb set gets GPT-2's vocabulary without a scan
    vocab_size = _token_vocab_size(train + val, GPT2_VOCAB_PADDED)
    fingerprint = {"name": name, "format": "llmc-shards", "shards": len(train_paths + val_paths),
                   "train_tokens": sum(map(len, train)), "val_tokens": sum(map(len, val)),
                   "vocab_size": vocab_size, "sha256": _files_sha256(train_paths + val_paths)}
    return Dataset(_concat(train), _concat(val), vocab_size, fingerprint, name)


def load_dataset(spec=None, vocab_size=None):
    """Load the dataset `spec` names (see the module docstring); `vocab_size` overrides the inferred one."""
    spec = "default" if spec is None else os.fspath(spec)
    if spec == "default":
        dataset = _load_python_corpus()
        dataset = replace(dataset, fingerprint=dict(dataset.fingerprint))  # the cached one stays pristine
    elif any(c in spec for c in "*?["):  # a glob pattern of shards
        paths = sorted(glob.glob(spec))
        if not paths:
            raise DataError(f"{spec}: the pattern matches no files")
        dataset = _load_shards(spec, *_split_shards_by_name(spec, paths))
    elif not os.path.exists(spec):
        raise DataError(f"{spec}: no such file or directory")
    elif os.path.isdir(spec):
        if os.path.exists(os.path.join(spec, "train.bin")):
            dataset = _load_nanogpt_dir(spec)
        else:
            shards = sorted(p for p in glob.glob(os.path.join(glob.escape(spec), "*.bin"))
                            if "train" in os.path.basename(p) or "val" in os.path.basename(p))
            if not any("train" in os.path.basename(p) for p in shards):
                raise DataError(f"{spec}: directory has neither train.bin + val.bin (nanoGPT) "
                                "nor *train*.bin shards (llm.c)")
            dataset = _load_shards(spec, *_split_shards_by_name(spec, shards))
    elif spec.endswith(".bin"):
        dataset = _load_shards(spec, [spec], [])
    else:
        dataset = _load_bytes_file(spec)
    if vocab_size is not None:
        dataset.vocab_size = dataset.fingerprint["vocab_size"] = vocab_size
    return dataset


# ----------------------------------------------------------------------------
# batches

def get_batch(tokens, batch_size, seq_len, generator, device="cpu"):
    """Random windows of `tokens`: x (batch_size, seq_len) int64 and y, x shifted by one.

    Window starts are drawn with torch.randint on `generator` (a CPU generator),
    so the same generator state gives the same batch.
    """
    if len(tokens) < seq_len + 1:
        raise ValueError(f"{len(tokens)} tokens hold no window of seq_len + 1 = {seq_len + 1}")
    starts = torch.randint(len(tokens) - seq_len, (batch_size,), generator=generator).numpy()
    windows = torch.from_numpy(tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
    x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    device = torch.device(device)
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


class MicroBatches:
    """An endless stream of random micro-batches from one split, resumable via state_dict()."""

    def __init__(self, tokens, batch_size, seq_len, seed, device="cpu"):
        self.tokens, self.batch_size, self.seq_len, self.device = tokens, batch_size, seq_len, device
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self):
        return get_batch(self.tokens, self.batch_size, self.seq_len, self.generator, self.device)

    def draw(self, k):
        """The next k micro-batches, as a list of (x, y)."""
        return [next(self) for _ in range(k)]

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


def eval_batches(tokens, n_batches, batch_size, seq_len, seed, device="cpu"):
    """A fixed list of batches (the same for the same arguments), for a comparable validation loss."""
    return MicroBatches(tokens, batch_size, seq_len, seed, device).draw(n_batches)


# ----------------------------------------------------------------------------
# preparing token files: python data.py prepare SOURCE --tokenizer TOK --out DIR

BYTES_TOKENIZER = "bytes"
PREPARE_VAL_FRACTION = 0.01
PREPARE_BATCH_DOCS = 256  # documents tokenized together: fast tokenizers encode a batch in parallel
FLUSH_TOKENS = 1 << 20  # tokens buffered per split before they are appended to its file
TEXT_DOC_CHARS = 1 << 20  # a text file's paragraph longer than this ends at the next line end
EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]")  # a tokenizer file's separator
LOCAL_SUFFIXES = (".txt", ".text", ".jsonl", ".json")  # such a source is a file, never a dataset name


def _optional(package, what):
    """Import an optional package, or DataError saying that `what` needs it and how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError as e:
        if e.name is not None and e.name.split(".")[0] != package:
            raise DataError(f"{what}: importing '{package}' failed: {e}") from None
        raise DataError(f"{what} needs the '{package}' package: pip install {package}") from None


def _one_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class BytesTokenizer:
    """Raw UTF-8 bytes as tokens: vocabulary 256, no end-of-text token, no package needed."""
    name = BYTES_TOKENIZER
    vocab_size = 256
    eos_id = None

    def encode_batch(self, texts):
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]


class FileTokenizer:
    """A `tokenizers` tokenizer.json file; its separator is the first of EOS_TOKENS it knows."""

    def __init__(self, path):
        tokenizers = _optional("tokenizers", f"{path}: a tokenizer file")
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises a bare Exception
            raise DataError(f"{path}: not a tokenizers tokenizer file ({_one_line(e)})") from None
        self.name = path
        self.vocab_size = max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        self.eos_id = next((i for i in map(self.tokenizer.token_to_id, EOS_TOKENS) if i is not None), None)

    def encode_batch(self, texts):
        return [encoding.ids for encoding in self.tokenizer.encode_batch(texts, add_special_tokens=False)]


class HubTokenizer:
    """A Hugging Face tokenizer by name (e.g. t5-base) or saved directory, via transformers.AutoTokenizer;
    its separator is its eos token (else its sep token)."""

    def __init__(self, name):
        transformers = _optional("transformers", f"{name}: a Hugging Face tokenizer")
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        except Exception as e:  # not found, no network, ...: whatever the hub client raises
            raise DataError(f"{name}: cannot load the tokenizer ({_one_line(e)})") from None
        self.name = name
        self.vocab_size = len(self.tokenizer)  # added tokens included
        eos = self.tokenizer.eos_token_id
        self.eos_id = eos if eos is not None else self.tokenizer.sep_token_id

    def encode_batch(self, texts):
        # verbose=False: no warning for documents longer than the model's context, they are cut later
        return self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]


def load_tokenizer(spec):
    """`bytes`, a tokenizer.json file (the `tokenizers` library) or a Hugging Face tokenizer name/directory.

    A tokenizer has a name, a vocab_size (every id it makes is below it), an eos_id
    (None without one) and encode_batch(texts) -> one id sequence per text, without
    special tokens added.
    """
    if spec == BYTES_TOKENIZER:
        return BytesTokenizer()
    if os.path.isfile(spec):
        return FileTokenizer(spec)
    if spec.endswith(".json"):
        raise DataError(f"{spec}: no such tokenizer file")
    return HubTokenizer(spec)


def _text_documents(path):
    """A text file's paragraphs, each with the blank lines after it: together they are the whole file.

    A paragraph that grows past TEXT_DOC_CHARS ends at the next line end, so that a
    file without blank lines is still read a piece at a time.
    """
    with open(path, encoding="utf-8", newline="") as f:
        lines, size, after_blank = [], 0, False
        try:
            for line in f:
                blank = not line.strip()
                if lines and ((after_blank and not blank) or size >= TEXT_DOC_CHARS):
                    yield "".join(lines)
                    lines, size = [], 0
                lines.append(line)
                size += len(line)
                after_blank = blank
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from None
        if lines:
            yield "".join(lines)


def _jsonl_documents(path, text_field):
    """The `text_field` string of every line of a jsonl file (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: not a JSON line ({e.msg})") from None
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise DataError(f"{path}:{number}: no string '{text_field}' field (see --text-field)")
                yield text
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from None


def _hub_documents(name, config, split, text_field):
    """The `text_field` of every row of a Hugging Face dataset, streamed: nothing is downloaded whole."""
    datasets = _optional("datasets", f"{name}: a Hugging Face dataset")
    try:
        rows = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # not found, no network, a config missing, ...
        raise DataError(f"{name}: cannot load the dataset ({_one_line(e)})") from None

    def texts():
        for row in rows:
            if not isinstance(row.get(text_field), str):
                raise DataError(f"{name}: rows have no string '{text_field}' field, they have "
                                f"{', '.join(map(str, row))} (see --text-field)")
            yield row[text_field]
    return texts()


def read_documents(source, config=None, split="train", text_field="text"):
    """The documents of `source`, lazily, one string at a time.

    - a .jsonl file: the `text_field` of each line;
    - another existing file: its paragraphs (see _text_documents);
    - otherwise a Hugging Face dataset name (with `config` and `split`), streamed.
    """
    source = os.fspath(source)
    if os.path.isdir(source):
        raise DataError(f"{source}: is a directory, not a .txt or .jsonl file")
    if os.path.exists(source):
        _nonempty_size(source)
        return _jsonl_documents(source, text_field) if source.endswith(".jsonl") else _text_documents(source)
    if source.endswith(LOCAL_SUFFIXES) or source.startswith((".", "/", "~")):
        raise DataError(f"{source}: no such file")
    return _hub_documents(source, config, split, text_field)


def is_val_document(text, val_fraction):
    """Whether a document goes to validation: the first 4 bytes of its utf-8 sha256, as a fraction
    of 2**32, are below val_fraction. Each document decides alone, whatever the order or the
    budget, and copies of one document land in the same split."""
    return _val_rank(text) < val_fraction * 2**32


def token_dtype(vocab_size):
    """uint16 when every id fits (nanoGPT's format), else uint32."""
    return "uint16" if vocab_size <= UINT16_VOCAB else "uint32"


class _TokenWriter:
    """Appends token ids to path + '.tmp' through a buffer; finish() moves the file into place."""

    def __init__(self, path, dtype, vocab_size):
        self.path, self.dtype, self.vocab_size = path, np.dtype(dtype), vocab_size
        self.file = open(path + ".tmp", "wb")
        self.buffer, self.buffered, self.count = [], 0, 0

    def write(self, ids):
        if len(ids):  # an id outside the vocabulary would wrap around silently in the cast
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.vocab_size:
                raise DataError(f"{self.path}: the tokenizer made token id {high if low >= 0 else low}, "
                                f"outside its vocabulary of {self.vocab_size}")
        self.buffer.append(ids.astype(self.dtype))
        self.buffered += len(ids)
        self.count += len(ids)
        if self.buffered >= FLUSH_TOKENS:
            self.flush()

    def flush(self):
        for ids in self.buffer:
            ids.tofile(self.file)
        self.buffer, self.buffered = [], 0

    def finish(self):
        self.flush()
        self.file.close()
        os.replace(self.path + ".tmp", self.path)

    def discard(self):
        self.file.close()
        if os.path.exists(self.path + ".tmp"):
            os.remove(self.path + ".tmp")


def prepare(source, out_dir, tokenizer=BYTES_TOKENIZER, config=None, split="train", text_field="text",
            max_tokens=None, val_fraction=PREPARE_VAL_FRACTION, progress=True):
    """Tokenize `source` (see read_documents) into out_dir/train.bin and val.bin; returns the meta dict,
    also written to out_dir/meta.json, which load_dataset reads to load the files right.

    Documents are read, tokenized (PREPARE_BATCH_DOCS at a time) and appended to their
    split's file as they come, so memory does not grow with the corpus. Each document is
    followed by the tokenizer's eos_id when it has one (`bytes` has none). A document goes
    to val.bin or train.bin by is_val_document. With max_tokens, writing stops once that
    many tokens are written (both splits together), cutting the last document. Tokens are
    uint16 when the vocabulary fits, else uint32. The files are written under .tmp names
    and moved into place at the end, so a failed run leaves no half dataset behind.
    """
    source = os.fspath(source)
    if not 0 < val_fraction < 1:
        raise DataError(f"{source}: the validation fraction must be between 0 and 1, got {val_fraction}")
    if max_tokens is not None and max_tokens <= 0:
        raise DataError(f"{source}: the token budget must be positive, got {max_tokens}")
    from_hub = not os.path.exists(source)
    documents = (text for text in read_documents(source, config, split, text_field) if text)
    tok = load_tokenizer(os.fspath(tokenizer))
    dtype = token_dtype(tok.vocab_size)
    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    writers = {name: _TokenWriter(os.path.join(out_dir, f"{name}.bin"), dtype, tok.vocab_size)
               for name in ("train", "val")}
    n_documents = n_val_documents = written = 0
    bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc=f"prepare {os.path.basename(source)}",
               dynamic_ncols=True, disable=not progress, delay=0.5)  # delay: no bar for a quick error
    try:
        while written != max_tokens and (batch := list(itertools.islice(documents, PREPARE_BATCH_DOCS))):
            for text, ids in zip(batch, tok.encode_batch(batch)):
                ids = np.asarray(ids, dtype=np.int64)
                if tok.eos_id is not None:
                    ids = np.append(ids, tok.eos_id)
                if max_tokens is not None:
                    ids = ids[:max_tokens - written]
                val = is_val_document(text, val_fraction)
                writers["val" if val else "train"].write(ids)
                n_documents += 1
                n_val_documents += val
                written += len(ids)
                bar.update(len(ids))
                if written == max_tokens:
                    break
        bar.close()
        if n_documents == 0:
            raise DataError(f"{source}: no documents (an empty source, or only empty texts)")
        for name, writer in writers.items():
            if writer.count == 0:
                raise DataError(f"{source}: no {name} tokens from {n_documents} documents "
                                f"({n_val_documents} for validation at --val-fraction {val_fraction}); "
                                "use more data or another --val-fraction")
        meta = {"format": "nanogpt", "dtype": dtype, "vocab_size": tok.vocab_size, "tokenizer": tok.name,
                "eos_id": tok.eos_id, "train_tokens": writers["train"].count, "val_tokens": writers["val"].count,
                "documents": n_documents, "val_documents": n_val_documents, "source": source,
                "val_fraction": val_fraction, "max_tokens": max_tokens}
        if from_hub:
            meta.update(config=config, split=split)
        # meta.json first: should the moves below be cut short, its token counts do not match
        # the old files left in place, and load_dataset says so
        meta_path = os.path.join(out_dir, META_FILE)
        with open(meta_path + ".tmp", "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
        os.replace(meta_path + ".tmp", meta_path)
        for writer in writers.values():
            writer.finish()
    except BaseException:
        bar.leave = False  # the error message alone, without a bar before it
        bar.close()
        for writer in writers.values():
            writer.discard()
        if created and not os.listdir(out_dir):
            os.rmdir(out_dir)
        raise
    return meta


# ----------------------------------------------------------------------------
# the command line

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit code 2: no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _fraction(text):
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def main(argv=None):
    """`python data.py prepare ...`: prepare() from the command line; bad input is one line on stderr, exit 2."""
    parser = ArgumentParser(prog="data.py", description="Make nanoGPT token files for train.py --data.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", description="Tokenize SOURCE, streamed, into OUT/train.bin and val.bin "
                            "(uint16, or uint32 for a vocabulary above 65536) and OUT/meta.json, for "
                            "train.py --data OUT. A document goes to val.bin by a hash of its text.",
                            help="tokenize a text, jsonl or Hugging Face dataset into DIR/train.bin, val.bin")
    p.add_argument("source", help="a .txt file (paragraphs are documents), a .jsonl file, "
                                  "or a Hugging Face dataset name (e.g. allenai/c4 with --config en)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", default=BYTES_TOKENIZER,
                   help="bytes (default), a tokenizer.json file, or a Hugging Face tokenizer (e.g. t5-base)")
    p.add_argument("--config", help="the Hugging Face dataset's configuration (e.g. en)")
    p.add_argument("--split", default="train", help="the Hugging Face dataset's split (default train)")
    p.add_argument("--text-field", default="text", help="the jsonl / dataset field holding the text")
    p.add_argument("--max-tokens", type=_positive_int, help="stop after this many tokens (both splits)")
    p.add_argument("--val-fraction", type=_fraction, default=PREPARE_VAL_FRACTION,
                   help=f"fraction of the documents for val.bin, by hash (default {PREPARE_VAL_FRACTION})")
    args = parser.parse_args(argv)
    try:
        meta = prepare(args.source, args.out, args.tokenizer, config=args.config, split=args.split,
                       text_field=args.text_field, max_tokens=args.max_tokens, val_fraction=args.val_fraction)
    except DataError as e:
        parser.exit(2, f"data.py: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, "data.py: interrupted, nothing written\n")
    print(f"{args.out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
          f"({meta['dtype']}, vocabulary {meta['vocab_size']:,}, tokenizer {meta['tokenizer']}) "
          f"from {meta['documents']:,} documents")


if __name__ == "__main__":
    main()
