"""Training corpus for dgopt's own small code models.

The corpus is the pure-Python source of the running interpreter's standard
library (``sysconfig.get_paths()["stdlib"]``), without test suites, caches,
installed third-party packages, generated codec tables and other data-like
files.  Everything here is deterministic: files are listed in sorted relative
POSIX order and the train/validation split is a stable hash of the relative
path, so the split never changes when files are added or removed elsewhere.

An optional larger corpus (``"stdlib+deps"``, used by ``code-small``) appends
the ``.py`` sources of a few pinned packages from site-packages.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

#: Directory names (any path component) that are skipped entirely.
EXCLUDED_DIRS = frozenset(
    {
        "test",
        "tests",
        "testing",
        "idle_test",
        "testmock",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "pydoc_data",  # one 750 kB string of documentation, not code
        "turtledemo",
        "config-3.11-x86_64-linux-gnu",
        "lib-dynload",
    }
)

#: Docstring marker of the character-mapping codec tables (pure data).
_CODEC_TABLE_MARKER = "Python Character Mapping Codec"

#: Fraction (per mille) of files that go to the validation split.
VAL_PER_MILLE = 35

#: Separator placed between files by :func:`read_text`.
FILE_SEPARATOR = "\n\n"

#: Extra packages whose sources form the larger ``stdlib+deps`` corpus.
EXTRA_PACKAGES = ("torch", "transformers", "tokenizers", "numpy", "rich")


@dataclass(frozen=True)
class CorpusFile:
    """One source file: its absolute path and a stable corpus-relative key."""

    path: Path
    key: str  # e.g. "stdlib/asyncio/base_events.py" or "torch/nn/modules/linear.py"

    def __fspath__(self) -> str:  # lets CorpusFile be used where a path is expected
        return str(self.path)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded(rel: Path) -> bool:
    parts = rel.parts
    if any(p in EXCLUDED_DIRS for p in parts[:-1]):
        return True
    name = parts[-1]
    if name.startswith("_sysconfigdata_"):  # machine specific
        return True
    if name.startswith("test_") or name == "conftest.py":
        return True
    return False


def _is_generated_codec(path: Path, rel: Path) -> bool:
    if not rel.parts or rel.parts[0] != "encodings":
        return False
    try:
        head = path.read_text(encoding="utf-8", errors="replace")[:400]
    except OSError:
        return True
    return _CODEC_TABLE_MARKER in head


def _scan(root: Path, prefix: str) -> list[CorpusFile]:
    out: list[CorpusFile] = []
    if not root.is_dir():
        return out
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _excluded(rel) or not path.is_file():
            continue
        if prefix == "stdlib" and _is_generated_codec(path, rel):
            continue
        out.append(CorpusFile(path, f"{prefix}/{rel.as_posix()}"))
    return out


def _package_root(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def corpus_files(corpus: str = "stdlib") -> list[CorpusFile]:
    """All corpus files, sorted by their relative key.

    ``corpus`` is ``"stdlib"`` (default) or ``"stdlib+deps"`` (adds the sources
    of :data:`EXTRA_PACKAGES` found in site-packages).
    """
    if corpus not in ("stdlib", "stdlib+deps"):
        raise ValueError(f"unknown corpus {corpus!r} (expected 'stdlib' or 'stdlib+deps')")
    return list(_corpus_files(corpus, str(stdlib_root())))


@functools.lru_cache(maxsize=4)
def _corpus_files(corpus: str, stdlib: str) -> tuple[CorpusFile, ...]:
    files = _scan(Path(stdlib), "stdlib")
    if corpus == "stdlib+deps":
        for pkg in EXTRA_PACKAGES:
            root = _package_root(pkg)
            if root is not None:
                files.extend(_scan(root, pkg))
    files.sort(key=lambda f: f.key)
    return tuple(files)


def is_validation(key: str) -> bool:
    """Stable assignment of a file to the validation split (~3.5% of files)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < VAL_PER_MILLE


def split_files(
    corpus: str = "stdlib", limit_bytes: int | None = None
) -> tuple[list[CorpusFile], list[CorpusFile]]:
    """(train, validation) files, disjoint, each in sorted key order.

    ``limit_bytes`` keeps only a deterministic prefix of each split (about
    ``limit_bytes`` of train sources and a tenth of that, but at least one
    file, of validation sources) -- for tests and smoke runs.
    """
    files = corpus_files(corpus)
    train = [f for f in files if not is_validation(f.key)]
    val = [f for f in files if is_validation(f.key)]
    if limit_bytes is not None:
        train = _take_bytes(train, limit_bytes)
        val = _take_bytes(val, max(1, limit_bytes // 10))
    return train, val


def _take_bytes(files: Sequence[CorpusFile], limit: int) -> list[CorpusFile]:
    out: list[CorpusFile] = []
    total = 0
    for f in files:
        if out and total >= limit:
            break
        out.append(f)
        total += f.path.stat().st_size
    return out


def read_file(f: CorpusFile | Path) -> str:
    path = f.path if isinstance(f, CorpusFile) else Path(f)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.replace("\r\n", "\n")


def iter_texts(files: Iterable[CorpusFile | Path]) -> Iterable[str]:
    for f in files:
        yield read_file(f)


def read_text(files: Iterable[CorpusFile | Path], sep: str = FILE_SEPARATOR) -> str:
    """The files' texts joined with ``sep``."""
    return sep.join(iter_texts(files))


def fingerprint(files: Iterable[CorpusFile]) -> str:
    """Short sha256 over keys and contents: identifies the exact corpus used."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.key.encode("utf-8") + b"\0")
        h.update(f.path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def describe(corpus: str = "stdlib") -> dict:
    train, val = split_files(corpus)
    info = {
        "corpus": corpus,
        "stdlib": str(stdlib_root()),
        "train_files": len(train),
        "val_files": len(val),
        "train_bytes": sum(f.path.stat().st_size for f in train),
        "val_bytes": sum(f.path.stat().st_size for f in val),
        "fingerprint": fingerprint(train + val),
    }
    if corpus == "stdlib+deps":
        versions = {}
        for pkg in EXTRA_PACKAGES:
            try:
                versions[pkg] = importlib.metadata.version(pkg)
            except importlib.metadata.PackageNotFoundError:
                pass
        info["packages"] = versions
    return info
