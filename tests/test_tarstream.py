"""The tar reader against webdataset's grouping (all three tar formats), and its errors."""

from __future__ import annotations

import io
import tarfile

import pytest
import webdataset as wds

from pipelines.tarstream import TarFormatError, _number, split_name, tar_samples

LONG_DIR = "d" * 120  # beyond ustar's 100-byte name: prefix, GNU long name or pax path


def _write(path, members, fmt):
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            if data is None:
                info = tarfile.TarInfo(name)
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


MEMBERS = [
    ("sub", None),
    ("sub/a.jpg", b"\xff\xd8 jpeg a"),
    ("sub/a.json", b'{"id": 1}'),
    ("sub/a.seg.PNG", b"seg"),
    ("__meta__", b"skipped"),
    ("noext", b"skipped too"),
    (f"{LONG_DIR}/b.jpg", b"b" * 1000),
    (f"{LONG_DIR}/b.json", b"{}"),
    ("c.json", b""),  # an empty member
    ("c.txt", b"x" * 512),  # exactly one block: no padding
]


def _ours(urls, errors=None):
    def handler(err):
        if errors is None:
            return False
        errors.append(err)
        return True

    return list(tar_samples([{"url": str(u)} for u in urls], handler))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_samples_equal_webdataset_grouping(tmp_path, fmt):
    members = [*MEMBERS, (f"{'p' * 90}/{'q' * 40}/e.jpg", b"e")]  # ustar: prefix + name
    _write(tmp_path / "s.tar", members, fmt)
    theirs = list(
        wds.DataPipeline(wds.SimpleShardList([str(tmp_path / "s.tar")]), wds.tarfile_to_samples())
    )
    ours = _ours([tmp_path / "s.tar"])
    assert ours == theirs
    assert [s["__key__"] for s in ours] == ["sub/a", f"{LONG_DIR}/b", "c", members[-1][0][:-4]]
    assert ours[0]["seg.png"] == b"seg" and ours[1]["jpg"] == b"b" * 1000


def test_numbers_octal_and_base256():
    assert _number(b"0000644\0") == 0o644
    assert _number(b"  17 \0\0\0") == 0o17
    assert _number(b"\x80" + (5_000_000_000).to_bytes(11, "big")) == 5_000_000_000
    assert _number(b"\xff" * 12) == -1
    assert _number(b"\0" * 8) == 0


def test_split_name_like_webdataset():
    assert split_name("a/b/x.y.JPG") == ("a/b/x", "y.jpg")
    assert split_name("x.d/y.json") == ("x.d/y", "json")
    assert split_name("noext") is None and split_name("a/.hidden") is None
    assert split_name("__key__") is None


def test_bad_checksum_truncation_and_duplicates_reach_the_handler(tmp_path):
    _write(tmp_path / "good.tar", MEMBERS, tarfile.GNU_FORMAT)
    data = (tmp_path / "good.tar").read_bytes()
    # the third member's header (sub/a.json): flip a byte of its name
    offset = data.index(b"sub/a.json")
    (tmp_path / "badsum.tar").write_bytes(data[:offset] + b"X" + data[offset + 1 :])
    (tmp_path / "cut.tar").write_bytes(data[: data.index(b"x" * 512) + 100])  # in c.txt
    _write(tmp_path / "dup.tar", [("k.jpg", b"1"), ("k.jpg", b"2")], tarfile.GNU_FORMAT)
    errors = []
    samples = _ours(
        [
            tmp_path / "badsum.tar",
            tmp_path / "cut.tar",
            tmp_path / "dup.tar",
            tmp_path / "good.tar",
        ],
        errors,
    )
    assert [type(e) for e in errors] == [TarFormatError] * 3
    assert "checksum" in str(errors[0]) and "badsum.tar" in str(errors[0])
    assert "truncated" in str(errors[1]) and "duplicate" in str(errors[2])
    # nothing of badsum.tar (its first sample was not complete); of cut.tar the samples whose
    # last member was read before the cut; all of good.tar
    keys = [(s["__url__"].rsplit("/", 1)[1], s["__key__"]) for s in samples]
    assert keys == [
        ("cut.tar", "sub/a"),
        ("cut.tar", f"{LONG_DIR}/b"),
        ("good.tar", "sub/a"),
        ("good.tar", f"{LONG_DIR}/b"),
        ("good.tar", "c"),
    ]
    with pytest.raises(TarFormatError):
        _ours([tmp_path / "cut.tar"])


def test_an_endless_stream_over_unreadable_shards_raises(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 100)
    _write(tmp_path / "empty.tar", [], tarfile.GNU_FORMAT)

    def endless():
        while True:
            yield {"url": str(tmp_path / "junk.tar")}
            yield {"url": str(tmp_path / "empty.tar")}

    with pytest.raises(RuntimeError, match="10 shards in a row gave no sample"):
        for _ in tar_samples(endless(), handler=lambda err: True, max_failed_in_a_row=10):
            pass


def test_a_shard_cut_short_between_members_is_reported_not_taken_as_complete(tmp_path):
    path = tmp_path / "cut.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("a.jpg", "a.json", "b.jpg", "b.json"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    whole = path.read_bytes()
    path.write_bytes(whole[: 4 * 1024])  # four members of 512 + 512 bytes: cut after them
    errors = []
    keys = [s["__key__"] for s in tar_samples([{"url": str(path)}], lambda e: not errors.append(e))]
    assert keys == ["a"]  # the sample still open when the stream broke is not trusted
    assert "ends without the end-of-archive marker" in str(errors[0])
