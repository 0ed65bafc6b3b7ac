"""What rank 0 prints after the check-in: one table of all ranks, their Slurm variables and the checks."""
from runner.preflight.checks import node_key
from runner.preflight.launch import Launch


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ranks_table(reports: dict[int, dict]) -> str:
    header = ["rank", "local", "world", "node", "host", "device", "GPUs (CUDA_VISIBLE_DEVICES)", "backend",
              "torch", "accelerate", "nccl", "master ms"]
    rows = [[r, p["local_rank"], p["world"], p["node_rank"], p["node"], p["device"],
             f"{p['gpus']} ({p['cuda_visible'].strip('()')})", p["backend"], p["versions"]["torch"],
             p["versions"]["accelerate"], p["versions"]["nccl"],
             "unreachable" if p["master_ms"] is None else f"{p['master_ms']:.1f}"]
            for r, p in sorted(reports.items())]
    text = format_table(header, rows)
    slurm = [[r, " ".join(f"{k.removeprefix('SLURM_')}={v}" for k, v in p["slurm"].items())]
             for r, p in sorted(reports.items()) if p["slurm"]]
    if slurm:
        text += "\n\n" + format_table(["rank", "Slurm variables"], slurm)
    return text


def print_summary(reports: dict[int, dict], launch: Launch, failures: list[str]) -> None:
    nodes = {node_key(p) for p in reports.values()}
    print(f"doctor: {len(reports)} of {launch.world} ranks joined on {len(nodes)} node(s) "
          f"({launch.launcher}; master {launch.master_addr}:{launch.master_port}; python "
          f"{reports[min(reports)]['versions']['python']})", flush=True)
    print(ranks_table(reports), flush=True)
    print("\nchecks: " + ("all passed" if not failures else f"{len(failures)} failed"), flush=True)
    for failure in failures:
        print(f"  {failure}", flush=True)
