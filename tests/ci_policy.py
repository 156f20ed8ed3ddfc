"""What CI does with skips: under CI=true a test may skip only for a reason on ACCEPTED_SKIPS; any other skip
(a missing tool above all) fails the run with its reason, so nothing passes by skipping. Outside CI a skip stays
a skip. The run ends with the count of skips and their reasons either way.

tests/conftest.py wires these functions into pytest's hooks.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

# reason substring -> why CI accepts it
ACCEPTED_SKIPS: dict[str, str] = {
    "docker compose is not installed here": "Compose v2 (the docker CLI plugin) is not packaged for Debian 12; "
                                            "the same test runs with Compose v1 (docker-compose)",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    reason = str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def accepted(reason: str) -> bool:
    return any(pattern in reason for pattern in ACCEPTED_SKIPS)


def enforce(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Turns a skip CI does not accept into a failure that names the reason (the missing tool)."""
    if not (in_ci() and report.skipped):
        return
    reason = skip_reason(report)
    if accepted(reason):
        return
    report.outcome = "failed"
    report.longrepr = (f"CI=true does not accept this skip: {reason}\n"
                       "(.ci/run installs every tool the tests need; tests/ci_policy.py lists the skips CI accepts)")


def summarize(terminalreporter: pytest.TerminalReporter) -> None:
    reports = terminalreporter.stats.get("skipped", [])
    reasons = Counter(skip_reason(report) for report in reports)
    terminalreporter.write_sep("=", f"{len(reports)} skipped")
    for reason, count in reasons.most_common():
        why = next((why for pattern, why in ACCEPTED_SKIPS.items() if pattern in reason), None)
        terminalreporter.write_line(f"{count} x {reason}" + (f"  [accepted in CI: {why}]" if why else ""))
