"""Tar shards of an ImageFolder, read by random access, so the step sampler (and its exact resume) works on them.

    python -m mae_et.data.shards ROOT OUT [--shard-size 1000]     # writes OUT/shard-00000.tar ... + index.json

ROOT is read as `data.root` is (`data_dir`: its `train/` when it has one); webdataset's layout (`<key>.jpg`, the
file's bytes, and `<key>.cls`) in the scan's order and class indices, so a run on the shards sees what a run on the
folder sees; `index.json` (wids' descriptor) last. Reading: `mae_et.data.shard_index`. Why by hand, and the write
rules: docs/design.md, "Tar shards".
"""

from __future__ import annotations

import io
import itertools
import json
import math
import tarfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace

from mae_et.data.folder import DataError, scan_image_folder
from mae_et.data.shard_index import IMAGE_EXT, INDEX_FILE, LABEL_EXT, ShardIndex, open_shards
from mae_et.data.sources import data_dir
from mae_et.files import (
    check_output_file,
    check_output_folder,
    one_line_on_full_disk,
    write_atomic,
    write_text_atomic,
)
from mae_et.notices import DataWarning

__all__ = ["ShardIndex", "main", "open_shards", "write_shards"]

SHARD_NAME = "shard-{:05d}.tar"


def folder_to_pack(root: str | Path, split: str = "train") -> Path:
    """The folder a run with `data.root=root data.split=split` pretrains on: the shards hold what it would read."""
    try:
        return data_dir(SimpleNamespace(root=str(root), split=split))
    except DataError as e:  # the rule's words name the config key; here it is the option
        raise DataError(str(e).replace("data.split", "--split")) from None
    except OSError as e:  # a root this user may not look into
        raise DataError(f"'{root}' cannot be read ({e.strerror or e}); give this user read access") from None


def write_shards(
    root: str | Path, out: str | Path, shard_size: int = 1000, overwrite: bool = False, split: str = "train"
) -> Path:
    """Every readable image the folder scan finds (in its order, with its class index) into tar shards of
    `shard_size` samples under `out`, and `out/index.json`; returns the index path. Skipped files are named in
    warnings and counted in the index."""
    if shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, got {shard_size}")
    out = check_output_folder(out, reads=[root], flag="output")
    folder = folder_to_pack(root, split)
    index = scan_image_folder(folder)
    names = [INDEX_FILE] + [SHARD_NAME.format(s) for s in range(math.ceil(len(index.samples) / shard_size))]
    for name in names:  # every file this run may write, before the work
        check_output_file(out / name, reads=[folder], overwrite=overwrite, flag="output")
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX_FILE).unlink(missing_ok=True)  # (--overwrite) the old set is no longer whole from here
    written: list[Path] = []
    unreadable: list[str] = []
    with one_line_on_full_disk(out):
        try:
            shards = _write_tars(_readable(index.samples, unreadable), out, shard_size, written)
            descriptor = {
                "wids_version": 1,
                "name": Path(root).name,
                "shardlist": shards,
                "classes": list(index.classes),
                "skipped_at_scan": len(index.skipped),
                "skipped_unreadable": len(unreadable),
            }
            return write_text_atomic(out / INDEX_FILE, json.dumps(descriptor, indent=1) + "\n")  # last: set whole
        except BaseException:
            for path in written:  # an unfinished set is no set: nothing of this run stays
                path.unlink(missing_ok=True)
            raise


def _readable(samples: Iterable[tuple[str, int]], unreadable: list[str]) -> Iterator[tuple[bytes, int]]:
    """(file bytes, label) of each sample; a file that cannot be read is named in a warning, counted, skipped."""
    for file, label in samples:
        try:
            data = Path(file).read_bytes()
        except OSError as e:
            warnings.warn(f"skipping '{file}': cannot be read ({e.strerror or e})", DataWarning, stacklevel=2)
            unreadable.append(file)
            continue
        yield data, label


def _write_tars(samples: Iterator[tuple[bytes, int]], out: Path, shard_size: int, written: list[Path]) -> list[dict]:
    """Shards of `shard_size` samples (the last one shorter), each written whole; their index entries."""
    shards: list[dict] = []
    first = 0  # the key of a shard's first sample: keys count samples over the whole set
    while (head := next(samples, None)) is not None:
        chunk = itertools.chain([head], itertools.islice(samples, shard_size - 1))
        path = out / SHARD_NAME.format(len(shards))
        counted: list[int] = []
        write_atomic(path, lambda tmp, c=chunk, f=first, n=counted: n.append(_write_tar(tmp, c, f)))
        written.append(path)
        shards.append({"url": path.name, "nsamples": counted[0]})
        first += counted[0]
    return shards


def _write_tar(path: Path, samples: Iterable[tuple[bytes, int]], first: int) -> int:
    n = 0
    with tarfile.open(path, "w") as tar:
        for n, (data, label) in enumerate(samples, start=1):
            key = f"{first + n - 1:09d}"
            for ext, payload in ((IMAGE_EXT, data), (LABEL_EXT, str(label).encode())):
                info = tarfile.TarInfo(key + ext)
                info.size, info.mtime, info.mode = len(payload), 0, 0o644  # no timestamps: same folder, same bytes
                tar.addfile(info, io.BytesIO(payload))
    return n


def main(argv: Sequence[str] | None = None, prog: str = "python -m mae_et.data.shards") -> int:
    from mae_et.cli import OneLineParser, run_user_command

    parser = OneLineParser(prog=prog, description="Write an ImageFolder as tar shards (webdataset layout) + index.json")
    parser.add_argument("root", help="ImageFolder root (class sub-folders of images), or a root of train/ and val/")
    parser.add_argument("out", help="output folder for shard-*.tar and index.json")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument(
        "--split", default="train", help="as data.split: the sub-folder of root to pack (default train, when present)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the shards of an earlier run in out")
    args = parser.parse_args(argv)

    def run() -> None:
        index_path = write_shards(args.root, args.out, args.shard_size, args.overwrite, args.split)
        d = json.loads(Path(index_path).read_text())
        n = sum(s["nsamples"] for s in d["shardlist"])
        skipped = d["skipped_unreadable"]
        print(
            f"wrote {n} samples of {len(d['classes'])} classes in {len(d['shardlist'])} shards: {index_path}"
            + (f" ({skipped} unreadable files skipped, named above)" if skipped else "")
        )

    run_user_command(run)
    return 0


if __name__ == "__main__":
    main()
