"""Per-matmul weight precision under an accuracy budget, and the sensitivity measurements it rests on.

Why: a uniform recipe spends the same bits on every matmul, but the loss is not uniform: a few
matmuls (often lm_head, some down_proj) carry most of it. `llmc build --max-ppl-delta 2%` should
give the smallest model whose *measured* held-out perplexity stays in budget, and
`llmc analyze` should show where the loss comes from.

- Units: every MatMul the recipe's quantizer may take (its `targets` / `exclude`), plus lm_head.
- Sensitivity, for the budget search: estimated in one forward + backward per calibration window
  (compiler/measure/taylor_sensitivity.py: the Fisher/Taylor score of ModelOpt's auto_quantize) for
  every unit and format at once, from the weights each format's own pass produces. Units whose
  matmuls share an input are promoted together when the recipe's quantizer folds AWQ scales into
  that input's producer (a group split between two formats loses its fold). For `llmc analyze`
  (and budget searches without the PyTorch model): measured, one unit in the recipe's format,
  everything else FP16, KL and perplexity delta on the quality stage's held-out windows.
- Order: the exact Lagrangian path over (estimated damage, bytes) (compiler/measure/lagrangian.py):
  each prefix is an assignment with the least estimated damage of all assignments of its bytes.
  Measured sensitivity instead gives the old order: recipe format -> INT8 (or FP8) -> FP16, most
  KL per byte added first.
- Budget: start from the most aggressive assignment (every unit, lm_head included, in the
  recipe's format). The shortest prefix of the path whose measured delta fits is found by
  bisection: each probe is a real graph measured with onnxruntime, the answer is a measured point,
  and it assumes only that promoting more rarely hurts (a probe that contradicts this is still
  measured, never guessed). If even all-FP16 misses the budget, the search fails with the figures.

The answer is a recipe (YAML text): one weight-quantization pass per format with an explicit list
of module names, the rest of the base recipe unchanged. The build runs it like any recipe, and the
artifact keeps it, so `llmc build --recipe recipe.yaml` reproduces the same graph byte for byte.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.external_data
import yaml

from passes import PassContext, make_pass, pass_class
from passes.quantize_int4_awq import QuantizeInt4AwqPass
from passes.quantize_int4_gptq import QuantizeInt4GptqPass
from passes.quantize_int4_rtn import int4_block
from passes.weight_quant import WeightQuantPass

from compiler.errors import BadInputError
from compiler.frontend.onnx_files import save_onnx
from compiler.frontend.run_passes import run_passes
from compiler.measure.lagrangian import Choices, Option, upgrade_path
from compiler.measure.quality import HeldOut, score_windows
from compiler.measure.taylor_sensitivity import estimate_damage, format_deltas
from compiler.recipe import parse_recipe
from compiler.runtime.runner import Runner
from compiler.runtime.onnx_executor import OnnxRuntimeExecutor
from compiler.measure.sizes import weight_footprint
from compiler.graph_io import ExportedGraph
from compiler.recipe import Recipe

FP16 = "fp16"
SAFER = {"int8": ("quantize-int8-wo", 8), "fp8": ("quantize-fp8-wo", 8)}
_SELECTION_KEYS = ("targets", "include_lm_head")
_LAYER = re.compile(r"layers\.(\d+)\.(.+)$")


@dataclasses.dataclass(frozen=True)
class Format:
    """A weight format the search can assign: the pass that makes it and that pass's options."""

    label: str  # int4-awq / int4-rtn / int8 / fp8 / fp16
    pass_name: str | None  # None for FP16 (no pass touches the weight)
    options: dict

    def weight_bytes(self, k: int, n: int) -> int:
        if self.pass_name is None:
            return 2 * k * n
        if self.label.startswith("int4"):
            block, _ = int4_block(k, int(self.options.get("block_size", 128)))  # per matmul, as the pass chooses
            return k * n // 2 + 2 * (k // block) * n
        return k * n + 2 * n  # 8-bit, one FP16 scale per output channel


@dataclasses.dataclass
class Unit:
    name: str  # HF module name, or lm_head
    k: int
    n: int

    @property
    def layer(self) -> str:
        m = _LAYER.search(self.name)
        return f"layer {int(m.group(1))}" if m else self.name

    @property
    def projection(self) -> str:
        m = _LAYER.search(self.name)
        return m.group(2).split(".")[-1] if m else self.name


