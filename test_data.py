"""Tests for data.py: the embedded corpus, the file formats, batches, bad input, and `data.py prepare`."""
import hashlib
import io
import json
import sys
import time
import types

import numpy as np
import pytest
import torch

import data
from data import DataError, MicroBatches, eval_batches, get_batch, load_dataset


def write_shard(path, tokens, magic=20240520, version=1, n_tokens=None):
    """An llm.c shard: 256 int32 header (magic, version, token count), then uint16 tokens."""
    header = np.zeros(256, dtype=np.int32)
    header[:3] = magic, version, len(tokens) if n_tokens is None else n_tokens
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())
    return str(path)


def batches_equal(a, b):
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


# ----------------------------------------------------------------------------
# the embedded corpus

def test_default_corpus_loads_fast_and_deterministically():
    data._load_python_corpus.cache_clear()
    start = time.perf_counter()
    ds = load_dataset()
    assert time.perf_counter() - start < 3.0
    data._load_python_corpus.cache_clear()
    again = load_dataset("default")
    assert again.fingerprint == ds.fingerprint
    assert np.array_equal(again.train, ds.train) and np.array_equal(again.val, ds.val)

    assert ds.vocab_size == 256 and ds.byte_level
    assert ds.train.dtype == np.uint8 and ds.train.ndim == 1
    assert len(ds.val) > 0 and len(ds.train) > 10 * len(ds.val)
    fp = ds.fingerprint
    assert fp["name"] == ds.name and fp["train_tokens"] == len(ds.train) and fp["val_tokens"] == len(ds.val)
    assert fp["sha256"] == hashlib.sha256(ds.train.tobytes() + ds.val.tobytes()).hexdigest()
    ds.fingerprint["name"] = "changed"  # callers get a copy: the cache is untouched
    assert load_dataset().fingerprint["name"] == again.name != "changed"


def test_default_split_assigns_whole_documents_by_path_hash():
    documents = data.python_documents()
    names = [name for name, _ in documents]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert any(n.startswith("pydoc_data/topics/") for n in names) and "os.py" in names
    assert "pydoc_data/topics.py" not in names
    for name in names:  # '/' separators, no test suites, no installed packages
        assert "\\" not in name
        assert not set(name.split("/")[:-1]) & {"test", "tests", "idle_test", "site-packages", "dist-packages"}, name
    # the documented rule, computed here independently
    is_val = {n: int.from_bytes(hashlib.sha256(n.encode()).digest()[:4], "big") % 16 == 0 for n in names}
    assert 0 < sum(is_val.values()) < len(names)
    ds = load_dataset()
    assert ds.val.tobytes() == b"".join(text for name, text in documents if is_val[name])
    assert ds.train.tobytes() == b"".join(text for name, text in documents if not is_val[name])


def test_decode_and_encode_round_trip_bytes():
    ds = load_dataset()
    assert ds.encode("héllo") == list("héllo".encode("utf-8"))
    assert ds.decode(torch.tensor(ds.encode("héllo"))) == "héllo"
    assert ds.decode([0xff, 0x41]) == "\ufffdA"  # invalid utf-8 is replaced, not an error


# ----------------------------------------------------------------------------
# batches

def test_same_seed_same_batches_different_seed_different():
    tokens = load_dataset().train
    def batch(seed):
        return get_batch(tokens, 4, 32, torch.Generator().manual_seed(seed))
    x, y = batch(0)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert batches_equal([batch(0)], [(x, y)])
    assert not torch.equal(batch(1)[0], x)


def test_windows_come_from_the_array_and_y_is_x_shifted():
    tokens = np.arange(5000, dtype=np.uint16)  # every window start is readable off its first token
    x, y = get_batch(tokens, 8, 16, torch.Generator().manual_seed(0))
    assert torch.equal(y, x + 1)
    assert torch.equal(x, x[:, :1] + torch.arange(16))
    assert int(y.max()) <= 4999
    # against real data: the starts are torch.randint on the generator
    ds = load_dataset()
    x, y = get_batch(ds.val, 3, 20, torch.Generator().manual_seed(5))
    starts = torch.randint(len(ds.val) - 20, (3,), generator=torch.Generator().manual_seed(5))
    for row, s in enumerate(starts.tolist()):
        assert x[row].tolist() == ds.val[s:s + 20].tolist()
        assert y[row].tolist() == ds.val[s + 1:s + 21].tolist()


