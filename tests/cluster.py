"""A real three-node Redis Cluster on free loopback ports, for the behaviour suite."""

from __future__ import annotations

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
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    while True:
        port = random.randint(20000, 45000)
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
                        "--cluster-node-timeout",
                        "2000",
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