@dataclasses.dataclass
class Probe:
    """One measured graph."""

    assignment: dict[str, str]  # unit -> format label
    ppl_delta: float
    kl_mean: float
    compiled_perplexity: float
    weight_bytes: int
    seconds: float

    def summary(self) -> dict:
        counts: dict[str, int] = {}
        for label in self.assignment.values():
            counts[label] = counts.get(label, 0) + 1
        return {"ppl_delta": self.ppl_delta, "kl_mean": self.kl_mean, "compiled_perplexity": self.compiled_perplexity,
                "weight_bytes": self.weight_bytes, "formats": counts, "seconds": self.seconds}


@dataclasses.dataclass
class Sensitivity:
    """The damage of one group of units alone in the aggressive format (everything else FP16)."""

    group: str  # a unit name, `layer 3`, or lm_head
    units: list[str]
    ppl_delta: float
    kl_mean: float
    bytes_saved: int  # FP16 bytes - aggressive-format bytes of the group


@dataclasses.dataclass
class SearchResult:
    budget: float
    fits: bool
    assignment: dict[str, str]
    recipe_text: str
    final: Probe
    probes: list[Probe]  # every assignment measured, in order
    sensitivity: list  # Sensitivity (measured) or estimate rows (dicts)
    promotion_order: list  # (unit or units, format they are promoted to), in the order they are applied
    promotions: int  # how many of them the answer applies
    bisection: dict[int, Probe]  # promotions applied -> its measured probe

    def report(self) -> dict:
        return {"budget": self.budget, "fits": self.fits, "promotions": self.promotions,
                "bisection": [{"promotions": c, **p.summary()} for c, p in sorted(self.bisection.items())],
                "start": self.probes[0].summary(), "final": self.final.summary(),
                "evaluations": len(self.probes), "assignment": self.assignment,
                "promotion_order": [list(p) for p in self.promotion_order],
                "sensitivity": [s if isinstance(s, dict) else dataclasses.asdict(s) for s in self.sensitivity],
                "probes": [p.summary() for p in self.probes]}


def quant_entry(recipe: Recipe) -> int:
    """Index of the recipe's one matmul weight-quantization pass; the search replaces it. Another
    quantizer that chooses no matmuls (quantize-int8-embedding) stays in the recipe around it."""
    found = [i for i, name in enumerate(recipe.passes) if issubclass(pass_class(name), WeightQuantPass)]
    if not found:
        raise BadInputError(f"--max-ppl-delta / analyze need a recipe that quantizes weights; '{recipe.name}' does "
                            "not (use int4-awq, int4-rtn, int8-wo or fp8-wo)")
    if len(found) > 1:
        raise BadInputError(f"recipe '{recipe.name}' already mixes {len(found)} weight formats; give a uniform "
                            "recipe (e.g. int4-awq) and let the search choose the mix")
    return found[0]


