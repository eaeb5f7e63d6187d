"""Data-dir resolution, checksum verification, offline errors, download timeouts and retries, atomic writes."""

from __future__ import annotations

import hashlib
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gevit_lib import files
from gevit_lib.files import ChecksumError, MissingFileError, RemoteFile


def test_data_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("GEVIT_DATA_DIR", raising=False)
    assert files.data_dir() == Path("data")
    monkeypatch.setenv("GEVIT_DATA_DIR", str(tmp_path))
    assert files.data_dir() == tmp_path
    assert files.data_dir(tmp_path / "x") == tmp_path / "x"


def _remote(content: bytes, name: str = "thing.bin") -> RemoteFile:
    # an unreachable URL: the test must not depend on the network
    return RemoteFile(name, "http://127.0.0.1:9/thing.bin", hashlib.sha256(content).hexdigest())


def test_fetch_finds_and_verifies(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "thing.bin").write_bytes(b"hello")
    assert files.fetch(_remote(b"hello"), tmp_path / "main", search=[other]) == other / "thing.bin"


def test_missing_file_offline_names_file_checksum_and_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "BACKOFF_S", 0.01)  # the refused connection is retried: keep the test quick
    remote = _remote(b"hello")
    with pytest.raises(MissingFileError) as info:
        files.fetch(remote, tmp_path)
    msg = str(info.value)
    assert "thing.bin" in msg and remote.checksum in msg and str(tmp_path) in msg and remote.url in msg
    assert not list(tmp_path.glob("*.tmp")), "a failed download must leave no partial file"


def test_bad_checksum_is_detected(tmp_path: Path) -> None:
    (tmp_path / "thing.bin").write_bytes(b"hellp")
    with pytest.raises(ChecksumError, match="corrupt or truncated"):
        files.fetch(_remote(b"hello"), tmp_path)


def test_atomic_torch_save_leaves_no_temp_and_survives_failure(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    files.atomic_torch_save({"a": torch.ones(2)}, path)
    assert torch.load(path)["a"].sum() == 2
    with pytest.raises(RuntimeError):
        with files.atomic_write(path) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("interrupted")
    assert torch.load(path)["a"].sum() == 2  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "BACKOFF_S", 0.01)


def test_stalled_server_fails_within_the_timeout(stalled_server: str, fast_retries: None, tmp_path: Path) -> None:
    """A server that accepts and never answers (a dropping firewall): a clear error after tries x timeout."""
    remote = RemoteFile("thing.bin", f"{stalled_server}/thing.bin", hashlib.sha256(b"hello").hexdigest())
    start = time.monotonic()
    with pytest.raises(MissingFileError) as info:
        files.fetch(remote, tmp_path, timeout=0.5, tries=3)
    assert time.monotonic() - start < 3 * 0.5 + 5
    msg = str(info.value)
    assert "tried up to 3 times, 0.5 s timeout each" in msg and "timed out" in msg
    assert "thing.bin" in msg and remote.checksum in msg and remote.url in msg and str(tmp_path) in msg
    assert list(tmp_path.iterdir()) == []


class _Server(http.server.ThreadingHTTPServer):
    """Serves ``answers`` in turn (status, body): one per request; counts requests. 127.0.0.1 only."""

    def __init__(self, answers: list[tuple[int, bytes]]) -> None:
        self.answers, self.requests = answers, 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(handler) -> None:  # noqa: N805
                status, body = self.answers[min(self.requests, len(self.answers) - 1)]
                self.requests += 1
                handler.send_response(status)
                handler.send_header("Content-Length", str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)

            def log_message(handler, *args: object) -> None:  # noqa: N805
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/thing.bin"


@pytest.fixture
def serve() -> Iterator:
    servers: list[_Server] = []

    def start(answers: list[tuple[int, bytes]]) -> _Server:
        server = _Server(answers)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_download_retries_a_transient_error_then_verifies(serve, fast_retries: None, tmp_path: Path) -> None:
    server = serve([(503, b"busy"), (200, b"hello")])
    remote = RemoteFile("thing.bin", server.url, hashlib.sha256(b"hello").hexdigest())
    assert files.fetch(remote, tmp_path, timeout=5, tries=3) == tmp_path / "thing.bin"
    assert server.requests == 2 and (tmp_path / "thing.bin").read_bytes() == b"hello"


def test_download_does_not_retry_a_missing_file(serve, fast_retries: None, tmp_path: Path) -> None:
    server = serve([(404, b"not found")])
    remote = RemoteFile("thing.bin", server.url, hashlib.sha256(b"hello").hexdigest())
    with pytest.raises(MissingFileError, match="404"):
        files.fetch(remote, tmp_path, timeout=5, tries=3)
    assert server.requests == 1


def test_corrupt_download_is_retried_and_never_left_behind(serve, fast_retries: None, tmp_path: Path) -> None:
    server = serve([(200, b"hellp")])
    remote = RemoteFile("thing.bin", server.url, hashlib.sha256(b"hello").hexdigest())
    with pytest.raises(ChecksumError, match="downloaded file's sha256"):
        files.fetch(remote, tmp_path, timeout=5, tries=2)
    assert server.requests == 2 and list(tmp_path.iterdir()) == []