def test_windows_reach_both_ends_of_the_data():
    tokens = np.arange(12, dtype=np.uint16)
    x, y = get_batch(tokens, 200, 10, torch.Generator().manual_seed(0))
    assert set(x[:, 0].tolist()) == {0, 1} and int(y.max()) == 11


def test_micro_batches_state_dict_round_trip_continues_identically():
    tokens = load_dataset().train
    stream = MicroBatches(tokens, 2, 16, seed=3)
    first = [next(stream)] + stream.draw(2)
    buffer = io.BytesIO()
    torch.save(stream.state_dict(), buffer)  # as a checkpoint would
    expected = stream.draw(3)

    resumed = MicroBatches(tokens, 2, 16, seed=999)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    assert batches_equal(resumed.draw(3), expected)
    assert batches_equal(MicroBatches(tokens, 2, 16, seed=3).draw(3), first)
    assert not batches_equal(MicroBatches(tokens, 2, 16, seed=4).draw(3), first)


def test_eval_batches_are_fixed():
    val = load_dataset().val
    a = eval_batches(val, 3, 2, 16, seed=0, device="cpu")
    assert len(a) == 3 and batches_equal(a, eval_batches(val, 3, 2, 16, seed=0, device="cpu"))
    assert not batches_equal(a, eval_batches(val, 3, 2, 16, seed=1, device="cpu"))


# ----------------------------------------------------------------------------
# files on disk

def test_text_file_splits_off_the_last_tenth(tmp_path):
    content = bytes(range(256)) * 4 + "naïve".encode()
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    ds = load_dataset(str(path))
    cut = len(content) - len(content) // 10
    assert ds.train.tobytes() == content[:cut] and ds.val.tobytes() == content[cut:]
    assert ds.vocab_size == 256 and ds.byte_level and ds.decode(ds.val[-6:]) == "naïve"
    assert ds.fingerprint["sha256"] == hashlib.sha256(content).hexdigest()
    assert load_dataset(path).fingerprint == ds.fingerprint  # a pathlib.Path works too


def test_nanogpt_directory(tmp_path):
    train = np.array([5, 1000, 7, 3] * 50, dtype=np.uint16)
    val = np.array([9, 8, 7, 6] * 10, dtype=np.uint16)
    train.tofile(tmp_path / "train.bin")
    val.tofile(tmp_path / "val.bin")
    ds = load_dataset(str(tmp_path))
    assert isinstance(ds.train, np.memmap)
    assert np.array_equal(ds.train, train) and np.array_equal(ds.val, val)
    assert ds.vocab_size == 1024  # largest id 1000, + 1, rounded up to 64
    assert ds.fingerprint["train_tokens"] == 200 and ds.fingerprint["val_tokens"] == 40
    assert ds.fingerprint["sha256"] == hashlib.sha256(train.tobytes() + val.tobytes()).hexdigest()
    assert ds.decode([5, 1000]) == "5 1000" and not ds.byte_level
    with pytest.raises(DataError, match="no tokenizer"):
        ds.encode("hi")
    assert load_dataset(str(tmp_path), vocab_size=2048).vocab_size == 2048


def test_fineweb_shard_directory_glob_and_single_file(tmp_path):
    rng = np.random.default_rng(0)
    train_a, train_b, val = (rng.integers(0, 50257, n) for n in (300, 200, 100))
    write_shard(tmp_path / "fineweb_train_000001.bin", train_a)
    write_shard(tmp_path / "fineweb_train_000002.bin", train_b)
    val_path = write_shard(tmp_path / "fineweb_val_000000.bin", val)
    (tmp_path / "notes.bin").write_bytes(b"not a shard")  # neither train nor val: ignored
    expected_vocab = (int(max(train_a.max(), train_b.max(), val.max())) + 1 + 63) // 64 * 64

    for spec in (str(tmp_path), str(tmp_path / "fineweb_*.bin")):
        ds = load_dataset(spec)
        assert len(ds.train) == 500 and len(ds.val) == 100
        assert np.array_equal(ds.train[:], np.concatenate([train_a, train_b]))
        assert np.array_equal(ds.val, val)
        assert ds.vocab_size == expected_vocab and ds.fingerprint["shards"] == 3

    single = load_dataset(val_path)  # one shard: its last 10% is validation
    assert np.array_equal(single.train, val[:90]) and np.array_equal(single.val, val[90:])
    only_train = load_dataset(str(tmp_path / "fineweb_train_*.bin"))
    assert np.array_equal(only_train.train[:], np.concatenate([train_a, train_b[:180]]))
    assert np.array_equal(only_train.val[:], train_b[180:])