class Evaluator:
    """Measures assignments: the base recipe's passes before the quantizer run once; per probe the
    quantization passes and the rest of the recipe run on a copy, and onnxruntime scores the result."""

    def __init__(self, exported: ExportedGraph, recipe: Recipe, ctx: PassContext, held: HeldOut,
                 pad_token_id: int | None, safer: str = "int8"):
        if safer not in SAFER:
            raise BadInputError(f"promotion format must be one of {', '.join(SAFER)}, got {safer!r}")
        self.recipe, self.ctx, self.held, self.pad = recipe, ctx, held, pad_token_id
        self.index = quant_entry(recipe)
        opts = recipe.options_for(self.index)
        name = recipe.passes[self.index]
        self.aggressive = Format(pass_class(name).weight_format, name, {k: v for k, v in opts.items() if k not in _SELECTION_KEYS})
        self.safer = Format(safer, SAFER[safer][0], {k: v for k, v in opts.items() if k == "exclude"})
        self.fp16 = Format(FP16, None, {})
        prefix = dataclasses.replace(recipe, passes=recipe.passes[: self.index],
                                     pass_options=tuple(recipe.options_for(i) for i in range(self.index)))
        # A restored export (the stage cache) keeps its weights in model.onnx.data beside the cache
        # entry; a serialized copy names that file relative to nothing, so every copy gets the folder back.
        self._base_dir = next((v.const_value.base_dir for v in exported.model.graph.initializers.values()
                               if isinstance(v.const_value, ir.ExternalTensor)), None)
        graph = ExportedGraph(model=self._copy(ir.serde.serialize_model(exported.model)),
                              io=exported.io, seconds=exported.seconds)
        prepared, _ = run_passes(graph, prefix, ctx)
        self._snapshot = ir.serde.serialize_model(prepared.model).SerializeToString()  # bytes: never shared
        # The matmuls the aggressive format can take (lm_head included): its own plan, so a width it
        # skips (an INT4 K no block divides) is never assigned to it.
        planner = make_pass(name, ctx, {**opts, "include_lm_head": True})
        planned = planner.plan(prepared.model)[0]
        self.units = [Unit(t.name, int(t.weight.shape[0]), int(t.weight.shape[1])) for t in planned]
        if not self.units:
            raise BadInputError(f"recipe '{recipe.name}' selects no MatMul of this model to quantize")
        # AWQ folds one scale per shared input into its producer, and only when the whole group is in
        # the pass (passes/quantize_int4_awq.py): such a group changes format as one unit.
        cls = pass_class(name)
        folds = issubclass(cls, QuantizeInt4AwqPass) and (not issubclass(cls, QuantizeInt4GptqPass) or bool(opts.get("awq")))
        shared: dict[int, list[str]] = {}
        for t in planned:
            shared.setdefault(id(t.node.inputs[0]) if folds else id(t.node), []).append(t.name)
        self.groups: list[list[str]] = list(shared.values())
        self.probes: list[Probe] = []

    def _copy(self, proto: onnx.ModelProto) -> ir.Model:
        model = ir.serde.deserialize_model(proto)
        if self._base_dir:
            ir.external_data.set_base_dir(model.graph, self._base_dir)
        return model

    def format(self, label: str) -> Format:
        return {f.label: f for f in (self.aggressive, self.safer, self.fp16)}[label]

    def deltas(self, fmt: Format) -> dict[str, np.ndarray]:
        """Each unit's weight change in `fmt` (FP16 [K, N]), from that format's pass run on every unit."""
        if fmt.pass_name is None:
            return {u.name: np.zeros((u.k, u.n), np.float16) for u in self.units}
        names = [u.name for u in self.units if u.name != "lm_head"]
        options = {**fmt.options, "targets": names, "include_lm_head": any(u.name == "lm_head" for u in self.units)}
        if not names:
            options["targets"] = []
        model = self._copy(onnx.ModelProto.FromString(self._snapshot))
        return format_deltas(model, make_pass(fmt.pass_name, self.ctx, options))

    def recipe_text(self, assignment: dict[str, str], name: str, description: str, budget: float | None = None) -> str:
        """A recipe file for `assignment`: the base recipe with its quantizer split per format."""
        entries: list = []
        for i, pass_name in enumerate(self.recipe.passes):
            opts = self.recipe.options_for(i)
            if i != self.index:
                entries.append({"pass": pass_name, **opts} if opts else pass_name)
                continue
            for fmt in (self.safer, self.aggressive):  # higher precision first: its MatMuls are then taken
                names = [u.name for u in self.units if assignment.get(u.name) == fmt.label and u.name != "lm_head"]
                lm_head = assignment.get("lm_head") == fmt.label
                if names or lm_head:
                    entries.append({"pass": fmt.pass_name, **fmt.options, "targets": names, "include_lm_head": lm_head})
        doc = {"name": name, "description": description, "passes": entries,
               "tolerance": {k: v for k, v in dataclasses.asdict(self.recipe.tolerance).items() if v is not None}}
        if budget is not None:
            doc["max_ppl_delta"] = budget
        for key in ("max_kl", "min_heldout_agreement"):  # the base recipe's other held-out limits
            if getattr(self.recipe, key) is not None:
                doc[key] = getattr(self.recipe, key)
        header = ("# Written by llmc's precision search (compiler/measure/precision_search.py) from recipe "
                  f"'{self.recipe.name}'.\n# `llmc build MODEL --recipe THIS_FILE` rebuilds the same graph.\n")
        return header + yaml.safe_dump(doc, sort_keys=False, width=120)

    def measure(self, assignment: dict[str, str], exact: bool = True) -> Probe:
        """Build and score one assignment. `exact=False` (sensitivity ranking) skips the recipe's
        trailing clean-up passes: the same numerics to within FP16 rounding, in half the time."""
        start = time.perf_counter()
        text = self.recipe_text(assignment, "probe", "")
        recipe = parse_recipe(text, Path("<precision search>"))
        keep = [i for i in range(self.index, len(recipe.passes)) if exact or recipe.passes[i] != "cleanup"]
        suffix = dataclasses.replace(recipe, passes=tuple(recipe.passes[i] for i in keep),
                                     pass_options=tuple(recipe.options_for(i) for i in keep))
        model = self._copy(onnx.ModelProto.FromString(self._snapshot))
        final, _ = run_passes(ExportedGraph(model=model, io=None), suffix, self.ctx)
        with tempfile.TemporaryDirectory(prefix="llmc-probe-") as tmp:
            path = Path(tmp) / "model.onnx"
            save_onnx(final.model, path, threshold=0)  # every weight into this folder, a restored export's too
            scores = score_windows(self.held, Runner(OnnxRuntimeExecutor(path, arena=False), self.pad))
        probe = Probe(dict(assignment), scores.ppl_delta, scores.kl_mean, scores.compiled_perplexity,
                      weight_footprint(final.model)["floor_bytes"], time.perf_counter() - start)
        self.probes.append(probe)
        return probe


