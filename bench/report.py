"""Results -> results.json, report.md, charts (PNG) and the terminal summary.

Aggregation: for every arm, the median over repetitions of each per-run figure; ratios to
the baseline are taken per repetition (each arm against the baseline of the same
repetition) and then the median of those. Arms that did not run show their reason.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from .arms import ARM_NAMES, ARM_TITLES

# The goals of the benchmark issue (targets to report against, not test assertions).
GOALS = {
    "kernel": {"rps_ratio": 0.97, "added_p50_us": 5.0},
    "userspace": {"rps_ratio": 0.40, "added_p50_us": 60.0},
    "export_spans_per_s": 20000.0,
}

# Per-run summary key -> (column title, format).
COLUMNS = [
    ("rps_c32", "req/s (c32)", "{:,.0f}"),
    ("rps_ratio", "vs baseline", "{:.2f}x"),
    ("p50_us_c1", "p50 c1 (µs)", "{:.0f}"),
    ("added_p50_us_c1", "added p50 c1 (µs)", "{:+.1f}"),
    ("p99_us_c1", "p99 c1 (µs)", "{:.0f}"),
    ("p50_us_fixed", "p50 fixed (µs)", "{:.0f}"),
    ("p99_us_fixed", "p99 fixed (µs)", "{:.0f}"),
    ("cpu_us_per_request", "agent CPU/req (µs)", "{:.1f}"),
    ("peak_rss_mib", "agent peak RSS (MiB)", "{:.1f}"),
    ("spans_per_second", "spans/s exported", "{:,.0f}"),
    ("span_completeness", "spans received / expected", "{:.0%}"),
    ("bpf_ns_per_run", "BPF ns/run", "{:.0f}"),
    ("bpf_runs_per_request", "BPF runs/req", "{:.1f}"),
    ("queued_per_request", "pkts queued/req", "{:.2f}"),
    ("rps_chain", "req/s B→C", "{:,.0f}"),
]


def _median(values: list[Any]) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return round(statistics.median(vals), 3) if vals else None


def aggregate(results: dict[str, Any]) -> None:
    """Fill results["arms"][arm]["available"/"reason"/"aggregate"] and per-run ratios."""
    arms = results["arms"]
    base_by_rep = {r["rep"]: r.get("summary") for r in arms.get("baseline", {}).get("runs", []) if r.get("summary")}
    for name, arm in arms.items():
        runs = arm["runs"]
        ok = [r for r in runs if r.get("summary")]
        for r in ok:
            base = base_by_rep.get(r["rep"])
            s = r["summary"]
            if base and base.get("rps_c32"):
                s["rps_ratio"] = round(s["rps_c32"] / base["rps_c32"], 4)
            if base and base.get("p50_us_c1") is not None and s.get("p50_us_c1") is not None:
                s["added_p50_us_c1"] = round(s["p50_us_c1"] - base["p50_us_c1"], 1)
            if base and base.get("p50_us_fixed") is not None:
                s["added_p50_us_fixed"] = round(s["p50_us_fixed"] - base["p50_us_fixed"], 1)
        arm["available"] = bool(ok)
        failed = [r for r in runs if not r.get("summary")]
        arm["reason"] = failed[0].get("reason", "") if failed and not ok else ""
        arm["failed_runs"] = [{"rep": r["rep"], "reason": r.get("reason", "")} for r in failed]
        keys = sorted({k for r in ok for k in r["summary"]})
        agg: dict[str, Any] = {"runs": len(ok)}
        for k in keys:
            vals = [r["summary"].get(k) for r in ok]
            if all(isinstance(v, bool) for v in vals if v is not None) and any(v is not None for v in vals):
                agg[k] = all(v for v in vals if v is not None)
            else:
                agg[k] = _median(vals)
        agg["headers_inserted_total"] = _sum([r["counters"].get("headers_inserted") for r in ok])
        agg["seq_translated_total"] = _sum([r["counters"].get("seq_translated") for r in ok])
        agg["packets_queued_total"] = _sum([sum(p["queued"] for p in r["phases"].values()) for r in ok])
        # Userspace path: copies of observed packets the agent could not keep up with.
        agg["observe_dropped_total"] = _sum([r["counters"].get("observe_dropped") for r in ok])
        agg["leftovers"] = sorted({x for r in runs for x in r.get("leftovers", [])})
        arm["aggregate"] = agg


def _sum(values: list[Any]) -> int | None:
    vals = [v for v in values if isinstance(v, int)]
    return sum(vals) if vals else None


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals, each met / missed / not measured (with why)."""
    out = []
    arms = results["arms"]
    for name in ("kernel", "userspace"):
        g = GOALS[name]
        arm = arms.get(name)
        agg = (arm or {}).get("aggregate", {})
        why = "arm not run" if arm is None else (arm.get("reason") or "no baseline in the same run")
        for key, label, target, better in (
            ("rps_ratio", "requests/s vs baseline (c32)", g["rps_ratio"], "ge"),
            ("added_p50_us_c1", "added p50 latency at 1 connection (µs)", g["added_p50_us"], "le"),
        ):
            value = agg.get(key)
            met = None if value is None else (value >= target if better == "ge" else value <= target)
            out.append(
                {
                    "arm": name,
                    "goal": label,
                    "target": f"{'>=' if better == 'ge' else '<='} {target:g}",
                    "value": value,
                    "met": met,
                    "note": "" if value is not None else why,
                }
            )
    sp = (results.get("micro") or {}).get("span_pipeline") or {}
    value = sp.get("spans_per_s")
    out.append(
        {
            "arm": "export",
            "goal": "spans/s through the exporter to an OTLP receiver",
            "target": f">= {GOALS['export_spans_per_s']:,.0f}",
            "value": value,
            "met": None if value is None else value >= GOALS["export_spans_per_s"],
            "note": sp.get("unavailable", "") if value is None else f"export() call {sp.get('export_call_us')} µs",
        }
    )
    return out