def test_batches_across_shards_match_the_concatenated_stream(tmp_path):
    parts = [np.arange(0, 40), np.arange(40, 45), np.arange(45, 100)]
    for i, part in enumerate(parts):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", part)
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(30))
    ds = load_dataset(str(tmp_path))
    assert isinstance(ds.train, data.ShardedTokens)
    x, y = get_batch(ds.train, 64, 12, torch.Generator().manual_seed(0))
    whole = np.arange(100, dtype=np.uint16)
    assert batches_equal([(x, y)], [get_batch(whole, 64, 12, torch.Generator().manual_seed(0))])
    assert torch.equal(y, x + 1)  # windows cross shard boundaries seamlessly


# ----------------------------------------------------------------------------
# bad input: DataError with a one-line message naming the file

def bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "short.txt").write_bytes(b"twenty bytes of text")
    write_shard(tmp_path / "magic.bin", np.arange(10), magic=1234)
    write_shard(tmp_path / "version.bin", np.arange(10), version=2)
    write_shard(tmp_path / "count.bin", np.arange(10), n_tokens=11)
    (tmp_path / "header.bin").write_bytes(b"\x00" * 100)
    (tmp_path / "nobins").mkdir()
    (tmp_path / "nobins" / "readme.txt").write_text("hi")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "train.bin").write_bytes(b"\x01\x00\x02")
    (tmp_path / "odd" / "val.bin").write_bytes(b"\x01\x00")
    (tmp_path / "noval").mkdir()
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "noval" / "train.bin")
    (tmp_path / "onlyval").mkdir()
    write_shard(tmp_path / "onlyval" / "fineweb_val_000000.bin", np.arange(10))
    for name, meta in (("metacount", {"dtype": "uint16", "vocab_size": 256, "train_tokens": 11, "val_tokens": 4}),
                       ("metadtype", {"dtype": "int8", "vocab_size": 256, "train_tokens": 10, "val_tokens": 4})):
        (tmp_path / name).mkdir()
        np.arange(10, dtype=np.uint16).tofile(tmp_path / name / "train.bin")
        np.arange(4, dtype=np.uint16).tofile(tmp_path / name / "val.bin")
        (tmp_path / name / "meta.json").write_text(json.dumps(meta))
    return {
        "missing": (tmp_path / "missing.txt", None),
        "empty file": (tmp_path / "empty.txt", None),
        "too short for the window": (tmp_path / "short.txt", 8),  # val holds 2 bytes
        "wrong magic": (tmp_path / "magic.bin", None),
        "wrong version": (tmp_path / "version.bin", None),
        "token count mismatch": (tmp_path / "count.bin", None),
        "shorter than the header": (tmp_path / "header.bin", None),
        "directory without bins": (tmp_path / "nobins", None),
        "odd-sized uint16 file": (tmp_path / "odd", None),
        "nanoGPT directory without val.bin": (tmp_path / "noval", None),
        "no train shards": (tmp_path / "onlyval", None),
        "pattern matching nothing": (tmp_path / "nothing_*.bin", None),
        "meta.json token count mismatch": (tmp_path / "metacount", None),
        "meta.json with an unknown dtype": (tmp_path / "metadtype", None),
    }


@pytest.mark.parametrize("case", [
    "missing", "empty file", "too short for the window", "wrong magic", "wrong version",
    "token count mismatch", "shorter than the header", "directory without bins",
    "odd-sized uint16 file", "nanoGPT directory without val.bin", "no train shards", "pattern matching nothing",
    "meta.json token count mismatch", "meta.json with an unknown dtype"])
def test_bad_input_raises_one_line_data_error_naming_the_file(tmp_path, case):
    path, seq_len = bad_inputs(tmp_path)[case]
    with pytest.raises(DataError) as info:
        load_dataset(str(path)).check(seq_len)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)), message


def test_check_accepts_exactly_one_window(tmp_path):
    path = tmp_path / "hundred.txt"
    path.write_bytes(b"x" * 100)  # 90 train, 10 val bytes
    ds = load_dataset(str(path))
    ds.check(9)
    with pytest.raises(DataError, match="val split has 10 tokens"):
        ds.check(10)


# ----------------------------------------------------------------------------
# data.py prepare: checked against an independent reference of the documented rules

