"""Tar shards (mae_et.data.shards): written from an ImageFolder, read by random access from a folder or a URL,
the same crops as the folder's files, every sample once per epoch over two processes, a corrupt sample counted,
and webdataset reads the same shards."""

from __future__ import annotations

import functools
import http.server
import json
import shlex
import shutil
import subprocess
import sys
import threading

import pytest
import torch
from helpers import (
    MINI,
    MOUNT,
    REPO,
    copy_mini_classes,
    mains_command,
    namespace_prefix,
    plain_user_prefix,
    split_mains,
    write_broken,
)

from mae_et.data.folder import DataError, PretrainDataset, scan_image_folder
from mae_et.data.shards import main as shards_main
from mae_et.data.shards import open_shards, write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """(the mini train folder's index, its shards' index), 64 samples per shard (4 shards, the last one short)."""
    out = tmp_path_factory.mktemp("shards") / "mini"
    write_shards(MINI / "train", out, shard_size=64)
    return scan_image_folder(MINI / "train"), open_shards(out, tmp_path_factory.mktemp("cache"))


def same_crops(a: PretrainDataset, b: PretrainDataset, keys) -> bool:
    return all(torch.equal(a[k]["image"], b[k]["image"]) and a[k]["label"] == b[k]["label"] for k in keys)


def test_shards_hold_every_image_in_the_folders_order_and_give_the_same_crops(shards):
    folder, sharded = shards
    assert len(sharded.samples) == len(folder.samples) and sharded.classes == folder.classes
    assert [s["nsamples"] for s in sharded.shards] == [64, 64, 64, len(folder.samples) - 192]
    a, b = PretrainDataset(sharded, crop_size=64), PretrainDataset(folder, crop_size=64)
    assert same_crops(a, b, [(i, 7 * i + 1) for i in range(len(folder.samples))])
    assert same_crops(a, b, [(i, 5, 32) for i in range(0, len(folder.samples), 7)])  # decode_size=stage keys too


def test_webdataset_reads_the_same_samples(shards):
    """The layout is webdataset's: its own reader sees our keys, the files' bytes as they were and the labels."""
    wds = pytest.importorskip("webdataset")
    folder, sharded = shards
    first = sharded.shard_path(0)
    samples = list(wds.WebDataset(str(first), shardshuffle=False))
    assert len(samples) == 64
    for k, sample in enumerate(samples):
        path, label = folder.samples[k]
        assert sample["jpg"] == open(path, "rb").read() and int(sample["cls"]) == label


def test_shards_behind_a_url_are_fetched_once_into_the_cache(shards, tmp_path):
    folder, sharded = shards
    served = tmp_path / "served"
    shutil.copytree(sharded.shard_path(0).parent, served)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        remote = open_shards(url, tmp_path / "cache")
        keys = [(i, i) for i in range(0, len(folder.samples), 5)]
        assert same_crops(PretrainDataset(remote, crop_size=48), PretrainDataset(folder, crop_size=48), keys)
    finally:
        server.shutdown()
        server.server_close()
    assert len(list((tmp_path / "cache").rglob("shard-*.tar"))) == 4  # every shard fetched, kept
    fresh = PretrainDataset(remote, crop_size=48)  # the server is gone: the samples come from the cache
    assert same_crops(fresh, PretrainDataset(folder, crop_size=48), [(3, 1), (200, 2)])


def test_a_corrupt_sample_is_skipped_named_and_counted_once(tmp_path):
    (c0,) = copy_mini_classes(tmp_path / "data", 1, 6)
    write_broken(c0, "truncated.JPEG")
    write_shards(tmp_path / "data", tmp_path / "shards", shard_size=4)
    ds = PretrainDataset(open_shards(tmp_path / "shards", tmp_path / "cache"), crop_size=32)
    bad = [k for k, (path, _) in enumerate(scan_image_folder(tmp_path / "data").samples) if "truncated" in path]
    with pytest.warns(UserWarning, match=r"cannot decode 'shard-00001.tar#\d'"):
        first = ds[(bad[0], 1)]
    assert len(first["bad_files"]) == 1 and first["bad_files"][0].startswith("shard-")
    assert ds[(bad[0], 2)]["bad_files"] == ()  # known bad: replaced again, not counted again


