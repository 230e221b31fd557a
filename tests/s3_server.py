"""A real S3 API for tests: moto's server in a subprocess on a free 127.0.0.1 port.

`moto_s3(folder)` starts it, points this process's AWS environment at fake credentials with a
distinctive secret (no output file or log may contain it), creates `BUCKET`, yields the fsspec
storage options that reach it, and stops the server afterwards. Subprocesses started meanwhile
inherit the credentials through the environment, as a user's shell would pass them.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SECRET = "mgll-Sekr1t-4f9c2e-never-in-output"
KEY_ID = "mgll-key-id-testing"
BUCKET = "mgll-releases"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def moto_s3(folder: Path) -> Iterator[dict]:
    """moto's S3 server, its log in `folder`; yields the storage options that point at it."""
    import s3fs

    port = free_port()
    log = folder / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, log.read_text()
                time.sleep(0.1)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
            env.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
            env.setenv("AWS_DEFAULT_REGION", "us-east-1")
            env.setenv("AWS_EC2_METADATA_DISABLED", "true")
            for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
                env.setenv(name, str(folder / "absent"))
            options = {"client_kwargs": {"endpoint_url": endpoint}}
            s3fs.S3FileSystem(**options).mkdir(BUCKET)
            yield options
    finally:
        server.terminate()
        server.wait(timeout=30)
