"""Two simulated hosts share one round: each is a network namespace joined to this machine by a
veth pair, with a worker inside that reaches Redis (a private redis-server listening on the veth
addresses) and PostgreSQL (through a TCP forwarder on the host side of each veth) over that link.
One host is cut off (its link goes down) while it runs a job: the job is re-planned once its
lease expires, the other host finishes the round, and nothing is written twice."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess

import pytest
from sqlalchemy import select

from db.schema import Generation, Job
from tests.cluster_support import Cluster, RedisServer, drop_database, free_port, fresh_database
from tests.conftest import POSTGRES_ADMIN_URL


def sh(*command: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()} "
                    "(the two-host test needs root and `ip netns`)")


class Host:
    """A network namespace with one veth link to this machine: host side .1, namespace side .2."""

    def __init__(self, tag: str, subnet: int) -> None:
        self.netns, self.outer, self.inner = f"w2s-{tag}", f"w2s{tag}o", f"w2s{tag}i"
        self.gateway, self.address = f"10.251.{subnet}.1", f"10.251.{subnet}.2"

    def create(self) -> None:
        sh("ip", "netns", "add", self.netns)
        sh("ip", "link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
        sh("ip", "link", "set", self.inner, "netns", self.netns)
        sh("ip", "addr", "add", f"{self.gateway}/24", "dev", self.outer)
        sh("ip", "link", "set", self.outer, "up")
        sh("ip", "netns", "exec", self.netns, "ip", "addr", "add", f"{self.address}/24", "dev", self.inner)
        sh("ip", "netns", "exec", self.netns, "ip", "link", "set", self.inner, "up")
        sh("ip", "netns", "exec", self.netns, "ip", "link", "set", "lo", "up")

    def cut_off(self) -> None:
        sh("ip", "link", "set", self.outer, "down")

    def destroy(self) -> None:
        subprocess.run(["ip", "link", "del", self.outer], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)


def forward(listen: str, port: int, target_port: int) -> subprocess.Popen:
    """socat on the host side of a veth: the namespace reaches 127.0.0.1:target_port through it."""
    if not shutil.which("socat"):
        pytest.fail("socat is not installed (apt-get install socat): the two-host test forwards PostgreSQL with it")
    return subprocess.Popen(["socat", f"TCP-LISTEN:{port},bind={listen},fork,reuseaddr", f"TCP:127.0.0.1:{target_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def test_host_cut_off_mid_job_is_replanned_after_its_lease(postgres_url, tmp_path):
    tag = f"{os.getpid() % 1000:03d}"
    subnets = random.sample(range(10, 250), 2)
    host_a, host_b = Host(f"{tag}a", subnets[0]), Host(f"{tag}b", subnets[1])
    forwarders: list[subprocess.Popen] = []
    broker = None
    url, db_name = fresh_database(POSTGRES_ADMIN_URL)
    cluster = Cluster(tmp_path, url, "redis://unused")
    try:
        host_a.create()
        host_b.create()
        broker = RedisServer(tmp_path / "redis", free_port(), bind=f"127.0.0.1 {host_a.gateway} {host_b.gateway}")
        broker.start()
        pg_port = free_port()
        forwarders = [forward(host.gateway, pg_port, 5432) for host in (host_a, host_b)]
        cluster = Cluster(tmp_path, url, broker.url)
        pool = 6
        cluster.setup(pool=pool, test=2, delay_s=1.0)  # two questions a job: 2 s

        def over(host: Host) -> dict[str, str]:
            return {"W2S_DATABASE_URL": url.replace("127.0.0.1:5432", f"{host.gateway}:{pg_port}"),
                    "W2S_BROKER_URL": f"redis://{host.gateway}:{broker.port}/0"}

        cluster.start_worker("a", "weak,strong", netns=host_a.netns, **over(host_a))
        cluster.start_worker("b", "weak,strong,train,control", netns=host_b.netns, **over(host_b))
        round_id = cluster.start_round(pool=pool, chunk=2)
        victim = cluster.wait_until(lambda: cluster.running_job("a@"), "host a to run a generation job")
        host_a.cut_off()

        round_ = cluster.wait_for_round(round_id, timeout=120)
        assert round_.state == "done", cluster.describe()
        cluster.check_generations_exactly_once(round_id, pool)
        with cluster.session() as session:
            job = session.get(Job, victim.id)
            assert job.state == "done" and job.attempts == 2 and job.owner.startswith("b@"), (job.state, job.attempts, job.owner)
            writers = set(session.scalars(select(Generation.job_id).where(
                Generation.question_id.in_(job.payload["question_ids"]), Generation.voter == job.payload["voter"])))
            assert writers == {job.id}
            owners = {owner.split("@")[0] for owner in session.scalars(select(Job.owner).where(Job.round_id == round_id))}
        assert victim.owner.startswith("a@") and owners <= {"a", "b"}, owners  # only the two hosts' workers ran it
    finally:
        cluster.stop_all()
        for process in forwarders:
            os.killpg(process.pid, signal.SIGKILL)
        if broker:
            broker.kill()
        host_a.destroy()
        host_b.destroy()
        drop_database(POSTGRES_ADMIN_URL, db_name)
