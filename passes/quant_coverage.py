"""What a weight-only quantization pass covered, and the rule that a recipe may not leave most of it float.

Why: a format can be unable to take a matmul (INT4's block has to divide the input width K), and a
pass that quietly skipped those left a model of hidden 576 (576 % 128 != 0; SmolLM2-135M's shape)
with 180 of its 210 decoder matmuls FP16 under `int4-awq` at block 128. So every matmul a pass targets is recorded, quantized (with
its block) or skipped (with the reason), and a pass whose quantized share of the targeted weight
elements is below `min_coverage` (a recipe option, default 0.95) refuses the graph before changing it.
"""

from __future__ import annotations

import dataclasses
import math

DEFAULT_MIN_COVERAGE = 0.95
_LISTED = 3  # skip reasons named in a one-line error


def check_min_coverage(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"min_coverage must be a fraction of the targeted weight elements in [0, 1] "
                         f"(0.5 = half), got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class MatmulPlan:
    """One targeted MatMul: its HF module name, weight [K, N], block along K, or why it stays float."""

    name: str
    k: int
    n: int
    block: int | None = None  # block-wise formats only
    skipped: str | None = None

    @property
    def elements(self) -> int:
        return self.k * self.n


@dataclasses.dataclass
class Coverage:
    matmuls: list[MatmulPlan]
    min_coverage: float = DEFAULT_MIN_COVERAGE

    @property
    def quantized(self) -> list[MatmulPlan]:
        return [m for m in self.matmuls if m.skipped is None]

    @property
    def skipped(self) -> list[MatmulPlan]:
        return [m for m in self.matmuls if m.skipped is not None]

    @property
    def fraction(self) -> float:
        """Quantized share of the targeted weight elements (1.0 when nothing is targeted)."""
        total = sum(m.elements for m in self.matmuls)
        return sum(m.elements for m in self.quantized) / total if total else 1.0

    def summary(self) -> str:
        return (f"{len(self.quantized)} of {len(self.matmuls)} targeted matmuls quantized "
                f"({_percent(self.fraction)} of the targeted linear weight elements)")

    def shortfall(self, pass_name: str) -> str | None:
        """The one-line error when coverage is under `min_coverage`; None when it is enough."""
        if self.fraction >= self.min_coverage:
            return None
        by_reason: dict[str, list[str]] = {}
        for m in self.skipped:
            by_reason.setdefault(m.skipped, []).append(m.name)
        named = "; ".join(f"{names[0]}{f' and {len(names) - 1} more' if len(names) > 1 else ''}: {reason}"
                          for reason, names in list(by_reason.items())[:_LISTED])
        more = f"; and {len(by_reason) - _LISTED} other reasons" if len(by_reason) > _LISTED else ""
        allowed = math.floor(self.fraction * 100) / 100
        return (f"{pass_name}: only {self.summary()}, under min_coverage {_percent(self.min_coverage)} "
                f"(skipped {named}{more}); allow it with `min_coverage: {allowed:.2f}` on the recipe's {pass_name} "
                "entry, or quantize these matmuls with another format (int8-wo, fp8-wo)")

    def as_dict(self) -> dict:
        """For report.json: the counts, the element shares and each matmul's block or skip reason."""
        return {
            "targeted": len(self.matmuls),
            "quantized": len(self.quantized),
            "targeted_elements": sum(m.elements for m in self.matmuls),
            "quantized_elements": sum(m.elements for m in self.quantized),
            "fraction": self.fraction,
            "min_coverage": self.min_coverage,
            "summary": self.summary(),
            "matmuls": {m.name: {"k": m.k, "n": m.n, **({"block": m.block} if m.block else {}),
                                 **({"skipped": m.skipped} if m.skipped else {})} for m in self.matmuls},
        }


def _percent(fraction: float) -> str:
    """Never rounds a shortfall up to 100% (99.96% is not full coverage)."""
    return f"{math.floor(fraction * 1000) / 10:.1f}%"
