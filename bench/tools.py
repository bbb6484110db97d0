"""The machine: which tools exist, how the CPUs are split between the proxy and the load, Go builds."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEERS_DIR = Path(__file__).resolve().parent / "peers"
GO_PROGRAMS = ("upstream", "refproxy", "sseload")
INSTALL_HINT = "apt-get install golang-go wrk"


def say(message: str) -> None:
    print(message, flush=True)


@dataclass
class Layout:
    """Which CPUs each side runs on. Empty lists mean: not pinned."""

    pinned: bool
    proxy_1w: list[int]  # the Go reference and our 1-worker proxy
    proxy_2w: list[int]  # our proxy under supervisord with 2 workers
    load: list[int]  # fake upstream, load generators, fake backend, this harness
    note: str
    shared_2w: bool = False  # the 2 workers share a CPU with the load side

    def prefix(self, cpus: list[int]) -> list[str]:
        if not self.pinned or not cpus:
            return []
        return ["taskset", "-c", ",".join(map(str, cpus))]

    def describe(self, cpus: list[int]) -> str:
        return ",".join(map(str, cpus)) if self.pinned and cpus else "any"


def cpu_layout(disable: bool = False) -> Layout:
    cpus = sorted(os.sched_getaffinity(0))
    if disable or shutil.which("taskset") is None or len(cpus) < 2:
        why = "disabled (--no-pin)" if disable else ("taskset not found" if len(cpus) >= 2 else "one CPU")
        return Layout(
            False, [], [], [], f"no CPU pinning ({why}): every process on any of {len(cpus)} CPU(s)"
        )
    if len(cpus) >= 4:
        layout = Layout(True, cpus[:1], cpus[:2], cpus[2:], "")
    else:
        # 2 or 3 CPUs: the proxy gets CPU 0, the load side the last one; two workers need two CPUs,
        # so they run on the proxy CPU plus the load CPU, which they then share with the load.
        layout = Layout(True, cpus[:1], cpus[:2], cpus[-1:], "", shared_2w=True)
    layout.note = (
        f"CPU pinning (taskset): Go reference and proxy 1 worker on CPU {layout.describe(layout.proxy_1w)}; "
        f"proxy 2 workers on CPUs {layout.describe(layout.proxy_2w)}; fake upstream, load generators and "
        f"harness on CPU {layout.describe(layout.load)}"
        + (
            " (on this machine the 2 workers share a CPU with the load side: the 2-worker throughput "
            "target needs >= 4 CPUs to mean anything)"
            if layout.shared_2w
            else ""
        )
    )
    return layout


@dataclass
class Toolbox:
    go: str | None
    wrk: str | None
    bins: dict[str, str] = field(default_factory=dict)
    build_error: str = ""
    redis_server: str | None = None  # for small-limits only (no note when missing)

    @property
    def have_go(self) -> bool:
        return all(name in self.bins for name in GO_PROGRAMS)


def find_tools(workdir: Path, no_go: bool = False) -> Toolbox:
    box = Toolbox(go=None if no_go else shutil.which("go"), wrk=shutil.which("wrk"))
    box.redis_server = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin:/usr/sbin")
    missing = [name for name, path in (("go (golang-go)", box.go), ("wrk", box.wrk)) if path is None]
    if missing:
        say(
            f"NOTE: {' and '.join(missing)} not found: install with `{INSTALL_HINT}`; "
            "running what is possible."
        )
    if box.go:
        build_go(box, workdir / "bin")
    return box


def build_go(box: Toolbox, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = Path("/tmp") / f"bench-go-{os.getuid()}"
    env = {
        **os.environ,
        "GOCACHE": str(cache / "cache"),
        "GOPATH": str(cache / "path"),
        "GOPROXY": "off",
        "GOFLAGS": "",
        "GO111MODULE": "on",
        "CGO_ENABLED": "0",
    }
    for name in GO_PROGRAMS:
        target = out_dir / name
        proc = subprocess.run(
            [box.go, "build", "-o", str(target), str(PEERS_DIR / f"{name}.go")],
            cwd=PEERS_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode != 0:
            box.build_error = f"go build {name}.go failed:\n{proc.stderr.strip()}"
            say(f"NOTE: {box.build_error}\n      Go peers and the streaming load are skipped.")
            box.bins.clear()
            return
        box.bins[name] = str(target)


def machine_facts() -> dict[str, object]:
    model = ""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "proxyapp", "common", "wsgi.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    go_version = ""
    if shutil.which("go"):
        go_version = subprocess.run(["go", "version"], capture_output=True, text=True).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "go": go_version,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "git_commit": (git.stdout.strip() or "unknown")
        + (" (+ uncommitted changes)" if dirty.stdout.strip() else ""),
    }
