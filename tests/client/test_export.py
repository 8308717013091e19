"""``export`` over HTTP against a fake server that serves a tar stream, and the refusal of unsafe archives."""
from __future__ import annotations

import io
import json
import tarfile

import pytest

from client import Client, NotFoundError, UnsafeArchiveError, extract_checkpoint

FILES = {"config.json": json.dumps({"model_type": "llama"}).encode(), "model.safetensors": b"\x00\x01weights" * 100}


def make_tar(members: dict[str, bytes], prefix: str = "", links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buf.getvalue()


def tar_answer(data: bytes):
    return (200, data, {"content-type": "application/x-tar"})


def test_export_downloads_and_extracts_the_checkpoint(fake, cli, tmp_path):
    fake.routes[("GET", "/v1/export/toy")] = tar_answer(make_tar(FILES))
    fake.routes[("GET", "/v1/export/@stack")] = tar_answer(make_tar(FILES, prefix="./"))
    out = tmp_path / "toy-ckpt"
    with Client(fake.url, api_key="k") as c:
        assert c.export("toy", out) == ["config.json", "model.safetensors"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == FILES
    assert fake.requests[-1][2]["authorization"] == "Bearer k"
    assert [p.name for p in tmp_path.iterdir()] == ["toy-ckpt"]  # no temporary folder left behind

    code, stdout, err = cli("export", "@stack", str(tmp_path / "stack"), "--url", fake.url)
    assert code == 0, err
    assert "2 files" in stdout and (tmp_path / "stack" / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert fake.requests[-1][1] == "/v1/export/@stack"

    code, _, err = cli("export", "toy", str(out), "--url", fake.url)  # out is not empty any more
    assert code == 1 and "not an empty folder" in err
    code, _, err = cli("export", "nope", str(tmp_path / "nope"), "--url", fake.url)
    assert code == 1 and err.startswith("jumplora: no route /v1/export/nope")
    with Client(fake.url) as c, pytest.raises(NotFoundError):
        c.export("nope", tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("archive,why", [
    (make_tar({**FILES, "../evil.txt": b"x"}), "outside the output folder"),
    (make_tar({"sub/../../evil.txt": b"x"}), "outside the output folder"),
    (make_tar({**FILES, "/tmp/evil.txt": b"x"}), "absolute path"),
    (make_tar(FILES, links={"tokenizer.json": "/etc/passwd"}), "not a plain file"),
])
def test_unsafe_archives_are_refused_before_anything_is_written(tmp_path, archive, why):
    out = tmp_path / "work" / "out"
    with pytest.raises(UnsafeArchiveError, match=why):
        extract_checkpoint(io.BytesIO(archive), out)
    assert not out.exists() and not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "work").exists() or list((tmp_path / "work").iterdir()) == []


def test_cli_refuses_an_unsafe_export(fake, cli, tmp_path):
    fake.routes[("GET", "/v1/export/toy")] = tar_answer(make_tar({**FILES, "../../evil.txt": b"x"}))
    code, _, err = cli("export", "toy", str(tmp_path / "a" / "out"), "--url", fake.url)
    assert code == 1 and err.startswith("jumplora: refusing the archive: member '../../evil.txt'")
    assert not (tmp_path / "a" / "out").exists() and not (tmp_path / "evil.txt").exists()
