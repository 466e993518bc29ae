"""Datasets: token streams, their train/validation splits, and random batches.

`load_dataset(spec)` understands:
- None or "default": the text every CPython install ships, as raw bytes
  (vocabulary 256): the pydoc topic documentation plus the standard library's
  own .py sources. No download, and written by no one here.
- a regular file not ending in .bin: read as raw bytes (vocabulary 256); the
  last 10% of the bytes are the validation split.
- a directory holding train.bin and val.bin: nanoGPT token files (raw uint16).
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
"""
import functools
import glob
import hashlib
import os
import platform
import sysconfig
from dataclasses import dataclass, replace

import numpy as np
import torch

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


def _load_nanogpt_dir(directory):
    paths = [os.path.join(directory, "train.bin"), os.path.join(directory, "val.bin")]
    splits = []
    for path in paths:
        if _nonempty_size(path) % 2:
            raise DataError(f"{path}: size is odd, not a whole number of uint16 tokens")
        splits.append(np.memmap(path, dtype=np.uint16, mode="r"))
    vocab_size = _token_vocab_size(splits, UINT16_VOCAB)
    fingerprint = {"name": directory, "format": "nanogpt", "train_tokens": len(splits[0]),
                   "val_tokens": len(splits[1]), "vocab_size": vocab_size, "sha256": _files_sha256(paths)}
    return Dataset(splits[0], splits[1], vocab_size, fingerprint, directory)


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
