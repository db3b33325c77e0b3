"""Print the README's supported-architectures table by running the family matrix.

    python scripts/family_table.py [hooked|bridge] > table.md   # one backend, or both

Each cell is what tests/test_families.py checks on a tiny random model of that family:
"exact" (the method's invariant holds to float rounding), "refused (n)" with the reason
listed under the table, or "WRONG" (a bug: the tests fail on it).
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from family_checks import METHODS, run_check  # noqa: E402

from tl_lenses.tiny_families import family_members, family_summary, tiny_family  # noqa: E402


def _reason(detail: str) -> str:
    """The refusal message without the exception type, first sentence only."""
    text = detail.split(": ", 1)[-1]
    return text.split("; ")[0].split(". ")[0]


def main(backends: list[str]) -> int:
    """Print the matrix of the members on ``backends`` (all when empty) as markdown."""
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    reasons: list[str] = []
    print("| family | backend | what it has | " + " | ".join(METHODS) + " |")
    print("|---|---|---|" + "---|" * len(METHODS), flush=True)
    for family, backend in family_members():
        if backends and backend not in backends:
            continue
        model = tiny_family(family, backend)
        cells = []
        for method in METHODS:
            outcome = run_check(model, method)
            if outcome.status == "refused":
                reason = _reason(outcome.detail)
                if reason not in reasons:
                    reasons.append(reason)
                cells.append(f"refused ({reasons.index(reason) + 1})")
            else:
                cells.append("exact" if outcome.status == "exact" else "**WRONG**")
        summary = family_summary(family, backend)
        # One row at a time: a long run interrupted still leaves the rows it finished.
        print(f"| {family} | {backend} | {summary} | " + " | ".join(cells) + " |", flush=True)
        print(f"{family}/{backend} done; reasons so far: {reasons}", file=sys.stderr, flush=True)
    print()
    for i, reason in enumerate(reasons, 1):
        print(f"{i}. {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
