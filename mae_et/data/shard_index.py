"""Reading a shard set written by `python -m mae_et.data.shards` (`data.source=shards`): its index.json, checked,
and its samples by random access.

`data.root=` the folder, its index.json, or an http(s) URL of it; a shard behind a URL is downloaded once into
`data.shard_cache` (atomically). Each shard's member offsets are read from its tar headers once per process, then a
sample is one seek and one read. index.json is checked before any shard is opened: every entry a shard file beside
it (no `..`, `/` or scheme, which `urljoin` would follow off the server) and a sample count, else one line.
"""

from __future__ import annotations

import bisect
import io
import json
import os
import tarfile
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mae_et.data.folder import DataError
from mae_et.files import write_atomic

__all__ = ["INDEX_FILE", "IMAGE_EXT", "LABEL_EXT", "ShardIndex", "open_shards"]

INDEX_FILE = "index.json"
IMAGE_EXT, LABEL_EXT = ".jpg", ".cls"
_REWRITE = "re-write the shards (python -m mae_et.data.shards)"


def _is_url(location: str) -> bool:
    return urllib.parse.urlparse(location).scheme in ("http", "https")


def _read_text(location: str) -> str:
    if _is_url(location):
        with urllib.request.urlopen(location, timeout=60) as r:  # noqa: S310 - http(s) only (checked above)
            return r.read().decode()
    return Path(location).read_text()


def _entry_problem(entry: Any) -> str | None:
    """What is wrong with one shardlist entry, or None: a shard file name inside the index's folder, and a count."""
    if not isinstance(entry, dict):
        return "is not an object with a url and nsamples"
    url = entry.get("url")
    if not isinstance(url, str) or not url:
        return "has no url (the shard's file name beside index.json)"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme or parts.netloc or url.startswith(("/", "\\")) or ".." in urllib.parse.unquote(url).split("/"):
        return "points outside the index's folder: a url is a file name beside index.json (no '..', '/' or scheme)"
    n = entry.get("nsamples")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        return "needs nsamples, a non-negative integer (the shard's sample count)"
    return None


def _checked(descriptor: Any, location: str) -> tuple[list[dict], list[str]]:
    """(shardlist, classes) of an index.json, every field checked; a DataError naming the file and the entry."""
    where = f"shard index '{location}'"
    shards = descriptor.get("shardlist") if isinstance(descriptor, dict) else None
    if not isinstance(shards, list):
        raise DataError(f"{where} has no shardlist (a list of shard url and nsamples); {_REWRITE}")
    for i, entry in enumerate(shards):
        problem = _entry_problem(entry)
        if problem is not None:
            shown = json.dumps(entry)
            shown = shown if len(shown) <= 120 else shown[:117] + "..."
            raise DataError(f"{where}: entry {i} ({shown}) {problem}; {_REWRITE}")
    classes = descriptor.get("classes") or []
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{where}: classes must be a list of class names; {_REWRITE}")
    return shards, classes