def groups(units: list[Unit], by: str) -> dict[str, list[str]]:
    """`matmul`: each unit alone; `layer`: a decoder layer's matmuls together (lm_head alone)."""
    out: dict[str, list[str]] = {}
    for u in units:
        out.setdefault(u.name if by == "matmul" else u.layer, []).append(u.name)
    return out


def measure_sensitivity(ev: Evaluator, by: str = "matmul",
                        on_progress: Callable[[int, int], None] | None = None) -> list[Sensitivity]:
    todo = groups(ev.units, by)
    shapes = {u.name: u for u in ev.units}
    out = []
    for i, (group, names) in enumerate(todo.items()):
        probe = ev.measure({u.name: ev.aggressive.label if u.name in names else FP16 for u in ev.units}, exact=False)
        saved = sum(ev.fp16.weight_bytes(shapes[n].k, shapes[n].n) - ev.aggressive.weight_bytes(shapes[n].k, shapes[n].n)
                    for n in names)
        out.append(Sensitivity(group, names, probe.ppl_delta, probe.kl_mean, saved))
        if on_progress:
            on_progress(i + 1, len(todo))
    return out


def promotion_order(ev: Evaluator, sensitivity: list[Sensitivity]) -> list[tuple[str, str]]:
    """Every unit to the safer format, then every unit to FP16; within each, most KL per byte added first."""
    kl = {s.group: max(s.kl_mean, 0.0) for s in sensitivity}
    shapes = {u.name: u for u in ev.units}

    def added(name: str, low: Format, high: Format) -> int:
        u = shapes[name]
        return max(1, high.weight_bytes(u.k, u.n) - low.weight_bytes(u.k, u.n))

    names = [u.name for u in ev.units]
    # Ties (and the order of the FP16 step, whose INT8 damage is not measured) follow the same ratio.
    first = sorted(names, key=lambda n: (-kl[n] / added(n, ev.aggressive, ev.safer), names.index(n)))
    second = sorted(names, key=lambda n: (-kl[n] / added(n, ev.safer, ev.fp16), names.index(n)))
    return [(n, ev.safer.label) for n in first] + [(n, FP16) for n in second]


def assignment_after(ev: Evaluator, order: list, count: int) -> dict[str, str]:
    """The assignment after the first `count` promotions; a promotion names a unit or a list of units."""
    assignment = {u.name: ev.aggressive.label for u in ev.units}
    for names, label in order[:count]:
        for name in [names] if isinstance(names, str) else names:
            assignment[name] = label
    return assignment


@dataclasses.dataclass
class Estimate:
    """The Fisher/Taylor damage of every unit in each format, and the exact path it gives."""

    damage: dict[str, dict[str, float]]  # unit -> format label -> estimated nats/token
    order: list[tuple[list[str], str]]  # (units promoted together, format), Lagrangian order
    rows: list[dict]  # per group, for the report: estimated KL of the aggressive format, bytes saved
    seconds: float


