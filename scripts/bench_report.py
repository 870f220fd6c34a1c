#!/usr/bin/env python3
"""Turns the results of scripts/bench.sh into the markdown summary for BENCHMARKS.md.

Each figure is the median over the repetitions, with the spread (min–max) in brackets. "Added"
is what a middle adds over the direct connection: median(middle) − median(direct).
Standard library only.
"""

import glob
import json
import os
import statistics
import sys

TARGETS = ["direct", "pipe", "relay"]
SCENARIOS = {
    "paced": "10 sessions, 50 deltas of 64 B every 1 ms",
    "saturation": "50 sessions, 50 deltas of 64 B per turn, unpaced",
    "big_paced": "10 sessions, 20 deltas of 16 KiB every 1 ms",
    "big_unpaced": "10 sessions, 20 deltas of 16 KiB per turn, unpaced",
}
# (label, how to read it off one run, lower is better)
FIGURES = [
    ("latency p50 (µs)", lambda r, c: r["latency_us"]["p50"], True),
    ("latency p99 (µs)", lambda r, c: r["latency_us"]["p99"], True),
    ("first event p50 (µs)", lambda r, c: r["first_event_us"]["p50"], True),
    ("first event p99 (µs)", lambda r, c: r["first_event_us"]["p99"], True),
    ("turn p50 (ms)", lambda r, c: r["turn_ms"]["p50"], True),
    ("events/s", lambda r, c: r["events_per_sec"], False),
    ("MB/s of frames", lambda r, c: r["frame_bytes_per_sec"] / 1e6, False),
    ("middle CPU per 1k events (ms)", lambda r, c: cpu_per_k(r, c), True),
    ("errors", lambda r, c: sum(r["errors"].values()), True),
]


def cpu_per_k(run, cpu):
    if cpu is None or not run["events"]:
        return None
    return cpu["cpu_ns"] / run["events"] * 1000 / 1e6


def load(out, scen, target):
    runs = []
    for path in sorted(glob.glob(os.path.join(out, f"{scen}.{target}.*.json"))):
        if path.endswith(".cpu.json"):
            continue
        with open(path) as f:
            run = json.load(f)
        cpu_path = path[: -len(".json")] + ".cpu.json"
        cpu = None
        if target != "direct" and os.path.exists(cpu_path):
            with open(cpu_path) as f:
                cpu = json.load(f)
        runs.append((run, cpu))
    return runs


def stat(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def fmt(x):
    if x is None:
        return "—"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"


def cell(s):
    if s is None:
        return "—"
    med, lo, hi = s
    return f"{fmt(med)} [{fmt(lo)}–{fmt(hi)}]" if lo != hi else fmt(med)


def scenario_table(out, scen):
    data = {t: load(out, scen, t) for t in TARGETS}
    if not any(data.values()):
        return None, {}
    lines = [
        f"### {scen}: {SCENARIOS[scen]}",
        "",
        "| figure | direct | pipe (nginx) | relay | relay/direct | pipe added | relay added |",
        "|---|---|---|---|---|---|---|",
    ]
    medians = {}
    for label, get, _ in FIGURES:
        stats = {t: stat([get(r, c) for r, c in data[t]]) for t in TARGETS}
        med = {t: (s[0] if s else None) for t, s in stats.items()}
        medians[label] = med
        d, p, r = med["direct"], med["pipe"], med["relay"]
        ratio = f"{r / d:.2f}" if d and r is not None else "—"
        p_add = fmt(p - d) if None not in (p, d) else "—"
        r_add = fmt(r - d) if None not in (r, d) else "—"
        lines.append(
            f"| {label} | {cell(stats['direct'])} | {cell(stats['pipe'])} | {cell(stats['relay'])} "
            f"| {ratio} | {p_add} | {r_add} |"
        )
    return "\n".join(lines), medians


def idle_table(out):
    rows = []
    per = {}
    for target in ["pipe", "relay"]:
        path = os.path.join(out, f"idle.{target}.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            r = json.load(f)
        n = max(r["opened"], 1)
        kib = (r["rss_after_kb"] - r["rss_before_kb"]) / n
        per[target] = kib
        rows.append(
            f"| {'pipe (nginx)' if target == 'pipe' else 'relay'} | {r['opened']} of {r['sockets']} "
            f"| {r['rss_before_kb']:,} | {r['rss_after_kb']:,} | {kib:.1f} |"
        )
    if not rows:
        return None, per
    head = [
        "### idle: authenticated sockets held open",
        "",
        "| middle | sockets open | RSS before (KiB) | RSS with them (KiB) | KiB per socket |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(head + rows), per


def verdict(ok):
    return "**met**" if ok else "**missed**"


def targets(m, idle):
    out = ["### Targets", ""]

    def added(scen, label, t):
        med = m.get(scen, {}).get(label, {})
        if None in (med.get(t), med.get("direct")):
            return None
        return med[t] - med["direct"]

    for label in ["latency p50 (µs)", "latency p99 (µs)", "first event p50 (µs)"]:
        r, p = added("paced", label, "relay"), added("paced", label, "pipe")
        if None not in (r, p):
            out.append(f"- added {label} (paced): relay {fmt(r)}, pipe {fmt(p)} → {verdict(r <= p)}")
    for scen, label in [("saturation", "events/s"), ("big_unpaced", "MB/s of frames")]:
        med = m.get(scen, {}).get(label, {})
        r, p = med.get("relay"), med.get("pipe")
        if None not in (r, p):
            out.append(f"- {scen} {label}: relay {fmt(r)}, pipe {fmt(p)} → {verdict(r >= p)}")
    for scen in ["paced", "saturation"]:
        med = m.get(scen, {}).get("middle CPU per 1k events (ms)", {})
        r, p = med.get("relay"), med.get("pipe")
        if None not in (r, p):
            out.append(f"- CPU per 1k 64 B events ({scen}): relay {r:.2f} ms, pipe {p:.2f} ms "
                       f"(relay/pipe {r / p:.1f}×)")
    if "relay" in idle:
        pipe = f", pipe {idle['pipe']:.1f} KiB" if "pipe" in idle else ""
        out.append(f"- idle socket: relay {idle['relay']:.1f} KiB{pipe} (target ≤ 16 KiB) → "
                   f"{verdict(idle['relay'] <= 16)}")
    return "\n".join(out)


def one_line(path):
    with open(path) as f:
        r = json.load(f)
    lat = r["latency_us"]
    return (f"{r['events_per_sec']:.0f} ev/s, p50 {lat['p50']} us, p99 {lat['p99']} us, "
            f"first event p50 {r['first_event_us']['p50']} us, errors {r['errors']}")


def main():
    if sys.argv[1] == "--line":
        print(one_line(sys.argv[2]))
        return
    out = sys.argv[1]
    parts = ["## Summary (scripts/bench.sh)", ""]
    machine = os.path.join(out, "machine.txt")
    if os.path.exists(machine):
        with open(machine) as f:
            parts += ["```", f.read().rstrip(), "```", ""]
    parts += ["Median over the repetitions, [min–max] when they differ; added = middle − direct.", ""]
    medians = {}
    for scen in SCENARIOS:
        table, med = scenario_table(out, scen)
        if table:
            parts += [table, ""]
            medians[scen] = med
    table, idle = idle_table(out)
    if table:
        parts += [table, ""]
    parts.append(targets(medians, idle))
    print("\n".join(parts))


if __name__ == "__main__":
    main()
