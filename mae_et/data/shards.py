"""Tar shards of an ImageFolder, read by random access, so the step sampler (and its exact resume) works on them.

    python -m mae_et.data.shards IMAGEFOLDER OUT [--shard-size 1000]     # writes OUT/shard-00000.tar ... + index.json

The layout is webdataset's: each sample is `<key>.jpg` (the file's bytes as they are: no re-encoding) and `<key>.cls`
(its class index as text) next to each other in a tar; samples keep the folder scan's order and class indices, so a
run on the shards sees the images a run on the folder sees, in the same order. `index.json` lists the shards with
their sample counts (the descriptor format of webdataset's indexed reader, wids) and the class names.

Reading (`data.source=shards`, `data.root=` the folder, its index.json, or an http(s) URL of it): each shard's
member offsets are read from its tar headers once per process, then a sample is one seek and one read. A shard
behind a URL is downloaded once into `data.shard_cache` (atomically: a killed download leaves nothing) and read
from there. Written by hand (about 150 lines, stdlib tarfile and urllib): webdataset 1.0 streams shards in order
and has no random access (its indexed reader, wids, was left out of the 1.0 package), and without random access a
resumed run cannot start at a micro-step; docs/libraries.md has the comparison.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mae_et.data.folder import DataError, scan_image_folder
from mae_et.files import check_output_folder, write_atomic, write_text_atomic

__all__ = ["ShardIndex", "main", "open_shards", "write_shards"]

INDEX_FILE = "index.json"
SHARD_NAME = "shard-{:05d}.tar"
IMAGE_EXT, LABEL_EXT = ".jpg", ".cls"


def write_shards(root: str | Path, out: str | Path, shard_size: int = 1000, overwrite: bool = False) -> Path:
    """Every image the folder scan finds (in its order, with its class index) into tar shards of `shard_size`
    samples under `out`, and `out/index.json`; returns the index path. Files the scan skips are named by it."""
    if shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, got {shard_size}")
    out = check_output_folder(out, reads=[root], flag="output")
    if (out / INDEX_FILE).exists() and not overwrite:
        raise DataError(
            f"'{out}' already holds {INDEX_FILE}; pass --overwrite to replace the shards, or another folder"
        )
    index = scan_image_folder(root)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for s, start in enumerate(range(0, len(index.samples), shard_size)):
        chunk = index.samples[start : start + shard_size]
        name = SHARD_NAME.format(s)
        write_atomic(out / name, lambda tmp, c=chunk, first=start: _write_tar(tmp, c, first))
        shards.append({"url": name, "nsamples": len(chunk)})
    descriptor = {
        "wids_version": 1,
        "name": Path(root).name,
        "shardlist": shards,
        "classes": list(index.classes),
        "skipped_at_scan": len(index.skipped),
    }
    return write_text_atomic(out / INDEX_FILE, json.dumps(descriptor, indent=1) + "\n")  # last: the set is whole


def _write_tar(path: Path, samples: Sequence[tuple[str, int]], first: int) -> None:
    with tarfile.open(path, "w") as tar:
        for n, (file, label) in enumerate(samples):
            key = f"{first + n:09d}"
            for ext, data in ((IMAGE_EXT, Path(file).read_bytes()), (LABEL_EXT, str(label).encode())):
                info = tarfile.TarInfo(key + ext)
                info.size, info.mtime, info.mode = len(data), 0, 0o644  # no timestamps: the same folder, the same bytes
                tar.addfile(info, io.BytesIO(data))


def _is_url(location: str) -> bool:
    return urllib.parse.urlparse(location).scheme in ("http", "https")


def _read_text(location: str) -> str:
    if _is_url(location):
        with urllib.request.urlopen(location, timeout=60) as r:  # noqa: S310 - http(s) only (checked above)
            return r.read().decode()
    return Path(location).read_text()


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
            self._starts.append(self._starts[-1] + int(s["nsamples"]))
        self.samples = _Samples(self)

    def locate(self, i: int) -> tuple[int, int]:
        """Global sample index -> (shard, position in the shard)."""
        import bisect

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
            if len(members) != int(self.shards[s]["nsamples"]):
                raise DataError(
                    f"shard '{path}' holds {len(members)} samples, its index says {self.shards[s]['nsamples']}; "
                    "re-write the shards (python -m mae_et.data.shards)"
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
        shards, classes = list(descriptor["shardlist"]), list(descriptor.get("classes") or [])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"no shard index at '{location}' ({type(e).__name__}: {e}); pass data.root=<folder or URL of index.json> "
            "written by python -m mae_et.data.shards"
        ) from None
    if not shards or sum(int(s["nsamples"]) for s in shards) == 0:
        raise DataError(f"shard index '{location}' lists no samples")
    base = location.rsplit("/", 1)[0] + "/" if _is_url(location) else str(Path(location).parent)
    return ShardIndex(root=location, base=base, shards=shards, classes=classes, cache=Path(cache).expanduser())


def main(argv: Sequence[str] | None = None, prog: str = "python -m mae_et.data.shards") -> int:
    from mae_et.cli import OneLineParser, run_user_command

    parser = OneLineParser(prog=prog, description="Write an ImageFolder as tar shards (webdataset layout) + index.json")
    parser.add_argument("root", help="ImageFolder root (class sub-folders of images)")
    parser.add_argument("out", help="output folder for shard-*.tar and index.json")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards of an earlier run in out")
    args = parser.parse_args(argv)

    def run() -> None:
        index_path = write_shards(args.root, args.out, args.shard_size, args.overwrite)
        d = json.loads(Path(index_path).read_text())
        n = sum(s["nsamples"] for s in d["shardlist"])
        print(f"wrote {n} samples of {len(d['classes'])} classes in {len(d['shardlist'])} shards: {index_path}")

    run_user_command(run)
    return 0


if __name__ == "__main__":
    main()
