"""A real three-node Redis Cluster on free loopback ports, for the behaviour suite."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too; under pytest-xdist
    from a slice of the range of its own per worker, so that two workers never pick the same."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:])
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    size = 25000 // workers
    while True:
        port = random.randint(20000 + worker * size, 20000 + (worker + 1) * size - 1)
        if _free(port) and _free(port + 10000):
            return port


class RedisCluster:
    """`with RedisCluster(folder) as cluster:` three masters joined by `redis-cli --cluster create`."""

    def __init__(self, folder: Path, nodes: int = 3) -> None:
        self.folder = folder
        self.ports = [_cluster_port() for _ in range(nodes)]
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def flush(self) -> None:
        for port in self.ports:
            subprocess.run(["redis-cli", "-p", str(port), "flushall"], check=True, capture_output=True, timeout=10)

    def __enter__(self) -> RedisCluster:
        for port in self.ports:
            self.processes.append(
                subprocess.Popen(
                    [
                        "redis-server",
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        f"nodes-{port}.conf",
                        "--dir",
                        str(self.folder),
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--cluster-node-timeout",  # no failover here: a node the suite stops on
                        "15000",  # purpose, or a loaded machine stalls, is not marked failed
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port in self.ports:
            self._wait(["redis-cli", "-p", str(port), "ping"], b"PONG")
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *[f"127.0.0.1:{p}" for p in self.ports],
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        for port in self.ports:
            self._wait(["redis-cli", "-p", str(port), "cluster", "info"], b"cluster_state:ok")
        return self

    def _wait(self, command: list[str], expected: bytes, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = subprocess.run(command, capture_output=True, timeout=5)
            if expected in result.stdout:
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis cluster: {' '.join(command)} never answered {expected!r}")

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


class RedisServer:
    """A private redis-server that a test may kill and start again (same port, same data folder)."""

    def __init__(self, folder: Path, appendonly: bool = True, tls: Path | None = None) -> None:
        self.folder = folder
        self.port = _cluster_port()
        self.appendonly = appendonly
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls / 'ca.crt'}"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        command = ["redis-server", "--bind", "127.0.0.1", "--dir", str(self.folder), "--save", ""]
        if self.appendonly:  # every write on disk before the reply: a kill -9 loses nothing
            command += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            command += ["--appendonly", "no"]
        if self.tls:
            command += [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-auth-clients",
                "no",
                "--tls-cert-file",
                str(self.tls / "server.crt"),
                "--tls-key-file",
                str(self.tls / "server.key"),
                "--tls-ca-cert-file",
                str(self.tls / "ca.crt"),
            ]
        else:
            command += ["--port", str(self.port)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not self._listening():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)
        return self

    def _listening(self) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-load, as in a crash."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.kill()


def make_tls_files(folder: Path) -> Path:
    """A CA and a server certificate for 127.0.0.1, made with the openssl command."""
    folder.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder, timeout=60)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=quotagate-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    )
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr"
    )
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        "server.crt",
        "-extfile",
        "ext.cnf",
    )
    return folder
