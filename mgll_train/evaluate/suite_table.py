"""What a protocol or a suite reports: the lines above a protocol's table.txt, and suite.json,
suite.md and suite.tex (one row per protocol and metric, one column per training fraction or
zero-shot, each cell the value and its 95 % bootstrap interval, 4 decimals)."""

from __future__ import annotations

from typing import Any

from .protocols import METRIC_NAMES, PROTOCOLS
from .table import aligned, note, number

# Suite columns in this order; a protocol fills the ones it measures.
SETTINGS = ("zero-shot", "1%", "10%", "100%")


def _ci(ci: list[float | None] | tuple[float | None, ...]) -> str:
    return "n/a" if ci[0] is None else f"[{number(ci[0])}, {number(ci[1])}]"


def _overrides(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k.replace('_', '-')} {v}" for k, v in sorted(overrides.items()))


def protocol_lines(metrics: dict[str, Any]) -> list[str]:
    """The protocol's name, version, setup and numbers (above a protocol's table.txt)."""
    block = metrics["protocol"]
    protocol = PROTOCOLS[block["name"]]
    lines = [f"protocol {block['name']} v{block['version']} on {metrics['data']}"]
    lines += note(block["setup"])
    if block["overrides"]:
        lines += note(f"overridden (not the protocol's setup): {_overrides(block['overrides'])}")
    rows = [["setting", "metric", "value", "95 % CI"]]
    for r in protocol.results(metrics):
        rows.append([r.setting, METRIC_NAMES[r.metric], number(r.value), _ci(r.ci95)])
    return [*lines, *aligned(rows), ""]


def suite_json(
    suite: str,
    header: dict[str, Any],
    done: dict[str, dict[str, Any]],
    skipped: dict[str, str],
) -> dict[str, Any]:
    """suite.json: every number of every protocol run (as in its metrics.json), and why the
    others were skipped."""
    protocols = []
    for name, metrics in done.items():
        block = metrics["protocol"]
        results = [
            {"setting": r.setting, "metric": r.metric, "value": r.value, "ci95": list(r.ci95)}
            for r in PROTOCOLS[name].results(metrics)
        ]
        protocols.append(
            {
                "name": name,
                "version": block["version"],
                "pipeline": block["pipeline"],
                "data": metrics["data"],
                "overrides": block["overrides"],
                "metrics_json": f"{name}/metrics.json",
                "results": results,
            }
        )
    return {"suite": suite, **header, "protocols": protocols, "skipped": skipped}


def _grid(summary: dict[str, Any]) -> tuple[list[str], list[tuple[dict, str, dict[str, dict]]]]:
    """The settings used (columns) and one row per (protocol, metric) with its cells."""
    rows = []
    used: set[str] = set()
    for p in summary["protocols"]:
        by_metric: dict[str, dict[str, dict]] = {}
        for r in p["results"]:
            by_metric.setdefault(r["metric"], {})[r["setting"]] = r
            used.add(r["setting"])
        rows += [(p, metric, cells) for metric, cells in by_metric.items()]
    return [s for s in SETTINGS if s in used], rows


def _footer(summary: dict[str, Any]) -> list[str]:
    """Which numbers are not the protocol's setup, and which protocols did not run, why."""
    lines = []
    for p in summary["protocols"]:
        if p["overrides"]:
            lines.append(f"{p['name']} v{p['version']}: overridden, {_overrides(p['overrides'])}")
    for name, why in summary["skipped"].items():
        lines.append(f"{name}: skipped, {why}")
    return lines


def suite_markdown(summary: dict[str, Any]) -> str:
    """suite.md: a Markdown table, value and [95 % CI] per cell, then the notes."""
    settings, rows = _grid(summary)
    lines = [
        f"# {summary['suite']} suite: {summary['checkpoint']} (step {summary['step']})",
        "",
        "| protocol | metric | " + " | ".join(settings) + " |",
        "|---|---|" + "---|" * len(settings),
    ]
    for p, metric, cells in rows:
        values = [
            f"{number(c['value'])} {_ci(c['ci95'])}" if c else "–"
            for c in (cells.get(s) for s in settings)
        ]
        title = f"{p['name']} v{p['version']}"
        lines.append(f"| {title} | {METRIC_NAMES[metric]} | " + " | ".join(values) + " |")
    notes = _footer(summary)
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else [])) + "\n"


_TEX_SPECIAL = {c: "\\" + c for c in "&%_#${}"} | {"\\": "\\textbackslash{}"}


def _tex(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(c, c) for c in text)


def suite_latex(summary: dict[str, Any]) -> str:
    """suite.tex: a booktabs table, value with its [95 % CI] in small type, then the notes."""
    settings, rows = _grid(summary)
    lines = [
        "\\begin{tabular}{ll" + "c" * len(settings) + "}",
        "\\toprule",
        "Protocol & Metric & " + " & ".join(_tex(s) for s in settings) + " \\\\",
        "\\midrule",
    ]
    for p, metric, cells in rows:
        values = [
            f"{number(c['value'])} {{\\scriptsize {_tex(_ci(c['ci95']))}}}" if c else "--"
            for c in (cells.get(s) for s in settings)
        ]
        title = _tex(f"{p['name']} v{p['version']}")
        lines.append(f"{title} & {METRIC_NAMES[metric]} & " + " & ".join(values) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    lines += [f"% {n}" for n in _footer(summary)]
    return "\n".join(lines) + "\n"
