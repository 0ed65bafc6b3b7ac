"""A real, private Slurm on this machine for the tests: munged, slurmctld and two slurmd (nodes n1, n2).

Everything lives in a fresh directory under /tmp: its own munge socket, its own ports, state, spool, logs
and pid files, so it disturbs no other Slurm or munged on the host. `SlurmCluster.env()` gives the
environment (SLURM_CONF) that points sbatch, squeue and scontrol, and the jobs they start, at it.

Use the session fixture `slurm_cluster`. If Slurm cannot be installed or started, the tests that use it
are skipped with the reason, or fail when RUNNER_REQUIRE_SLURM=1 (as CI sets it).
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "munged", "munge"]
NODES = ("n1", "n2")
HOSTS_LINE = "127.0.0.1 n1 n2"
# Stand-in GPUs: Slurm wants a character device per GPU; these exist everywhere and are never opened. A job
# that asks for --gpus-per-node=N gets SLURM_GPUS_ON_NODE=N (and a CUDA_VISIBLE_DEVICES that matches nothing).
FAKE_GPU_DEVICES = ["/dev/null", "/dev/zero", "/dev/full", "/dev/urandom"]


class SlurmUnavailable(Exception):
    """Slurm could not be installed or started here; the message says why."""


def unavailable(reason: str):
    """Skip, or fail when CI requires Slurm (RUNNER_REQUIRE_SLURM=1)."""
    if os.environ.get("RUNNER_REQUIRE_SLURM") == "1":
        pytest.fail(f"RUNNER_REQUIRE_SLURM=1 but Slurm is unavailable: {reason}", pytrace=False)
    pytest.skip(f"no Slurm: {reason}")


def free_ports(n: int) -> list[int]:
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run(cmd: list[str], env: dict | None = None, timeout: float = 60, check: bool = True,
        **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("stdin", None if "input" in kwargs else subprocess.DEVNULL)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise SlurmUnavailable(f"`{' '.join(cmd)}` failed ({result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()[-800:]}")
    return result


def install_slurm() -> None:
    """apt-get install the Debian packages if any binary is missing (about 10 s; needs root)."""
    missing = [b for b in BINARIES if not shutil.which(b) and not Path("/usr/sbin", b).exists()]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"{', '.join(missing)} not installed and not root to apt-get install "
                               f"{' '.join(PACKAGES)}")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable(f"{', '.join(missing)} not installed and no apt-get on this host")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], env=env, timeout=300)
    except SlurmUnavailable:  # the package lists may be missing or stale
        run(["apt-get", "update", "-qq"], env=env, timeout=300)
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], env=env, timeout=300)


def ensure_hosts_entry() -> None:
    """Job scripts take the head node from `scontrol show hostnames`: n1 and n2 must resolve."""
    try:
        if all(socket.gethostbyname(n) == "127.0.0.1" for n in NODES):
            return
    except OSError:
        pass
    try:
        with open("/etc/hosts", "a") as f:
            f.write(f"\n{HOSTS_LINE}  # added by tests/slurm_cluster.py\n")
    except OSError as e:
        raise SlurmUnavailable(f"cannot add `{HOSTS_LINE}` to /etc/hosts: {e}") from None


def sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # PID 1 here does not reap zombies
    except (OSError, IndexError):
        return False


def stop_pid(pid: int | None, timeout: float = 10) -> None:
    if not pid or not alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    if alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.jobcomp = root / "jobcomp.txt"
        self.munge_socket = root / "munge" / "munge.socket"
        self.pid_files = [root / "run" / "slurmd-n1.pid", root / "run" / "slurmd-n2.pid",
                          root / "run" / "slurmctld.pid", root / "munge" / "munged.pid"]
        self.hostname = socket.gethostname().split(".")[0]
        self.gpus_per_node = len(FAKE_GPU_DEVICES) if all(Path(d).is_char_device() for d in FAKE_GPU_DEVICES) else 0

    # ---- environment for clients and jobs ---------------------------------------------------------------
    def env(self, base: dict | None = None, **extra) -> dict:
        env = {k: v for k, v in (base or os.environ).items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    # ---- bring up ---------------------------------------------------------------------------------------
    def start(self) -> None:
        if os.geteuid() != 0:
            raise SlurmUnavailable("the test cluster needs root (slurmd, munged as user munge, /etc/hosts)")
        install_slurm()
        ensure_hosts_entry()
        for d in ("state", "spool/n1", "spool/n2", "run", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.start_munge()
        self.write_conf()
        env = self.env()
        run([sbin("slurmctld"), "-i"], env=env, timeout=30)
        for node in NODES:
            run([sbin("slurmd"), "-N", node], env=env, timeout=30)
        self.wait_idle(timeout=60)

    def start_munge(self) -> None:
        """A private munged on its own socket: a munged already on the host (and its users) is left alone."""
        d = self.munge_socket.parent
        d.mkdir(mode=0o755)
        shutil.chown(d, "munge", "munge")
        if not Path("/etc/munge/munge.key").exists():
            if not shutil.which("mungekey"):
                raise SlurmUnavailable("/etc/munge/munge.key is missing and there is no mungekey to create it")
            run([sbin("mungekey"), "--create"], timeout=30)
        cmd = [sbin("munged"), f"--socket={self.munge_socket}", f"--pid-file={d / 'munged.pid'}",
               f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}"]
        run(["runuser", "-u", "munge", "--", *cmd] if os.geteuid() == 0 else cmd, timeout=30)
        encoded = run(["munge", "-n", f"--socket={self.munge_socket}"], timeout=10).stdout
        run(["unmunge", f"--socket={self.munge_socket}"], input=encoded, timeout=10)

    def write_conf(self) -> None:
        ctld_port, port1, port2 = free_ports(3)
        # At least 4 CPUs a node, even on 2 cores (config_overrides allows it), so that a test's jobs run side by
        # side instead of queueing behind each other.
        cpus = max(4, os.cpu_count() or 1)
        mem_mb = max(256, int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8))
        # Job scripts derive their rendezvous port from the job id: a random first id keeps two test sessions
        # on one host (each with its own cluster) off each other's ports.
        first_job_id = random.randrange(1000, 19000)
        r = self.root
        gres = f"Gres=gpu:{self.gpus_per_node} " if self.gpus_per_node else ""
        if self.gpus_per_node:
            (r / "gres.conf").write_text(f"NodeName=n[1-2] Name=gpu File={','.join(FAKE_GPU_DEVICES)}\n")
        self.conf.write_text(f"""\