DOCS = [f"Document {i}: " + "naïve café, " * (i % 7) + f"the end of {i}." for i in range(60)] + ["", "π ≈ 3.14159"]


def write_jsonl(path, texts, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"id": len(text), field: text}) + "\n")
        f.write("\n")  # a blank line is skipped
    return path


def goes_to_val(text, fraction):
    """The documented split rule: the first 4 bytes of the text's sha256 below fraction * 2**32."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "big") < fraction * 2**32


def reference_splits(texts, encode, fraction, eos=None, budget=None):
    """Each non-empty document's ids (+ eos), appended to its split, until the budget is spent."""
    splits, total = {"train": [], "val": []}, 0
    for text in texts:
        if not text:
            continue
        ids = list(encode(text)) + ([] if eos is None else [eos])
        if budget is not None:
            ids = ids[:budget - total]
        splits["val" if goes_to_val(text, fraction) else "train"] += ids
        total += len(ids)
        if total == budget:
            break
    return splits


def assert_prepared(directory, splits, dtype, vocab_size):
    """The files hold exactly the reference tokens in dtype, and load_dataset gives them back."""
    for name, ids in splits.items():
        assert len(ids) > 0
        raw = (directory / f"{name}.bin").read_bytes()
        assert raw == np.asarray(ids, dtype=dtype).tobytes()
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["dtype"] == np.dtype(dtype).name and meta["vocab_size"] == vocab_size
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(splits["train"]), len(splits["val"]))
    ds = load_dataset(str(directory))
    assert ds.train.dtype == dtype and ds.vocab_size == vocab_size
    assert ds.train.tolist() == splits["train"] and ds.val.tolist() == splits["val"]
    assert ds.fingerprint["dtype"] == np.dtype(dtype).name and ds.fingerprint["tokenizer"] == meta["tokenizer"]
    return ds, meta


def test_prepare_jsonl_as_bytes_from_the_command_line(tmp_path, capsys):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    data.main(["prepare", str(source), "--out", str(tmp_path / "out"), "--val-fraction", "0.3"])
    splits = reference_splits(DOCS, lambda t: t.encode("utf-8"), 0.3)
    ds, meta = assert_prepared(tmp_path / "out", splits, np.uint16, 256)
    n_val = sum(goes_to_val(t, 0.3) for t in DOCS if t)
    assert 0 < n_val < 61 and (meta["documents"], meta["val_documents"]) == (61, n_val)
    assert meta["tokenizer"] == "bytes" and meta["eos_id"] is None and meta["source"] == str(source)
    assert ds.byte_level and ds.decode(ds.encode("café")) == "café"  # bytes data samples from text prompts
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and f"{len(splits['train']):,} train" in out


def test_prepare_text_file_takes_paragraphs_as_documents(tmp_path):
    paragraphs = [f"Paragraph {i}, first line.\nSecond line of {i}.\n" + "\n" * (1 + i % 2) for i in range(40)]
    source = tmp_path / "book.txt"
    source.write_text("".join(paragraphs), encoding="utf-8")
    data.prepare(str(source), tmp_path / "out", "bytes", val_fraction=0.2, progress=False)
    assert_prepared(tmp_path / "out", reference_splits(paragraphs, str.encode, 0.2), np.uint16, 256)


def test_prepare_with_a_tokenizers_file_matches_its_own_encoding(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "</s>"], show_progress=False)
    tokenizer.train_from_iterator(DOCS, trainer)
    path = str(tmp_path / "tokenizer.json")
    tokenizer.save(path)
    source = write_jsonl(tmp_path / "docs.jsonl", DOCS, field="body")
    meta = data.prepare(source, tmp_path / "out", path, text_field="body", val_fraction=0.3, progress=False)
    eos = tokenizer.token_to_id("</s>")
    splits = reference_splits(DOCS, lambda t: tokenizer.encode(t).ids, 0.3, eos=eos)
    assert_prepared(tmp_path / "out", splits, np.uint16, tokenizer.get_vocab_size())
    assert meta["eos_id"] == eos and meta["tokenizer"] == path


