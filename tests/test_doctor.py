"""runner/doctor.py under every launcher: one process, accelerate launch, torchrun, two emulated machines and
a real Slurm; and the ways a launch goes wrong: a rank that never joins, a master that is not there, two
ranks on one (host, local rank), ranks that disagree on the world size. Real processes, gloo on the CPU.
"""
from __future__ import annotations

import re
import subprocess
import time

import pytest

from tests.dist_helpers import ACCELERATE, TORCHRUN, Background, error_lines, machine
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture)
from tests.util import PYTHON, REPO, clean_env, free_port, ok

DOCTOR = str(REPO / "runner" / "doctor.py")
SIZES = ["1 KB", "4 KB", "16 KB", "64 KB", "256 KB", "1 MB", "4 MB", "16 MB", "64 MB"]
ROW = re.compile(r"^\s+(\d+ [KMG]?B)\s+(\d+)\s+([\d.]+)\s+([\d.]+|-)$", re.M)


def all_reduce_rows(output: str) -> dict[str, tuple[int, float, float | None]]:
    """{size: (iterations, latency in us, bus GB/s)} from the main process's all-reduce table."""
    return {m[0]: (int(m[1]), float(m[2]), None if m[3] == "-" else float(m[3])) for m in ROW.findall(output)}


def rank_rows(output: str) -> list[list[str]]:
    """The rows of the ranks table: rank, local, world, node, host, device, ..."""
    lines = output.splitlines()
    header = next(i for i, line in enumerate(lines) if re.match(r"^rank\s+local\s+world", line))
    rows = []
    for line in lines[header + 2:]:
        if not line.strip():
            return rows
        rows.append(line.split())
    return rows


def rank_env(tmp_path, rank: int, world: int, port: int, local_rank: int | None = None, **extra) -> dict:
    """A rank started by hand, as a broken launcher might: only the torch.distributed variables."""
    return clean_env(tmp_path, RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank if local_rank is None else local_rank,
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra)


def start(tmp_path, env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, DOCTOR, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str, float]:
    begun = time.monotonic()
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err, time.monotonic() - begun


def test_help_and_bad_flags(tmp_path):
    begun = time.monotonic()
    help_text = subprocess.run([PYTHON, DOCTOR, "--help"], capture_output=True, text=True, env=clean_env(tmp_path))
    assert help_text.returncode == 0 and "--timeout" in help_text.stdout and "all-reduce" in help_text.stdout
    assert time.monotonic() - begun < 5, "--help must not import torch"
    for args, named in ((["--timeout", "0"], "--timeout"), (["--max-size", "12XB"], "--max-size"),
                        (["--backend", "mpi"], "--backend"), (["optim.lr=1"], "optim.lr")):
        bad = subprocess.run([PYTHON, DOCTOR, *args], capture_output=True, text=True, env=clean_env(tmp_path))
        assert bad.returncode == 2 and len(error_lines(bad.stderr)) == 1 and named in bad.stderr, (args, bad.stderr)
        assert "Traceback" not in bad.stderr


