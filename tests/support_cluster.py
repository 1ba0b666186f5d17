"""A local Redis Cluster of the tests' own: three masters and three replicas of Debian's
`redis-server` on free loopback ports, created with `redis-cli --cluster create` and torn
down after. Also used by the bench (`bench/infra.py`)."""

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis
from redis.crc import key_slot


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too, both below the
    ephemeral range (32768+), where other processes' outgoing connections could take one."""
    for _ in range(200):
        port = random.randrange(12000, 22000)
        try:
            with socket.socket() as s, socket.socket() as bus:
                s.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of ports for a cluster node")


def missing_binaries() -> str | None:
    """Why a local cluster cannot be started here, or None when it can."""
    for name in ("redis-server", "redis-cli"):
        if shutil.which(name) is None:
            return f"{name} is not on PATH (apt-get install redis-server)"
    return None


class LocalCluster:
    """Six `redis-server --cluster-enabled yes` processes: 3 masters, 1 replica each."""

    def __init__(self, workdir: Path, masters: int = 3, replicas: int = 1) -> None:
        self.workdir = workdir
        self.size = masters * (1 + replicas)
        self.replicas = replicas
        self.ports: list[int] = []
        self.popens: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        """Any node's URL: the service discovers the rest."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self, timeout: float = 30.0) -> None:
        for _ in range(self.size):
            port = _free_cluster_port()
            self.ports.append(port)
            self._spawn(port)
        deadline = time.monotonic() + timeout
        for port in self.ports:
            self._wait(deadline, lambda p=port: self.client(p).ping())
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in self.ports),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        self._wait(deadline, self.healthy)

    def _spawn(self, port: int) -> None:
        node_dir = self.workdir / str(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        with open(node_dir / "redis.log", "ab") as log:
            self.popens[port] = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(node_dir),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @staticmethod
    def _wait(deadline: float, check) -> None:
        while True:
            try:
                if check():
                    return
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the local Redis Cluster did not come up")
            time.sleep(0.1)

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=1)

    def role(self, port: int) -> str:
        return self.client(port).execute_command("ROLE")[0].decode()

    def masters(self) -> list[int]:
        return [p for p in self.ports if self.role(p) == "master"]

    def replicas_of(self, master: int) -> list[int]:
        replicas = self.client(master).execute_command("ROLE")[2]
        return [int(r[1]) for r in replicas]

    def healthy(self) -> bool:
        """Every node agrees the cluster is ok and knows every other; replicas in sync."""
        for port in self.ports:
            info = self.client(port).cluster("INFO")
            if info["cluster_state"] != "ok" or int(info["cluster_known_nodes"]) != self.size:
                return False
            replication = self.client(port).info("replication")
            if replication["role"] == "slave" and replication["master_link_status"] != "up":
                return False
        masters = self.masters()
        if len(masters) != self.size // (1 + self.replicas):
            return False
        return all(len(self.replicas_of(m)) == self.replicas for m in masters)

    def node_of(self, key: str) -> int:
        """The port of the master that serves `key`'s slot."""
        return self.node_of_slot(key_slot(key.encode()))

    def failover(self, master: int, timeout: float = 30.0) -> int:
        """Promote a replica of `master` with CLUSTER FAILOVER; the new master's port once
        every node sees the cluster healthy again."""
        replica = self.replicas_of(master)[0]
        self.client(replica).execute_command("CLUSTER FAILOVER")
        deadline = time.monotonic() + timeout
        self._wait(deadline, lambda: self.role(replica) == "master" and self.healthy())
        return replica

    def move_slot(self, slot: int, to: int, timeout: float = 30.0) -> None:
        """Give an empty `slot` to the master on port `to` (CLUSTER SETSLOT ... NODE), and
        wait until every node sees it there."""
        target = self.client(to).execute_command("CLUSTER MYID").decode()
        owner = self.node_of_slot(slot)
        # The new owner first, then the old one (which then drops its sharded subscribers
        # of the slot), then the rest, as a resharding does.
        order = [to, owner, *(p for p in self.masters() if p not in (to, owner))]
        for port in order:
            self.client(port).execute_command("CLUSTER SETSLOT", slot, "NODE", target)
        deadline = time.monotonic() + timeout
        self._wait(
            deadline,
            lambda: all(self.node_of_slot(slot, p) == to for p in self.ports) and self.healthy(),
        )

    def node_of_slot(self, slot: int, asked: int | None = None) -> int:
        """The port of the master serving `slot`, as the node on port `asked` sees it."""
        reply = self.client(asked or self.ports[0]).execute_command("CLUSTER SLOTS")
        for start, end, master, *_ in reply:
            if start <= slot <= end:
                return int(master[1])
        raise LookupError(slot)

    def kill(self, port: int, timeout: float = 30.0) -> int:
        """kill -9 the node on `port` (a master); once its replica took over and the others
        agree, the new master's port. The killed node stays down."""
        replica = self.replicas_of(port)[0]
        os.killpg(self.popens[port].pid, signal.SIGKILL)
        self.popens[port].wait()
        self.ports.remove(port)
        self.size -= 1
        deadline = time.monotonic() + timeout

        def taken_over() -> bool:
            if self.role(replica) != "master":
                return False
            return all(self.client(p).cluster("INFO")["cluster_state"] == "ok" for p in self.ports)

        self._wait(deadline, taken_over)
        return replica

    def pids(self) -> dict[int, int]:
        return {port: p.pid for port, p in self.popens.items()}

    def stop(self) -> None:
        for popen in self.popens.values():
            if popen.poll() is None:
                os.killpg(popen.pid, signal.SIGKILL)
        for popen in self.popens.values():
            popen.wait()
        self.popens.clear()