@dataclass
class ShardIndex:
    """The samples of a shard set, as ImageFolderIndex gives them (`samples[i]` = (name, class index)), read from
    the shards by `read(i)`. Picklable before first use (DataLoader workers open their own files)."""

    root: str  # where index.json was read (a folder or a URL), for messages
    base: str  # what the shard urls are relative to
    shards: list[dict]
    classes: list[str]
    cache: Path
    skipped: list = field(default_factory=list)
    _offsets: dict = field(default_factory=dict, repr=False)  # shard -> {key: (image offset, size, label)}
    _files: dict = field(default_factory=dict, repr=False)
    _pid: int = -1

    def __post_init__(self) -> None:
        self._starts = [0]
        for s in self.shards:
            self._starts.append(self._starts[-1] + s["nsamples"])
        self.samples = _Samples(self)

    def locate(self, i: int) -> tuple[int, int]:
        """Global sample index -> (shard, position in the shard)."""
        s = bisect.bisect_right(self._starts, i) - 1
        return s, i - self._starts[s]

    def shard_path(self, s: int) -> Path:
        url = self.shards[s]["url"]
        if _is_url(self.base):
            remote = urllib.parse.urljoin(self.base, url)
            local = self.cache / urllib.parse.quote(remote, safe="") / Path(url).name
            if not local.is_file():
                local.parent.mkdir(parents=True, exist_ok=True)
                with urllib.request.urlopen(remote, timeout=600) as r:  # noqa: S310 - http(s) only
                    data = r.read()
                write_atomic(local, lambda tmp: tmp.write_bytes(data))
            return local
        return Path(self.base) / url

    def _members(self, s: int) -> list[tuple[int, int, int]]:
        """(image offset, image size, label) of each sample of shard s, in order, from its tar headers."""
        if s not in self._offsets:
            entries: dict[str, dict] = {}
            path = self.shard_path(s)
            try:
                with tarfile.open(path) as tar:
                    for m in tar:
                        key, ext = os.path.splitext(m.name)
                        if ext == IMAGE_EXT:
                            entries.setdefault(key, {})["image"] = (m.offset_data, m.size)
                        elif ext == LABEL_EXT:
                            entries.setdefault(key, {})["label"] = int(tar.extractfile(m).read())
            except (OSError, tarfile.TarError, ValueError) as e:
                raise DataError(
                    f"shard '{path}' is unreadable ({type(e).__name__}: {e}); re-write or re-fetch it"
                ) from None
            members = [(*v["image"], v["label"]) for _, v in sorted(entries.items()) if {"image", "label"} <= set(v)]
            if len(members) != self.shards[s]["nsamples"]:
                raise DataError(
                    f"shard '{path}' holds {len(members)} samples, its index says {self.shards[s]['nsamples']}; "
                    + _REWRITE
                )
            self._offsets[s] = members
        return self._offsets[s]

    def label(self, i: int) -> int:
        s, k = self.locate(i)
        return self._members(s)[k][2]

    def read(self, i: int) -> io.BytesIO:
        """The image bytes of sample i, as a file object for PIL."""
        if self._pid != os.getpid():  # a fresh process (a DataLoader worker): its own file handles
            self._files, self._pid = {}, os.getpid()
        s, k = self.locate(i)
        offset, size, _ = self._members(s)[k]
        f = self._files.get(s)
        if f is None:
            f = self._files[s] = open(self.shard_path(s), "rb")  # noqa: SIM115 - kept open for the process's life
        f.seek(offset)
        return io.BytesIO(f.read(size))

    def name(self, i: int) -> str:
        s, k = self.locate(i)
        return f"{self.shards[s]['url']}#{k}"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = {}, -1  # file handles do not travel
        return state


class _Samples(Sequence):
    """`index.samples` of a shard set: (name, label) per sample, read lazily."""

    def __init__(self, index: ShardIndex):
        self.index = index

    def __len__(self) -> int:
        return self.index._starts[-1]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.index.name(i), self.index.label(i)


def open_shards(location: str | Path, cache: str | Path) -> ShardIndex:
    """A shard set from its folder, its index.json, or an http(s) URL of either; one-line DataError otherwise."""
    location = str(location)
    if not _is_url(location) and Path(location).is_dir():
        location = str(Path(location) / INDEX_FILE)
    if _is_url(location) and not location.endswith(".json"):
        location = location.rstrip("/") + "/" + INDEX_FILE
    try:
        descriptor = json.loads(_read_text(location))
    except (OSError, ValueError) as e:
        raise DataError(
            f"no shard index at '{location}' ({type(e).__name__}: {e}); pass data.root=<folder or URL of index.json> "
            "written by python -m mae_et.data.shards"
        ) from None
    shards, classes = _checked(descriptor, location)
    if sum(s["nsamples"] for s in shards) == 0:
        raise DataError(f"shard index '{location}' lists no samples")
    base = location.rsplit("/", 1)[0] + "/" if _is_url(location) else str(Path(location).parent)
    return ShardIndex(root=location, base=base, shards=shards, classes=classes, cache=Path(cache).expanduser())