def test_one_process_is_healthy(tmp_path):
    result = subprocess.run([PYTHON, DOCTOR, "--max-size", "16KB"], cwd=REPO, env=clean_env(tmp_path),
                            capture_output=True, text=True, timeout=120)
    out = ok(result, "doctor").stdout
    assert "1 of 1 ranks joined" in out and "checks: all passed" in out and "healthy: 1 rank(s)" in out
    rows = rank_rows(out)
    assert [r[:3] for r in rows] == [["0", "0", "1"]] and "cpu" in rows[0] and "gloo" in rows[0]
    assert list(all_reduce_rows(out)) == ["1 KB", "4 KB", "16 KB"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_two_processes_join_and_time_all_reduces(tmp_path, launcher):
    port = free_port()
    if launcher == "accelerate":
        cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(port)]
        env = clean_env(tmp_path, ACCELERATE_USE_CPU=1)
        sizes = SIZES
    else:
        cmd, env, sizes = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(port)], clean_env(tmp_path), SIZES[:4]
    result = subprocess.run([*cmd, DOCTOR, "--max-size", sizes[-1].replace(" ", "")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    out = ok(result, launcher).stdout
    assert "2 of 2 ranks joined on 1 node(s)" in out and "checks: all passed" in out
    rows = rank_rows(out)
    assert [r[:3] for r in rows] == [["0", "0", "2"], ["1", "1", "2"]], out
    assert all("gloo" in r and "cpu" in r for r in rows)
    figures = all_reduce_rows(out)
    assert list(figures) == sizes, out
    assert all(latency > 0 and bus > 0 for _, latency, bus in figures.values()), figures
    assert re.search(r"^barrier: [\d.]+ us$", out, re.M) and "healthy: 2 rank(s)" in out
    print(f"\nall-reduce over 2 gloo processes ({launcher}):\n" + "\n".join(
        f"  {size:>6}: {latency:10.1f} us  {bus:7.3f} GB/s" for size, (_, latency, bus) in figures.items()))


@pytest.mark.slow
def test_two_emulated_machines(tmp_path):
    port = free_port()
    env = clean_env(tmp_path, ACCELERATE_USE_CPU=1)
    machines = [Background([*machine(rank, 2, port), DOCTOR, "--max-size", "4KB"], tmp_path, env=env)
                for rank in (0, 1)]
    try:
        codes = [m.wait(180) for m in machines]
    finally:
        for m in machines:
            m.stop()
    assert codes == [0, 0], "\n---\n".join(m.tail() for m in machines)
    out = machines[0].output
    assert "2 of 2 ranks joined on 2 node(s)" in out and "checks: all passed" in out, out
    rows = rank_rows(out)
    # global rank, local rank, world, node rank: one rank on each machine
    assert [r[:4] for r in rows] == [["0", "0", "2", "0"], ["1", "0", "2", "1"]], out
    assert "ranks joined" not in machines[1].output  # only the main process prints the table


@pytest.mark.slow
def test_rank_that_never_joins_and_master_that_never_comes(tmp_path):
    """Rank 0 of 2 alone names rank 1; rank 1 of 2 alone names the master's address. Both within --timeout."""
    # The doctor counts --timeout from its own start; the slack below is for a loaded 2-core machine only.
    timeout, slack, master_port, lonely_port = 15, 5, free_port(), free_port()
    alone = start(tmp_path, rank_env(tmp_path, 0, 2, master_port), "--timeout", str(timeout))
    orphan = start(tmp_path, rank_env(tmp_path, 1, 2, lonely_port), "--timeout", str(timeout))
    code, out, err, seconds = finish(alone)
    assert code == 3, (out, err)
    assert seconds < timeout + slack, f"took {seconds:.1f} s with --timeout {timeout}"
    lines = error_lines(err)
    assert len(lines) == 1 and "rank 1 of world size 2 never joined" in lines[0], err
    assert "1 of 2 ranks joined" in out
    code, out, err, seconds = finish(orphan)
    assert code == 3 and seconds < timeout + slack, (code, seconds, err)
    lines = error_lines(err)
    assert len(lines) == 1 and f"could not reach the master at 127.0.0.1:{lonely_port}" in lines[0], err
    assert "Traceback" not in err and "socket.cpp" not in err


@pytest.mark.slow
@pytest.mark.parametrize("case", ["same local rank", "different world sizes"])
def test_failed_check_is_named_in_one_line(tmp_path, case):
    port = free_port()
    if case == "same local rank":
        envs = [rank_env(tmp_path, r, 2, port, local_rank=0) for r in (0, 1)]
        expected = "check 'unique (host, local rank)' failed: ranks 0-1 on"
    else:
        envs = [rank_env(tmp_path, 0, 2, port), rank_env(tmp_path, 1, 3, port)]
        expected = "check 'launched ranks = world size' failed: rank 0 has world size 2 but rank 1 on"
    ranks = [start(tmp_path, env, "--timeout", "60") for env in envs]
    (code0, out0, err0, _), (code1, out1, err1, _) = [finish(p) for p in ranks]
    assert (code0, code1) == (1, 1), (out0, err0, out1, err1)
    lines = error_lines(err0)
    assert len(lines) == 1 and expected in lines[0], err0
    assert "checks: 1 failed" in out0
    assert not error_lines(err1), "rank 0 says what failed; the others exit quietly"


@pytest.mark.slurm
@pytest.mark.slow
def test_doctor_sbatch_on_two_slurm_nodes(slurm_cluster, tmp_path):  # noqa: F811
    from tests.test_slurm import job_env

    cluster = slurm_cluster
    job = cluster.sbatch(["-N2", "--ntasks-per-node=1", f"--output={tmp_path}/doctor-%j.out",
                          "slurm/doctor.sbatch", "--timeout", "60", "--max-size", "1MB"], env=job_env(tmp_path),
                         cwd=REPO)
    info = cluster.wait(job, timeout=240)
    output = (tmp_path / f"doctor-{job}.out").read_text(errors="replace")
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", f"{info}\n{output}"
    assert "2 of 2 ranks joined on 2 node(s) (srun + slurm_task.sh" in output, output
    rows = rank_rows(output)
    assert [(r[0], r[1], r[3], r[4]) for r in rows] == [("0", "0", "0", "n1"), ("1", "0", "1", "n2")], output
    assert re.search(rf"^0\s+JOB_ID={job} .*PROCID=0 LOCALID=0 NODEID=0 SLURMD_NODENAME=n1", output, re.M), output
    assert list(all_reduce_rows(output)) == SIZES[:6] and "healthy: 2 rank(s)" in output, output