EPOCH_OF_A_RANK = """
import json, sys
from types import SimpleNamespace
import torch
from mae_et.data.sources import open_source
d = SimpleNamespace(source="shards", root=sys.argv[1], shard_cache=sys.argv[2], crop_size=32, scale=(0.2, 1.0),
                    hflip=True, strict=False, num_workers=1, pin_memory=False, pipeline="loader")
src = open_source(d, seed=0, main=True, device=torch.device("cpu"))
labels = []
for batch in src.batches(int(sys.argv[3]), 2, 4, 0, len(src.dataset) // 8):
    labels += batch.labels.tolist()
print(json.dumps(labels))
"""


def test_two_processes_see_every_sample_once_per_epoch(tmp_path):
    """One image per class, so a label names its sample: two real processes (ranks 0 and 1 of 2, each with a
    loader worker reading the shards) cover the whole set in one epoch, without overlap."""
    data = tmp_path / "data"
    for n, src in enumerate(sorted((MINI / "train").rglob("*.JPEG"))[:24]):
        (data / f"c{n:02d}").mkdir(parents=True)
        shutil.copy(src, data / f"c{n:02d}" / src.name)
    write_shards(data, tmp_path / "shards", shard_size=5)
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", EPOCH_OF_A_RANK, str(tmp_path / "shards"), str(tmp_path / "cache"), str(rank)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    seen = []
    for p in runs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        seen.append(json.loads(out.strip().splitlines()[-1]))
    assert len(seen[0]) == len(seen[1]) == 12 and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(24))


def test_the_command_writes_once_and_says_so(tmp_path, capsys):
    assert shards_main([str(MINI / "train"), str(tmp_path / "s"), "--shard-size", "100"]) == 0
    assert "wrote 240 samples of 10 classes in 3 shards" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        shards_main([str(MINI / "train"), str(tmp_path / "s")])
    assert e.value.code == 2 and "index.json' exists; pass --overwrite" in capsys.readouterr().err
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert index["wids_version"] == 1 and [s["nsamples"] for s in index["shardlist"]] == [100, 100, 40]
    with pytest.raises(DataError, match="no shard index"):
        open_shards(tmp_path, tmp_path / "cache")


