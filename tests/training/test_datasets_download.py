"""LLaVA-Med downloads against a loopback server: full, resumed, 404, size and checksum errors,
retries on 5xx, PMC figure extraction; plus the source table's own consistency."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from dataset_fixture_server import FixtureServer

from tinyllava_med.training.datasets import (
    FILES,
    GROUPS,
    WHAT_CHOICES,
    ChecksumMismatchError,
    DataFile,
    DownloadError,
    NotFoundError,
    SizeMismatchError,
    download_file,
    download_images,
    download_llava_med,
    resolve_base_url,
)
from tinyllava_med.training.datasets.sources import BASE_URL_ENV, DEFAULT_BASE_URL

FAST = {"retries": 3, "backoff": 0.01, "progress": False}
BLOB = bytes(range(256)) * 40  # 10 KiB


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def server() -> Iterator[FixtureServer]:
    with FixtureServer({"/blob.bin": BLOB}) as s:
        yield s


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10.0) as c:
        yield c


def test_full_download_is_verified_and_atomic(server, client, tmp_path):
    dest = tmp_path / "sub" / "blob.bin"
    out = download_file(
        server.base_url + "blob.bin",
        dest,
        expected_size=len(BLOB),
        sha256=sha(BLOB),
        client=client,
        **FAST,
    )
    assert out == dest and dest.read_bytes() == BLOB
    assert not dest.with_name("blob.bin.part").exists()
    # complete already: not fetched again
    download_file(server.base_url + "blob.bin", dest, expected_size=len(BLOB), client=client)
    assert len(server.requests) == 1


def test_resume_after_broken_transfer(server, client, tmp_path):
    server.break_once.add("/blob.bin")
    dest = tmp_path / "blob.bin"
    download_file(
        server.base_url + "blob.bin",
        dest,
        expected_size=len(BLOB),
        sha256=sha(BLOB),
        client=client,
        **FAST,
    )
    assert dest.read_bytes() == BLOB
    ranges = server.requests_for("/blob.bin")
    assert ranges[0] is None
    assert len(ranges) == 2 and ranges[1] == f"bytes={len(BLOB) // 2}-"


def test_resume_from_existing_part_file(server, client, tmp_path):
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(BLOB[:1000])
    download_file(server.base_url + "blob.bin", dest, sha256=sha(BLOB), client=client, **FAST)
    assert dest.read_bytes() == BLOB
    assert server.requests_for("/blob.bin") == ["bytes=1000-"]


def test_server_ignoring_range_restarts_cleanly(server, client, tmp_path):
    server.honor_range = False
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(b"stale bytes of another file")
    download_file(server.base_url + "blob.bin", dest, sha256=sha(BLOB), client=client, **FAST)
    assert dest.read_bytes() == BLOB


def test_complete_part_file_is_finished_without_refetch(server, client, tmp_path):
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(BLOB)  # crashed before the rename
    download_file(server.base_url + "blob.bin", dest, sha256=sha(BLOB), client=client, **FAST)
    assert dest.read_bytes() == BLOB
    assert server.requests_for("/blob.bin") == [f"bytes={len(BLOB)}-"]  # answered 416


def test_retries_5xx_then_succeeds(server, client, tmp_path):
    server.fail_with["/blob.bin"] = [503, 502]
    dest = download_file(server.base_url + "blob.bin", tmp_path / "b", client=client, **FAST)
    assert dest.read_bytes() == BLOB
    assert len(server.requests) == 3


def test_gives_up_after_retries(server, client, tmp_path):
    server.fail_with["/blob.bin"] = [500] * 10
    with pytest.raises(DownloadError, match="gave up after 3 retries"):
        download_file(server.base_url + "blob.bin", tmp_path / "b", client=client, **FAST)
    assert len(server.requests) == 4


def test_404_fails_at_once_and_clearly(server, client, tmp_path):
    with pytest.raises(NotFoundError, match="HTTP 404") as e:
        download_file(server.base_url + "missing.json", tmp_path / "m", client=client, **FAST)
    assert "missing.json" in str(e.value)
    assert len(server.requests) == 1
    assert not (tmp_path / "m").exists()


def test_size_mismatch(server, client, tmp_path):
    dest = tmp_path / "blob.bin"
    with pytest.raises(SizeMismatchError, match=f"{len(BLOB)} bytes, expected 999"):
        download_file(server.base_url + "blob.bin", dest, expected_size=999, client=client, **FAST)
    assert not dest.exists() and not dest.with_name("blob.bin.part").exists()


def test_checksum_mismatch(server, client, tmp_path):
    dest = tmp_path / "blob.bin"
    with pytest.raises(ChecksumMismatchError, match="sha256"):
        download_file(server.base_url + "blob.bin", dest, sha256="0" * 64, client=client, **FAST)
    assert not dest.exists() and not dest.with_name("blob.bin.part").exists()


def test_download_group_with_catalog_and_figures(client, tmp_path):
    """`--what instruct-10k --images` against a local mirror: files, then only referenced
    figures; a vanished PMC archive is counted, not fatal; a second run skips what is there."""
    figure_a, figure_b = b"\xff\xd8jpeg-a", b"\xff\xd8jpeg-b"
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for name, data in [("PMC1/fig_a.jpg", figure_a), ("PMC1/fig_b.jpg", figure_b)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    instruct = json.dumps(
        [
            {"id": "111_F1", "image": "111_F1.jpg", "conversations": []},
            {"id": "222_F2", "image": "222_F2.jpg", "conversations": []},
            {"id": "333_F3", "image": "333_F3.jpg", "conversations": []},
            {"id": "555_F5", "image": "555_F5.jpg", "conversations": []},
        ]
    ).encode()
    files = {"/instruct/llava_med_instruct_10k.json": instruct, "/pmc/PMC1.tar.gz": b""}
    with FixtureServer(files) as srv:
        srv.files["/pmc/PMC1.tar.gz"] = archive.getvalue()
        url_lines = [
            {"pair_id": "111_F1", "pmc_tar_url": f"{srv.base_url}pmc/PMC1.tar.gz"},
            {"pair_id": "222_F2", "pmc_tar_url": f"{srv.base_url}pmc/PMC1.tar.gz"},
            {"pair_id": "333_F3", "pmc_tar_url": f"{srv.base_url}pmc/PMC9.tar.gz"},
            {"pair_id": "444_F4", "pmc_tar_url": f"{srv.base_url}pmc/PMC1.tar.gz"},
        ]
        members = ["PMC1/fig_a.jpg", "PMC1/fig_b.jpg", "PMC9/x.jpg", "PMC1/fig_a.jpg"]
        for line, member in zip(url_lines, members, strict=True):
            line["image_file_path"] = member
        urls = "\n".join(json.dumps(x) for x in url_lines).encode() + b"\n"
        srv.files["/llava_med_image_urls.jsonl"] = urls
        catalog = {
            "llava_med_instruct_10k.json": DataFile(
                "instruct/llava_med_instruct_10k.json", len(instruct), sha(instruct), "-"
            ),
            "llava_med_image_urls.jsonl": DataFile("llava_med_image_urls.jsonl", None, None, "-"),
        }
        out = tmp_path / "llava_med"
        report = download_llava_med(
            "instruct-10k",
            out,
            base_url=srv.base_url,
            images=True,
            catalog=catalog,
            client=client,
            workers=2,
            **FAST,
        )
        assert (out / "instruct" / "llava_med_instruct_10k.json").read_bytes() == instruct
        assert (out / "llava_med_image_urls.jsonl").read_bytes() == urls
        images = report.images
        assert images is not None
        assert (images.downloaded, images.skipped, images.failed) == (2, 0, 1)
        assert images.not_listed == 1  # 555_F5 is referenced but not in the URL list
        assert images.failures[0][0] == "333_F3" and "404" in images.failures[0][1]
        assert (out / "images" / "111_F1.jpg").read_bytes() == figure_a
        assert (out / "images" / "222_F2.jpg").read_bytes() == figure_b
        assert not (out / "images" / "444_F4.jpg").exists()  # not referenced by the json
        assert not list((out / "pmc_articles").iterdir())  # archives removed
        assert len(srv.requests_for("/pmc/PMC1.tar.gz")) == 1  # one fetch for two figures

        again = download_images(
            out / "llava_med_image_urls.jsonl", out / "images", client=client, **FAST
        )
        assert (again.downloaded, again.skipped, again.failed) == (1, 2, 1)
        assert (out / "images" / "444_F4.jpg").read_bytes() == figure_a


def test_figure_names_cannot_escape_images_dir(client, tmp_path):
    urls = tmp_path / "urls.jsonl"
    line = {"pair_id": "../evil", "pmc_tar_url": "http://127.0.0.1:9/x.tar.gz"}
    line["image_file_path"] = "x.jpg"
    urls.write_text(json.dumps(line) + "\nnot json\n")
    report = download_images(urls, tmp_path / "images", client=client, **FAST)
    assert report.failed == 2 and report.downloaded == 0
    assert not (tmp_path / "evil.jpg").exists()


def test_base_url_resolution():
    assert resolve_base_url(None, environ={}) == DEFAULT_BASE_URL
    assert resolve_base_url(None, environ={BASE_URL_ENV: "http://h:1/x"}) == "http://h:1/x/"
    assert resolve_base_url("https://m/", environ={BASE_URL_ENV: "http://h/"}) == "https://m/"
    with pytest.raises(ValueError, match="http"):
        resolve_base_url("ftp://h/", environ={})


def test_source_table_is_consistent():
    assert set(GROUPS) == set(WHAT_CHOICES)
    for names in GROUPS.values():
        for name in names:
            file = FILES[name]
            assert file.name == name
            assert file.size is not None and file.size > 0
            assert file.sha256 is not None and re.fullmatch(r"[0-9a-f]{64}", file.sha256)
            # the README's rounded size agrees with the byte count
            value, unit = file.readme_size.split()
            scale = {"KiB": 1024, "MiB": 1024**2}[unit]
            assert abs(file.size / scale - float(value)) < 0.006
    with pytest.raises(ValueError, match="unknown data group"):
        download_llava_med("everything", "/nonexistent")  # type: ignore[arg-type]


def test_shipped_configs_read_where_download_and_convert_write():
    """Following the README verbatim: `data download` (default `./data/llava_med`) writes the
    upstream layout (`alignment/`, `instruct/`, `images/`), and the README converts VQA-RAD into
    `./data/llava_med/vqa-rad` (`train.json`, `images/`); every shipped stage reads from there."""
    import yaml

    from tinyllava_med.training.config import CONFIG_DIR
    from tinyllava_med.training.datasets.sources import FILES

    root = "./data/llava_med/"
    downloaded = {root + f.path for f in FILES.values()}
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert 'data convert --dataset vqa-rad "./VQA_RAD" ./data/llava_med/vqa-rad' in readme
    # TinyLLaVA-Med-F's downstream stage trains on the three sets merged
    assert "data merge ./data/llava_med/3vqa ./data/llava_med/vqa-rad" in readme
    converted = {root + "vqa-rad/train.json", root + "3vqa/train.json"}
    configs = sorted(CONFIG_DIR.glob("*.yaml"))
    assert len(configs) == 6
    for path in configs:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert cfg["data_path"] in downloaded | converted, (path.name, cfg["data_path"])
        folder = "3vqa" if path.name.startswith("tinyllava") else "vqa-rad"
        images = root + (f"{folder}/images" if "downstream" in path.name else "images")
        assert cfg["image_folder"] == images, path.name