ClusterName=runnertest
FirstJobId={first_job_id}
SlurmctldHost={self.hostname}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
MpiDefault=none
GresTypes=gpu
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
KillWait=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
NodeName=n1 NodeHostname={self.hostname} NodeAddr=127.0.0.1 Port={port1} CPUs={cpus} RealMemory={mem_mb} {gres}State=UNKNOWN
NodeName=n2 NodeHostname={self.hostname} NodeAddr=127.0.0.1 Port={port2} CPUs={cpus} RealMemory={mem_mb} {gres}State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def wait_idle(self, timeout: float) -> None:
        deadline, states = time.time() + timeout, ""
        while time.time() < deadline:
            result = run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env(), timeout=10, check=False)
            states = result.stdout.strip() or result.stderr.strip()
            if result.returncode == 0 and sorted(states.split()) == sorted(["n1", "idle", "n2", "idle"]):
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"nodes n1 and n2 not idle after {timeout:.0f} s (sinfo: {states!r}); "
                               f"logs in {self.root / 'log'}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*.log")):
            out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    # ---- tear down: cancel the jobs, then stop every daemon by its pid ----------------------------------
    def stop(self) -> None:
        if self.conf.exists() and (self.root / "run" / "slurmctld.pid").exists():
            env = self.env()
            jobs = run(["squeue", "-h", "-o", "%i"], env=env, timeout=10, check=False).stdout.split()
            if jobs:
                run(["scancel", *jobs], env=env, timeout=10, check=False)
                deadline = time.time() + 20
                while time.time() < deadline and run(["squeue", "-h", "-o", "%i"], env=env, timeout=10,
                                                     check=False).stdout.strip():
                    time.sleep(0.5)
        for pid_file in self.pid_files:  # slurmd first (they kill their job steps), munged last
            stop_pid(read_pid(pid_file))
        for pid in self.leftover_pids():  # job processes or slurmstepd that outlived a stuck cancel
            stop_pid(pid, timeout=2)

    def leftover_pids(self) -> list[int]:
        """Processes of this cluster: their environment points at its slurm.conf (slurmstepd, job tasks)."""
        marker, found = f"SLURM_CONF={self.conf}".encode() + b"\0", []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
        return [pid for pid in found if alive(pid)]

    # ---- jobs -------------------------------------------------------------------------------------------
    def sbatch(self, args: list[str], env: dict, cwd: Path) -> str:
        result = subprocess.run(["sbatch", "--parsable", *args], env=self.env(env), cwd=cwd,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"sbatch {' '.join(args)} failed: {result.stderr}"
        return result.stdout.strip().split(";")[0]

    def queued(self, job: str) -> bool:
        result = run(["squeue", "-h", "-j", job, "-o", "%i %T"], env=self.env(), timeout=10, check=False)
        return bool(result.stdout.strip())

    def wait(self, job: str, timeout: float) -> dict:
        """Poll squeue until the job is gone, then return `scontrol show job` as a dict."""
        deadline = time.time() + timeout
        while self.queued(job):
            if time.time() > deadline:
                info = self.show_job(job)
                run(["scancel", job], env=self.env(), timeout=10, check=False)
                raise AssertionError(f"job {job} still queued after {timeout:.0f} s: {info}")
            time.sleep(0.5)
        return self.show_job(job)

    def show_job(self, job: str) -> dict:
        text = run(["scontrol", "-o", "show", "job", job], env=self.env(), timeout=10, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def jobcomp_records(self, job: str) -> list[dict]:
        if not self.jobcomp.exists():
            return []
        records = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in self.jobcomp.read_text().splitlines()]
        return [r for r in records if r.get("JobId") == job]


@pytest.fixture(scope="session")
def slurm_cluster():
    """Bring a private Slurm up once per session (about 10 s), and stop all its daemons afterwards."""
    root = Path(tempfile.mkdtemp(prefix="runner-slurm-", dir="/tmp"))
    root.chmod(0o755)  # the munge user must reach its socket directory
    cluster = SlurmCluster(root)
    try:
        try:
            cluster.start()
        except (SlurmUnavailable, OSError, subprocess.TimeoutExpired, LookupError) as e:
            unavailable(str(e))
        yield cluster
    finally:
        cluster.stop()
        if os.environ.get("RUNNER_KEEP_SLURM_DIR") != "1":
            shutil.rmtree(root, ignore_errors=True)
