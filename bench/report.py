"""Medians, ratios to the Go reference, targets, and the results files (JSON + markdown)."""

from __future__ import annotations

import datetime as dt
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# latest.md's order: each HTTPS variant beside its plain one.
SCENARIOS = (
    "small",
    "small-tls",
    "small-limits",
    "stream1000",
    "stream1000-tls",
    "stream300-tls",
    "tlsconn",
    "reload",
    "ladder",
    "ladder-tls",
)
GO = "b"


def ratio_key(base: str) -> str:
    """Where a summary keeps the ratio to its base peer: the Go reference, or another (small-limits)."""
    return "ratio_to_go" if base == GO else "ratio_to_base"


@dataclass(frozen=True)
class Figure:
    key: str  # the key in each run's dict
    label: str
    fmt: str = ",.1f"
    ratio: bool = True  # show the ratio to the Go reference (or the result's ratio_base)


def summarize(
    runs: dict[str, list[dict]], figures: list[Figure], base: str = GO
) -> dict[str, dict[str, dict]]:
    """{peer: {figure: {median, min, max, n, ratio_to_go}}} over the runs that have the figure
    (``base`` other than the Go reference: ratio_to_base, the ratio to that peer's median)."""
    out: dict[str, dict[str, dict]] = {}
    for peer, peer_runs in runs.items():
        out[peer] = {}
        for fig in figures:
            values = [run[fig.key] for run in peer_runs if isinstance(run.get(fig.key), (int, float))]
            if values:
                out[peer][fig.key] = {
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                    "n": len(values),
                }
    for peer, figs in out.items():
        for key, stats in figs.items():
            ref = out.get(base, {}).get(key)
            if ref and ref["median"] > 0 and peer != base:
                stats[ratio_key(base)] = stats["median"] / ref["median"]
    return out


def _num(value: float, fmt: str) -> str:
    return format(value, fmt)


def cell(stats: dict | None, fig: Figure, peer: str, base: str = GO) -> str:
    if not stats:
        return "–"
    text = _num(stats["median"], fig.fmt)
    if stats["n"] > 1 and stats["min"] != stats["max"]:
        text += f" [{_num(stats['min'], fig.fmt)}–{_num(stats['max'], fig.fmt)}]"
    if fig.ratio and peer != base and ratio_key(base) in stats:
        text += f" ×{stats[ratio_key(base)]:.2f}"
    return text


@dataclass
class Target:
    name: str
    value: float | None
    limit: float | None
    rule: str  # how the value and the limit were taken, for the reader
    fmt: str = ",.1f"
    below: bool = True  # pass when value <= limit (else value >= limit)

    def verdict(self) -> str:
        if self.value is None or self.limit is None:
            return "n/a"
        ok = self.value <= self.limit if self.below else self.value >= self.limit
        return "PASS" if ok else "MISS"

    def line(self) -> str:
        if self.value is None or self.limit is None:
            return f"- **n/a** {self.name} — not measured ({self.rule})"
        sign = "≤" if self.below else "≥"
        return (
            f"- **{self.verdict()}** {self.name}: {_num(self.value, self.fmt)} {sign} "
            f"{_num(self.limit, self.fmt)} ({self.rule})"
        )

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "value": self.value,
            "limit": self.limit,
            "rule": self.rule,
            "verdict": self.verdict(),
        }


def get(summary: dict, peer: str, key: str, what: str = "median") -> float | None:
    stats = summary.get(peer, {}).get(key)
    return None if stats is None else stats[what]


def markdown(result: dict, figures: list[Figure], targets: list[Target]) -> str:
    meta = result["meta"]
    peers = result["peers"]
    base = result.get("ratio_base", GO)
    base_label = "the Go reference" if base == GO else f"“{peers.get(base, base)}”"
    lines = [
        f"## {result['scenario']} — {result['title']}",
        "",
        f"{meta['date']}, commit {meta['machine']['git_commit']}; {meta['machine']['cpus']} CPUs "
        f"({meta['machine']['cpu_model'] or 'unknown model'}), load average at start "
        f"{' / '.join(map(str, meta['machine']['load_average_at_start']))}"
        + ("; **quick run** (shorter loads: not for comparison)" if meta["quick"] else ""),
        f"{meta['pinning']}. Fake upstream: {meta['upstream']}.",
        f"Each figure: median of {meta['runs']} interleaved runs (peer order "
        f"{', '.join(peers)} repeated) [min–max], ×ratio of the medians to {base_label} of this run.",
        "",
    ]
    lines += [f"- {note}" for note in result["setup"]] + [""]
    header = "| figure | " + " | ".join(peers[p] for p in peers) + " |"
    lines += [header, "|---" * (len(peers) + 1) + "|"]
    summary = result["summary"]
    for fig in figures:
        if not any(fig.key in summary.get(p, {}) for p in peers):
            continue
        lines.append(
            f"| {fig.label} | "
            + " | ".join(cell(summary.get(p, {}).get(fig.key), fig, p, base) for p in peers)
            + " |"
        )
    if result.get("extra_md"):
        lines += ["", result["extra_md"].rstrip("\n")]
    if targets:
        lines += ["", "Targets (reported, not asserted):", ""] + [t.line() for t in targets]
    else:
        lines += ["", "No targets for this scenario: its figures are reported beside the Go reference's."]
    if result["notes"]:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def file_stem(scenario: str, quick: bool, date: str | None = None) -> str:
    date = date or dt.date.today().isoformat()
    return f"{date}-{scenario}" + ("-quick" if quick else "")


def write(result: dict, md: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = file_stem(result["scenario"], result["meta"]["quick"], result["meta"]["date"])
    json_path, md_path = RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    md_path.write_text(md)
    return json_path, md_path


def write_latest(done: dict[str, str], quick: bool) -> Path:
    """latest.md (latest-quick.md for --quick): every scenario, from this run when it ran one,
    otherwise from the newest results file of that scenario (marked as such)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if quick else ""
    parts = [
        "# Benchmark results" + (" (quick run)" if quick else ""),
        "",
        "Written by `python -m bench` (see bench/README.md for what each figure means).",
        "",
    ]
    for scenario in SCENARIOS:
        if scenario in done:
            parts.append(done[scenario])
            continue
        older = sorted(p for p in RESULTS.glob(f"????-??-??-{scenario}{suffix}.md"))
        if older:
            parts.append(f"*(not part of the latest run: from {older[-1].name})*\n")
            parts.append(older[-1].read_text())
        else:
            parts.append(f"## {scenario}\n\nNot run yet.\n")
    path = RESULTS / f"latest{suffix}.md"
    path.write_text("\n".join(parts))
    return path
