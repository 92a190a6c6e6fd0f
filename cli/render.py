"""Rich renderings shared by several commands (and the demo): durations, percentages, a round's report."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def prompt_fit_line(report: dict[str, Any]) -> str:
    """``answered with fewer demonstrations: N; skipped (prompt too long): M (weak: a, strong: b)``."""
    skipped = report.get("skipped_prompt_too_long") or {}
    by_voter = f" ({', '.join(f'{voter}: {n}' for voter, n in skipped.items())})" if skipped else ""
    return (f"answered with fewer demonstrations: {report.get('fewer_demonstrations', 0)}; "
            f"skipped (prompt too long): {sum(skipped.values())}{by_voter}")


def render_report(report: dict[str, Any]) -> Table:
    table = Table("", "value", title="report", show_header=False)
    if "deferred" in report:
        table.add_row("not yet", report["deferred"])
    if "vote" in report:  # a deferred report: the vote's stored counts
        vote = report["vote"]
        table.add_row("pool questions", str(vote["pool"]))
        table.add_row("answered by both voters", str(vote["voted"]))
        table.add_row("kept by the vote", f"{vote['kept']} ({pct(report.get('kept_share'))})")
        if vote.get("dropped_by_step_score"):
            table.add_row("dropped by step score", str(vote["dropped_by_step_score"]))
    if "pool" in report:
        table.add_row("pool questions", str(report["pool"]))
        table.add_row("answered (weak / strong)", f"{report['weak_answered']} / {report['strong_answered']}")
        table.add_row("kept by the vote", f"{report['kept']} ({pct(report['kept_share'])})")
        if report.get("dropped_by_step_score"):
            table.add_row("dropped by step score", str(report["dropped_by_step_score"]))
        if report.get("has_gold"):
            table.add_row("weak accuracy, all pool", pct(report.get("weak_accuracy")))
            table.add_row("strong accuracy, all pool", pct(report.get("strong_accuracy")))
            table.add_row("pseudo-label accuracy, kept set", pct(report.get("kept_accuracy")))
            if report.get("kept_by_gold_steps"):
                mix = ", ".join(f"{k} steps: {v}" for k, v in report["kept_by_gold_steps"].items())
                table.add_row("kept set by solution length", mix)
        else:
            table.add_row("accuracies", "the pool has no gold answers")
    if report.get("fewer_demonstrations") or report.get("skipped_prompt_too_long"):
        table.add_row("prompts cut to fit the context", prompt_fit_line(report))
    if "pairs" in report:
        table.add_row("questions sampled", str(report["sampled_questions"]))
        skipped = report.get("skipped") or {}
        table.add_row("skipped", ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in skipped.items()) or "none")
        by_case = report.get("pairs_by_case") or {}
        cases = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in by_case.items())
        table.add_row("pairs", f"{report['pairs']} ({cases})")
        if report.get("pass_at_k"):
            passk = report["pass_at_k"]
            table.add_row(f"pass@{passk['k']} on the eval set", ", ".join(
                f"{name}: {pct(value)}" for name, value in passk.items() if name != "k"))
        if report.get("chosen_accuracy") is not None:
            table.add_row("accuracy of chosen / rejected",
                          f"{pct(report['chosen_accuracy'])} / {pct(report['rejected_accuracy'])}")
    reporting = bool(report.get("report_on"))
    if report.get("decided_on"):
        # Which split decided, and which one is only reported: accuracies read "dev / test".
        splits = f"decided on {report['decided_on']}" + (f"; reported on {report['report_on']} (never decides)"
                                                         if reporting else "")
        table.add_row("splits", splits + (f" — accuracies: {report['decided_on']} / {report['report_on']}"
                                          if reporting else ""))
    if report.get("student_before"):
        before = report["student_before"]
        table.add_row("student before", f"{before['name']} {_both(before, reporting)}")
    for variant, entry in (report.get("variants") or {}).items():
        setting = entry.get("setting")
        label = f"candidate {variant}" if setting else f"variant {variant}"
        settings = escape(f" [{', '.join(f'{k}={v}' for k, v in setting.items())}]") if setting else ""
        if entry.get("skipped"):
            table.add_row(label, f"{entry['examples']} examples{settings} — skipped: {entry['skipped']}")
        elif entry.get("checkpoint"):
            loss = entry.get("train_loss")
            unit = "pairs" if entry.get("training_set", variant) in ("dpo", "orpo") else "examples"
            table.add_row(label, f"{entry['examples']} {unit}{settings} → {entry['checkpoint']} "
                          f"{_both(entry, reporting)} ({entry.get('status')})"
                          + (f", final train loss {loss:.3f}" if loss is not None else ""))
        else:
            table.add_row(label, f"{entry['examples']} examples{settings}, training {entry['state']}")
    if report.get("outcome"):
        colour = "green" if report["outcome"] == "promoted" else "yellow"
        table.add_row("decision", f"[{colour}]{report['outcome']}[/]: {report['reason']}")
    return table


def _both(entry: dict[str, Any], reporting: bool) -> str:
    """An accuracy on the deciding split, and on the report_on split when the round has one."""
    return f"{pct(entry.get('accuracy'))} / {pct(entry.get('report_accuracy'))}" if reporting else pct(entry.get("accuracy"))