def estimate_order(ev: Evaluator, model, windows: list[list[int]],
                   on_progress: Callable[[int, int], None] | None = None) -> Estimate:
    """One forward + backward per window (taylor_sensitivity.py), then the exact Lagrangian path
    (lagrangian.py) over groups' (bytes, damage) in the aggressive, safer and FP16 formats."""
    start = time.perf_counter()
    formats = (ev.aggressive, ev.safer)
    deltas = {f.label: ev.deltas(f) for f in formats}
    per_unit = {u.name: {f.label: deltas[f.label][u.name] for f in formats if u.name in deltas[f.label]}
                for u in ev.units}
    del deltas
    damage = estimate_damage(model, windows, per_unit, on_progress)
    del per_unit
    shapes = {u.name: u for u in ev.units}
    choices, rows = [], []
    for members in ev.groups:
        options = []
        for fmt in (ev.aggressive, ev.safer, ev.fp16):
            if fmt.pass_name is not None and any(fmt.label not in damage[n] for n in members):
                continue  # the format's pass skipped a member (an INT4 K no block divides)
            size = sum(fmt.weight_bytes(shapes[n].k, shapes[n].n) for n in members)
            options.append(Option(fmt.label, size, sum(damage[n].get(fmt.label, 0.0) for n in members)))
        choices.append(Choices(",".join(members), tuple(options)))
        kl = sum(damage[n].get(ev.aggressive.label, 0.0) for n in members)
        saved = sum(ev.fp16.weight_bytes(shapes[n].k, shapes[n].n) - ev.aggressive.weight_bytes(shapes[n].k, shapes[n].n)
                    for n in members)
        rows.append({"group": members[0] if len(members) == 1 else ",".join(members), "units": members,
                     "kl_mean": kl, "ppl_delta": math.expm1(kl), "bytes_saved": saved, "estimated": True})
    _, steps = upgrade_path(choices)
    order = [(step.unit.split(","), step.label) for step in steps]
    return Estimate(damage, order, rows, time.perf_counter() - start)


def search_budget(ev: Evaluator, budget: float, on_probe: Callable[[str, Probe], None] | None = None,
                  on_progress: Callable[[int, int], None] | None = None,
                  sensitivity: list[Sensitivity] | None = None,
                  estimate: Callable[[], Estimate] | None = None) -> SearchResult:
    """The shortest prefix of the promotion path whose measured perplexity delta fits `budget` and
    whose KL fits the recipe's `max_kl`, when it sets one: the written recipe carries that limit, so
    an answer over it would pass the search and fail the build.

    The path: `estimate()` (estimate_order: Fisher/Taylor damage, exact Lagrangian order) when given;
    else measured per-matmul sensitivity (`sensitivity`, or measure_sensitivity now)."""
    note = on_probe or (lambda what, probe: None)
    max_kl = getattr(ev.recipe, "max_kl", None)

    def within(probe: Probe) -> bool:
        return probe.ppl_delta <= budget and (max_kl is None or probe.kl_mean <= max_kl)

    start = ev.measure(assignment_after(ev, [], 0))
    note("all units in the recipe's format", start)
    if within(start):  # nothing to promote: no need to know which units hurt most
        sensitivity, order, measured, best = [], [], {0: start}, 0
    else:
        if estimate is not None and sensitivity is None:
            found = estimate()
            order, sensitivity = found.order, found.rows
        else:
            sensitivity = sensitivity or measure_sensitivity(ev, "matmul", on_progress)
            order = promotion_order(ev, sensitivity)
        measured = {0: start}

        def fits(count: int) -> bool:
            if count not in measured:
                measured[count] = ev.measure(assignment_after(ev, order, count))
                note(f"{count} of {len(order)} promotions", measured[count])
            return within(measured[count])

        if not fits(len(order)):
            best = len(order)
        else:
            low, high = 0, len(order)  # low misses, high fits
            while high - low > 1:
                mid = (low + high) // 2
                if fits(mid):
                    high = mid
                else:
                    low = mid
            best = high
    final = measured[best]
    ok = within(final)
    # Named for the search only when it changed something: an answer of no promotions is the recipe itself.
    label = f"{ev.recipe.name}-within-{budget:.2%}".replace("%", "pct") if best else ev.recipe.name
    description = (f"{ev.recipe.name} with {best} promotions chosen for a held-out perplexity budget "
                   f"of {budget:.2%}: measured {final.ppl_delta:+.3%} at {final.weight_bytes} weight bytes")
    return SearchResult(budget, ok, final.assignment, ev.recipe_text(final.assignment, label, description, budget), final,
                        list(ev.probes), sensitivity, order, best, measured)