def test_prepare_stops_at_the_token_budget(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    total = sum(len(t.encode()) for t in DOCS)
    for budget in (777, total + 1000):  # cut inside a document; more than the source holds
        out = tmp_path / f"out{budget}"
        meta = data.prepare(source, out, "bytes", max_tokens=budget, val_fraction=0.3, progress=False)
        splits = reference_splits(DOCS, str.encode, 0.3, budget=budget)
        assert_prepared(out, splits, np.uint16, 256)
        assert meta["train_tokens"] + meta["val_tokens"] == min(budget, total) and meta["max_tokens"] == budget


class FakeHubTokenizer:
    """Stands in for a transformers tokenizer with 70000 ids: above uint16."""
    eos_token_id, sep_token_id = 69999, None

    def __len__(self):
        return 70000

    def __call__(self, texts, add_special_tokens=True, verbose=True):
        assert add_special_tokens is False
        return {"input_ids": [self.encode(t) for t in texts]}

    @staticmethod
    def encode(text):
        return [60000 + ord(c) % 9999 for c in text]


def test_prepare_streams_a_hub_dataset_and_writes_uint32_above_65535_ids(tmp_path, monkeypatch):
    calls = []

    def load_dataset_stub(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"url": f"u{i}", "text": t} for i, t in enumerate(DOCS)])
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset_stub))
    monkeypatch.setitem(sys.modules, "transformers", types.SimpleNamespace(
        AutoTokenizer=types.SimpleNamespace(from_pretrained=lambda name: FakeHubTokenizer())))
    assert data.token_dtype(65536) == "uint16" and data.token_dtype(65537) == "uint32"

    meta = data.prepare("allenai/c4", tmp_path / "out", "t5-base", config="en", val_fraction=0.3, progress=False)
    assert calls == [("allenai/c4", "en", "train", True)]
    splits = reference_splits(DOCS, FakeHubTokenizer.encode, 0.3, eos=69999)
    assert_prepared(tmp_path / "out", splits, np.uint32, 70000)
    assert max(splits["train"]) > 65535
    assert (meta["config"], meta["split"], meta["tokenizer"]) == ("en", "train", "t5-base")


def prepare_failures(tmp_path):
    """(argv after `prepare`, the missing package or None) for each kind of bad input."""
    one_doc = "a single document"
    assert not goes_to_val(one_doc, 0.01)
    files = {"empty.jsonl": "", "blank.jsonl": '{"text": ""}\n\n', "bad.jsonl": "{not json\n",
             "field.jsonl": '{"body": "x"}\n', "one.jsonl": json.dumps({"text": one_doc}) + "\n",
             "tokenizer.json": "{}"}
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    (tmp_path / "folder").mkdir()
    docs = str(tmp_path / "one.jsonl")
    return {
        "missing file": ([str(tmp_path / "missing.jsonl")], None),
        "empty file": ([str(tmp_path / "empty.jsonl")], None),
        "only empty texts": ([str(tmp_path / "blank.jsonl")], None),
        "a line that is not JSON": ([str(tmp_path / "bad.jsonl")], None),
        "no text field": ([str(tmp_path / "field.jsonl")], None),
        "a directory as source": ([str(tmp_path / "folder")], None),
        "no validation document": ([docs, "--val-fraction", "0.01"], None),
        "missing tokenizer file": ([docs, "--tokenizer", str(tmp_path / "nothing.json")], None),
        "transformers not installed": ([docs, "--tokenizer", "t5-base"], "transformers"),
        "tokenizers not installed": ([docs, "--tokenizer", str(tmp_path / "tokenizer.json")], "tokenizers"),
        "datasets not installed": (["allenai/c4", "--config", "en"], "datasets"),
    }


@pytest.mark.parametrize("case", [
    "missing file", "empty file", "only empty texts", "a line that is not JSON", "no text field",
    "a directory as source", "no validation document", "missing tokenizer file",
    "transformers not installed", "tokenizers not installed", "datasets not installed"])
def test_prepare_bad_input_is_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys, case):
    args, package = prepare_failures(tmp_path)[case]
    if package:
        monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        data.main(["prepare", *args, "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("data.py: error: "), err
    if package:
        assert err.endswith(f"needs the '{package}' package: pip install {package}\n"), err
    assert not out.exists()  # nothing half-written left behind


def test_prepared_directory_trains(tmp_path):
    from test_train import run_train
    source = write_jsonl(tmp_path / "docs.jsonl", DOCS * 3)
    data.prepare(source, tmp_path / "data", "bytes", val_fraction=0.3, progress=False)
    result = run_train("--data", str(tmp_path / "data"), "--steps", "2", "--micro-batches", "1", "--batch-size", "2",
                       "--seq-len", "16", "--eval-batches", "1", "--sample-tokens", "0", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data_fingerprint"]["tokenizer"] == "bytes" and config["vocab_size"] == 256