def test_the_writer_never_replaces_a_file_without_overwrite(tmp_path, capsys):
    """A folder that holds a shard's name but no index.json (a user's file, an earlier set cut short) keeps it."""
    (c0,) = copy_mini_classes(tmp_path / "data", 1, 3)
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-00000.tar").write_bytes(b"someone's file")
    with pytest.raises(SystemExit) as e:
        shards_main([str(tmp_path / "data"), str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "shard-00000.tar' exists; pass --overwrite" in err, err
    assert (out / "shard-00000.tar").read_bytes() == b"someone's file" and not (out / "index.json").exists()
    assert shards_main([str(tmp_path / "data"), str(out), "--overwrite"]) == 0
    assert len(open_shards(out, tmp_path / "cache").samples) == 3


def test_a_root_of_train_and_val_is_packed_from_train(tmp_path, capsys):
    """As data.root does for pretraining: ROOT/train, never val as a class."""
    copy_mini_classes(tmp_path / "root" / "train", 2, 3)
    copy_mini_classes(tmp_path / "root" / "val", 2, 1)
    write_shards(tmp_path / "root", tmp_path / "out")
    packed = open_shards(tmp_path / "out", tmp_path / "cache")
    assert packed.classes == scan_image_folder(tmp_path / "root" / "train").classes and len(packed.samples) == 6
    with pytest.raises(SystemExit) as e:  # a root of splits without train/: one line naming the option
        shards_main([str(tmp_path / "root"), str(tmp_path / "o2"), "--split", "test"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--split" in err and "data.split" not in err, err


def write_index(folder, shardlist):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.json").write_text(json.dumps({"wids_version": 1, "shardlist": shardlist, "classes": ["a"]}))
    return folder


@pytest.mark.parametrize(
    "entry, says",
    [
        ({"url": "../elsewhere/shard-00000.tar", "nsamples": 1}, "inside"),
        ({"url": "sub/../../shard-00000.tar", "nsamples": 1}, "inside"),
        ({"url": "/etc/passwd", "nsamples": 1}, "inside"),
        ({"url": "file:///etc/passwd", "nsamples": 1}, "inside"),
        ({"url": "http://elsewhere.example/shard-00000.tar", "nsamples": 1}, "inside"),
        ({"nsamples": 1}, "url"),
        ({"url": 7, "nsamples": 1}, "url"),
        ({"url": "shard-00000.tar", "nsamples": -1}, "nsamples"),
        ({"url": "shard-00000.tar", "nsamples": 2.5}, "nsamples"),
        ({"url": "shard-00000.tar", "nsamples": "3"}, "nsamples"),
        ({"url": "shard-00000.tar", "nsamples": True}, "nsamples"),
        ({"url": "shard-00000.tar"}, "nsamples"),
        ("shard-00000.tar", "entry"),
    ],
)
def test_index_entries_stay_inside_their_folder_and_their_fields_are_checked(tmp_path, entry, says):
    folder = write_index(tmp_path / "set", [{"url": "shard-00001.tar", "nsamples": 2}, entry])
    with pytest.raises(DataError) as e:
        open_shards(folder, tmp_path / "cache")
    message = str(e.value)
    assert "\n" not in message and str(folder / "index.json") in message and "entry 1" in message, message
    assert says in message, message


def test_an_index_served_over_http_may_not_point_at_local_files(tmp_path):
    """urljoin(base, 'file:///...') is the local file: refused before anything is fetched."""
    served = write_index(tmp_path / "served", [{"url": "file:///etc/hostname", "nsamples": 1}])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(DataError, match="entry 0"):
            open_shards(f"http://127.0.0.1:{server.server_address[1]}/", tmp_path / "cache")
    finally:
        server.shutdown()
        server.server_close()
    assert not (tmp_path / "cache").exists()


def test_a_full_disk_ends_in_one_line_and_leaves_no_shard(tmp_path):
    """The mini train split (about 3 MB) into a 300 KB tmpfs: the shards already written go with the failure, so
    the same command runs again once there is space (no file of this run blocks it)."""
    prefix = namespace_prefix()
    if prefix is None:
        pytest.skip("cannot mount a small tmpfs here (needs root or unprivileged user namespaces)")
    disk = tmp_path / "small"
    disk.mkdir()
    write = [sys.executable, "-m", "mae_et.data.shards", str(MINI / "train"), str(disk / "out"), "--shard-size", "5"]
    script = (
        f"{MOUNT.format(size='300k', dir=shlex.quote(str(disk)))} && {shlex.join(write)}; "
        f"echo rc=$?; find {shlex.quote(str(disk))} -mindepth 1"
    )
    proc = subprocess.run([*prefix, "sh", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert "rc=2" in proc.stdout.splitlines(), proc.stdout + proc.stderr
    assert err[-1].startswith(f"error: no space left on device while writing '{disk / 'out'}'"), proc.stderr
    assert not any(line.startswith("Traceback") for line in err), proc.stderr
    assert [line for line in proc.stdout.splitlines() if line.startswith(str(disk))] == [str(disk / "out")]


def test_unreadable_files_and_class_folders_are_skipped_and_counted_an_unreadable_root_is_one_line(tmp_path):
    """As a user who is not root: a file and a class folder they may not read are skipped with a warning each and
    counted in index.json; a root they may not read is one line (both runs of the writer in one process)."""
    prefix = plain_user_prefix(tmp_path)
    if prefix is None:
        pytest.skip("cannot run as a user whom file permissions bind (setpriv missing or not allowed)")
    a, b, _ = copy_mini_classes(tmp_path / "data", 3, 2)
    copy_mini_classes(tmp_path / "locked", 1, 1)
    locked_file = sorted(a.iterdir())[0]
    locked_file.chmod(0)
    b.chmod(0)
    (tmp_path / "locked").chmod(0)
    runs = [[str(tmp_path / "data"), str(tmp_path / "out")], [str(tmp_path / "locked"), str(tmp_path / "out2")]]
    try:
        proc = subprocess.run(
            [*prefix, *mains_command("mae_et.data.shards", runs)], cwd=REPO, capture_output=True, text=True, timeout=300
        )
        written, refused = split_mains(proc.stdout, proc.stderr)
        assert written.returncode == 0, written.stderr
        assert f"'{locked_file}'" in written.stderr and f"'{b}'" in written.stderr, written.stderr
        index = json.loads((tmp_path / "out" / "index.json").read_text())
        assert sum(s["nsamples"] for s in index["shardlist"]) == 3 and index["skipped_unreadable"] == 1
        assert index["skipped_at_scan"] == 1  # the class folder
        err = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(err) == 1 and str(tmp_path / "locked") in err[0], refused.stderr
        assert "cannot be read" in err[0] and not (tmp_path / "out2").exists()
    finally:
        (tmp_path / "locked").chmod(0o755)
        b.chmod(0o755)
