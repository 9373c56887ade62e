"""The relative L2 errors behind tests/test_attention_kernel.py's bound in Triton's CPU interpreter.

Runs that test file in-process with its `rel_err` recorded, then prints the largest and median error
per test (over its parametrized cases). Usage, from the repository root:
    python benchmarks/kernel_interpreter_errors.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import test_attention_kernel as kernel_tests  # the module pytest will collect (same sys.modules entry)

    errors: dict[str, list[float]] = {}
    measure = kernel_tests.rel_err

    def recorded(out, expected):
        value = measure(out, expected)
        case = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        errors.setdefault(case.split("::")[1].split("[")[0], []).append(value)
        return value

    kernel_tests.rel_err = recorded
    rc = pytest.main(["-q", "-p", "no:randomly", "-p", "no:cacheprovider", "-n", "0",
                      str(ROOT / "tests" / "test_attention_kernel.py")])
    for test, values in errors.items():
        values.sort()
        print(f"{test}: {len(values)} cases, max {values[-1]:.2e}, median {values[len(values) // 2]:.2e}, "
              f"bound {kernel_tests.TOL:g}")
    sys.exit(int(rc))


if __name__ == "__main__":
    main()