def _counter_text(arm: dict[str, Any]) -> str:
    runs = [x for x in arm["runs"] if x.get("summary")]
    c = runs[0]["counters"] if runs else {}
    keys = [k for k in c if any(w in k for w in ("lost", "drop", "unmatched", "error", "exported"))]
    return ", ".join(f"{k}={c[k]}" for k in keys) or "none reported"


def _loadavg(machine: dict[str, Any], key: str) -> str:
    v = machine.get(key)
    return " ".join(f"{x:.2f}" for x in v) if v else "?"


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "–"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def markdown(results: dict[str, Any], charts: list[str]) -> str:
    m, v, s = results["machine"], results["versions"], results["settings"]
    lines = [
        "# obi-py benchmark",
        "",
        f"{results['started']} · {m['cpu_model']} · {m['cores']} cores · Linux {m['kernel']} · Python {v['python']} · "
        f"obi-py {v['obi']} ({v.get('git_commit') or 'no git'}) · {v.get('wrk') or 'wrk ?'}",
        "",
        f"Command: `{results['command']}` — {s['reps']} repetition(s), arms interleaved, {s['duration_s']:g} s per load "
        f"phase, fixed rate {s['rate']:g} req/s. Medians over repetitions; ratios and added latency are against "
        f"the baseline of the same repetition. Load average at start/end: {_loadavg(m, 'loadavg_start')} / "
        f"{_loadavg(m, 'loadavg_end')} (anything else running on the machine makes the numbers noisier).",
        "",
    ]
    arms = [a for a in ARM_NAMES if a in results["arms"]]
    head = "| metric | " + " | ".join(ARM_TITLES[a] for a in arms) + " |"
    lines += [head, "|" + "---|" * (len(arms) + 1)]
    for key, title, fmt in COLUMNS:
        row = [title]
        for a in arms:
            arm = results["arms"][a]
            row.append(_fmt(arm["aggregate"].get(key), fmt) if arm["available"] else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    extra = []
    for a in arms:
        agg = results["arms"][a]["aggregate"]
        extra.append(
            ", ".join(
                f"{k}={agg.get(k)}"
                for k in (
                    "headers_inserted_total",
                    "seq_translated_total",
                    "packets_queued_total",
                    "observe_dropped_total",
                )
                if agg.get(k) is not None
            )
            or "–"
        )
    lines.append("| counters (all reps) | " + " | ".join(extra) + " |")
    lines.append(
        "| traceparent reached C | "
        + " | ".join(
            ("yes" if results["arms"][a]["aggregate"].get("traceparent_at_backend") else "no")
            if results["arms"][a]["available"]
            else "n/a"
            for a in arms
        )
        + " |"
    )
    lines.append("")
    for a in arms:
        arm = results["arms"][a]
        if not arm["available"]:
            lines.append(f"- **{ARM_TITLES[a]}: unavailable**: {arm['reason']}")
        for f in arm.get("failed_runs", []) if arm["available"] else []:
            lines.append(f"- {ARM_TITLES[a]}, repetition {f['rep'] + 1} failed: {f['reason']}")
        complete = arm["aggregate"].get("span_completeness") if arm["available"] else None
        if complete is not None and complete < 0.95:
            lines.append(
                f"- {ARM_TITLES[a]}: only {complete:.0%} of the expected spans reached the OTLP receiver "
                f"(agent counters: {_counter_text(arm)})"
            )
        for x in arm["aggregate"].get("leftovers", []):
            lines.append(f"- {ARM_TITLES[a]} left behind (removed by the harness): `{x}`")
    lines += ["", "## Goals", "", "| arm | goal | target | measured | result |", "|---|---|---|---|---|"]
    for g in results["goals"]:
        result = {True: "**met**", False: "**missed**", None: "not measured"}[g["met"]]
        note = f" ({g['note']})" if g["note"] else ""
        lines.append(f"| {g['arm']} | {g['goal']} | {g['target']} | {_fmt(g['value'], '{:,.2f}')} | {result}{note} |")
    lines += verifier_markdown(results.get("verifier") or {})
    micro = results.get("micro") or {}
    if micro:
        lines += ["", "## Micro-benchmarks", ""]
        codec = micro.get("codec") or {}
        if codec.get("unavailable"):
            lines.append(f"- packet codec: unavailable: {codec['unavailable']}")
        elif codec:
            for op, r in codec["ops"].items():
                lines.append(f"- codec `{op}`: {r['us_per_packet']:.2f} µs/packet ({r['desc']})")
        sp = micro.get("span_pipeline") or {}
        if sp.get("unavailable"):
            lines.append(f"- span pipeline: unavailable: {sp['unavailable']}")
        elif sp:
            lines.append(
                f"- span pipeline: {sp['spans_per_s']:,.0f} spans/s from `Exporter.export()` to a local OTLP "
                f"http/protobuf receiver ({sp['spans']} spans, {sp['received']} received, {sp['dropped']} dropped); "
                f"`export()` costs the datapath {sp['export_call_us']:.2f} µs per span"
            )
    lines += [
        "",
        "## What the columns mean",
        "",
        "- **req/s (c32)**: `wrk -c32` closed loop against the server for the phase duration.",
        "- **p50/p99 c1**: `wrk -c1 --latency`; **fixed**: `bench.loadgen` open loop at the fixed rate, "
        "latency from the write of each request (see bench/README.md).",
        "- **agent CPU/req**: user+system CPU of the measured process (agent, or the no-op consumer) over the "
        "serve phases, divided by the requests served in them.",
        "- **BPF ns/run, runs/req**: `kernel.bpf_stats_enabled` counters of the agent's programs (bpftool).",
        "- **pkts queued/req**: packets the kernel queued to userspace in the server namespace "
        "(`/proc/net/netfilter/nfnetlink_queue`), per request.",
        "- **spans/s exported**: spans the OTLP sink received during the arm, per second of load; "
        "**spans received / expected**: one span per request to the server, two per request through B "
        "(B's server and client span).",
        "",
    ]
    if charts:
        lines += ["## Charts", ""] + [f"![{c}]({c})" for c in charts] + [""]
    return "\n".join(lines)


def verifier_markdown(v: dict[str, Any]) -> list[str]:
    """The verifier table: instructions processed to verify each program, per mode."""
    lines = ["", "## Verifier budget", ""]
    if not v:
        return []
    if v.get("unavailable"):
        return lines + [f"Not measured: {v['unavailable']}"]
    rows = v["programs"]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    progs = list(dict.fromkeys((r["object"], r["program"]) for r in rows))
    cell = {(r["object"], r["program"], r["mode"]): r for r in rows}
    worst = max((r["verified_insns"] for r in rows), default=0)
    lines += [
        f"Instructions the verifier processed to accept each program (`verified_insns`), per mode "
        f"(`obi_cfg_flags`), on kernel build `{v['kernel_build']}`; budget {v['budget']:,} (a quarter of the "
        f"{v['limit']:,} limit); largest {worst:,}.",
        "",
        "| object | program | " + " | ".join(modes) + " |",
        "|---|---|" + "---|" * len(modes),
    ]
    for o, p in progs:
        vals = []
        for m in modes:
            r = cell.get((o, p, m))
            vals.append("–" if r is None else (f"{r['verified_insns']:,}" if not r["error"] else "**rejected**"))
        lines.append(f"| {o} | {p} | " + " | ".join(vals) + " |")
    for r in rows:
        if r["error"]:
            lines.append(f"- {r['object']}/{r['program']} [{r['mode']}]: {r['error']}")
    return lines


def charts(results: dict[str, Any], out_dir: Path) -> list[str]:
    """req/s ratio bars and latency bars; returns the file names written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    arms = [a for a in ARM_NAMES if a in results["arms"]]
    titles = [ARM_TITLES[a] for a in arms]
    agg = {a: results["arms"][a]["aggregate"] if results["arms"][a]["available"] else {} for a in arms}
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ratios = [agg[a].get("rps_ratio") or 0 for a in arms]
    bars = ax.bar(titles, ratios, color=["#888", "#2a7", "#27c", "#c72"][: len(arms)])
    for bar, a in zip(bars, arms):
        label = f"{agg[a]['rps_ratio']:.2f}x" if agg[a].get("rps_ratio") is not None else "n/a"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    for target, style in ((GOALS["kernel"]["rps_ratio"], "--"), (GOALS["userspace"]["rps_ratio"], ":")):
        ax.axhline(target, linestyle=style, color="k", linewidth=0.8)
    ax.set_ylabel("requests/s vs baseline (wrk -c32)")
    ax.set_ylim(0, max([1.1, *ratios]) * 1.1)
    ax.set_title("Throughput relative to the uninstrumented server")
    fig.tight_layout()
    fig.savefig(out_dir / "rps_ratio.png", dpi=110)
    plt.close(fig)
    written.append("rps_ratio.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    series = [
        ("p50_us_c1", "p50 c1"),
        ("p99_us_c1", "p99 c1"),
        ("p50_us_fixed", "p50 fixed"),
        ("p99_us_fixed", "p99 fixed"),
    ]
    width = 0.8 / len(series)
    for i, (key, label) in enumerate(series):
        xs = [j + (i - len(series) / 2 + 0.5) * width for j in range(len(arms))]
        ax.bar(xs, [agg[a].get(key) or 0.0 for a in arms], width, label=label)
    ax.set_xticks(range(len(arms)), [t + ("" if agg[a] else "\n(n/a)") for t, a in zip(titles, arms)])
    ax.set_yscale("log")  # p99 is often 10-100x p50; a log axis keeps both readable
    ax.set_ylabel("latency (µs, log scale)")
    ax.set_title(f"Latency at 1 connection and at {results['settings']['rate']:g} req/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "latency.png", dpi=110)
    plt.close(fig)
    written.append("latency.png")
    return written


def arm_line(r: dict[str, Any]) -> str:
    """One terminal line for a finished arm repetition."""
    name = f"rep {r['rep'] + 1} {ARM_TITLES[r['arm']]:<15}"
    if not r.get("summary"):
        return f"  {name} unavailable: {r.get('reason', '')[:300]}"
    s = r["summary"]
    parts = [f"{s['rps_c32']:>9,.0f} req/s", f"p50 c1 {s['p50_us_c1']:.0f}µs"]
    if s.get("cpu_us_per_request") is not None:
        parts.append(f"CPU {s['cpu_us_per_request']:.1f}µs/req")
    if s.get("queued_per_request"):
        parts.append(f"queued {s['queued_per_request']:.2f}/req")
    if s.get("bpf_ns_per_run"):
        parts.append(f"BPF {s['bpf_ns_per_run']:.0f}ns/run")
    if s.get("headers_inserted") is not None:
        parts.append(f"headers {s['headers_inserted']}")
    return f"  {name} " + " · ".join(parts)


def finish(results: dict[str, Any], out_dir: Path, charts: bool = True) -> None:
    aggregate(results)
    results["goals"] = goals(results)
    written = _charts_safe(results, out_dir) if charts else []
    results["charts"] = written
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(markdown(results, written), encoding="utf-8")


def _charts_safe(results: dict[str, Any], out_dir: Path) -> list[str]:
    try:
        return charts(results, out_dir)
    except Exception as e:  # a chart must never cost the numbers
        results["charts_error"] = repr(e)
        return []


def terminal_summary(results: dict[str, Any], out_dir: Path) -> str:
    lines = ["", "summary (medians):"]
    for name, arm in results["arms"].items():
        if not arm["available"]:
            lines.append(f"  {ARM_TITLES[name]:<16} unavailable: {arm['reason'][:200]}")
            continue
        a = arm["aggregate"]
        ratio = f"{a['rps_ratio']:.2f}x" if a.get("rps_ratio") is not None else "–"
        added = f"{a['added_p50_us_c1']:+.0f}µs" if a.get("added_p50_us_c1") is not None else ""
        lines.append(
            f"  {ARM_TITLES[name]:<16} {a.get('rps_c32') or 0:>9,.0f} req/s {ratio:>6}  p50 c1 "
            f"{a.get('p50_us_c1') or 0:.0f}µs {added}"
        )
    for g in results["goals"]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[g["met"]]
        val = "–" if g["value"] is None else f"{g['value']:,.2f}"
        lines.append(f"  goal {g['arm']}: {g['goal']} {g['target']}: {val} -> {verdict}")
    lines.append(
        f"results: {out_dir}/results.json, report.md"
        + (", " + ", ".join(results["charts"]) if results.get("charts") else "")
    )
    return "\n".join(lines)
