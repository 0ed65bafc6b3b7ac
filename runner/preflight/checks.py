"""The checks over all ranks' reports: launched ranks against the world size, ranks per node against GPUs
per node, duplicate (host, local rank) pairs, equal versions, master address reachable. Each failure is one
line naming the check and the ranks or hosts."""
from collections import defaultdict

from runner.preflight.launch import Launch

VERSION_KEYS = ("python", "torch", "accelerate", "nccl")


def rank_list(ranks) -> str:
    """`0-3,6` from a set of ranks."""
    ranks, parts, start = sorted(ranks), [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            parts.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ",".join(parts)


def node_key(report: dict) -> str:
    """A node: its host name, plus its node rank when several nodes share one host (emulated nodes)."""
    return f"{report['node']}#{report['node_rank']}"


def node_name(report: dict) -> str:
    return report["node"] if report["node"] != report["host"] else f"{report['host']} (node {report['node_rank']})"


def check_world(reports: dict[int, dict], claims: dict[int, int], world: int) -> list[str]:
    failures = []
    other = {r: p["world"] for r, p in reports.items() if p["world"] != world}
    if other:
        failures.append("check 'launched ranks = world size' failed: rank 0 has world size "
                        f"{world} but " + ", ".join(f"rank {r} on {node_name(reports[r])} has {w}"
                                                    for r, w in sorted(other.items())))
    twice = sorted(r for r, n in claims.items() if n > 1)
    if twice:
        failures.append(f"check 'launched ranks = world size' failed: rank {rank_list(twice)} was launched "
                        f"more than once ({sum(claims.values())} processes for world size {world})")
    return failures


def check_nodes(reports: dict[int, dict]) -> list[str]:
    """Ranks per node against GPUs (or the launcher's local world size), and duplicate local ranks."""
    failures, by_node = [], defaultdict(list)
    for report in reports.values():
        by_node[node_key(report)].append(report)
    for ranks in by_node.values():
        name, count = node_name(ranks[0]), len(ranks)
        gpus = max(p["gpus"] for p in ranks)
        uses_gpu = any(p["device"].startswith("cuda") for p in ranks)
        if uses_gpu and count > gpus:
            failures.append(f"check 'ranks per node = GPUs per node' failed: {count} ranks on {name} share "
                            f"{gpus} visible GPU(s)")
        expected = {p["local_world"] for p in ranks if p["local_world"] is not None}
        if expected and expected != {count}:
            failures.append(f"check 'ranks per node' failed: the launcher on {name} expects "
                            f"{'/'.join(map(str, sorted(expected)))} local ranks but {count} joined")
        local = defaultdict(list)
        for p in ranks:
            local[p["local_rank"]].append(p["rank"])
        for local_rank, same in sorted(local.items()):
            if len(same) > 1:
                failures.append(f"check 'unique (host, local rank)' failed: ranks {rank_list(same)} on {name} "
                                f"all have local rank {local_rank}")
    return failures


def check_versions(reports: dict[int, dict]) -> list[str]:
    failures = []
    for key in VERSION_KEYS:
        seen = defaultdict(set)
        for p in reports.values():
            seen[p["versions"][key]].add(node_name(p))
        if len(seen) > 1:
            detail = "; ".join(f"{v} on {', '.join(sorted(hosts))}" for v, hosts in sorted(seen.items()))
            failures.append(f"check 'equal versions' failed: {key} differs: {detail}")
    return failures


def check_master(reports: dict[int, dict], launch: Launch) -> list[str]:
    unreachable = sorted(r for r, p in reports.items() if p["master_ms"] is None)
    if unreachable:
        hosts = sorted({node_name(reports[r]) for r in unreachable})
        return [f"check 'master address reachable' failed: {launch.master_addr}:{launch.master_port} cannot be "
                f"reached from rank {rank_list(unreachable)} on {', '.join(hosts)}"]
    return []


def run_checks(reports: dict[int, dict], claims: dict[int, int], launch: Launch) -> list[str]:
    return (check_world(reports, claims, launch.world) + check_nodes(reports) + check_versions(reports)
            + check_master(reports, launch))
