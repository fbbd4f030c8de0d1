"""A real S3-protocol server on the loopback for the tests: moto's stand-alone server (as
PyArrow's and s3fs's own test suites use), started in a subprocess on a free port of
127.0.0.1; nothing beyond the loopback is reached."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

#: What every S3 client of the tests (boto3, s3fs, PyArrow, Ray workers) reads from the environment.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    """A TCP port of 127.0.0.1 nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def s3_server(bucket: str) -> Iterator[dict[str, str]]:
    """Run a moto S3 server holding an empty `bucket`; yields the environment that points
    S3 clients at it (endpoint and dummy credentials). Stops the server on exit."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env})
    try:
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in CREDENTIALS.items()
                                                            if k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
                              region_name=CREDENTIALS["AWS_DEFAULT_REGION"])
        deadline = time.monotonic() + 60
        while True:
            try:
                client.create_bucket(Bucket=bucket)
                break
            except Exception:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the moto S3 server on {endpoint} did not start") from None
                time.sleep(0.2)
        yield env
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
