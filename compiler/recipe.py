"""Recipes: YAML files in recipes/ that name the pass pipeline and the tolerance its result must meet.

A recipe is hand-written, so every mistake is reported with its file and line: the YAML is
composed into nodes (which keep their positions) and checked key by key before it is used.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import yaml

from compiler.errors import BadInputError
from compiler.input_schema import PASS_OPTION_FIELDS, check_fields


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """What 'numerically correct' means for a recipe (compiled ONNX vs PyTorch FP32, one prompt).

    Absolute bounds suit graphs that equal PyTorch up to FP16 rounding. A quantized graph's logits
    move by an amount that scales with the model's logits, so quantizing recipes bound the error
    relative to the reference logits' spread (`max_rel_logit_error`, compiler/measure/validate.py) as a
    wiring check, and their verdict rests on held-out quality (compiler/measure/verdict.py). None: unchecked."""

    max_abs_logit_error: float | None = None
    mean_abs_logit_error: float | None = None
    min_greedy_agreement: float = 0.0
    max_rel_logit_error: float | None = None


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named, ordered pass list plus the tolerance its output must meet (recipes/*.yaml)."""

    name: str
    description: str
    passes: tuple[str, ...]
    tolerance: Tolerance
    source: Path | None = None
    sha256: str = ""  # of the recipe file's text: the build manifest and the cache keys record it
    pass_options: tuple[dict, ...] = ()  # per pass, parallel to `passes` ({} = defaults)
    max_ppl_delta: float | None = None  # relative held-out perplexity increase allowed (0.05 = 5%)
    max_kl: float | None = None  # held-out mean KL(reference || compiled) allowed, nats per token
    min_heldout_agreement: float | None = None  # held-out greedy agreement required (quality stage)
    # int8 / fp8: where the recipe's format misses max_ppl_delta, the build promotes the matmuls the
    # sensitivity estimate ranks worst to this format (then FP16) until the measured delta fits, as
    # `--max-ppl-delta` does (compiler/measure/precision_search.py). None: the recipe's format everywhere.
    promote: str | None = None

    def options_for(self, index: int) -> dict:
        return dict(self.pass_options[index]) if index < len(self.pass_options) else {}

    @property
    def quality_limits(self) -> bool:
        """Whether the recipe sets a held-out limit (max_ppl_delta, max_kl, min_heldout_agreement)."""
        return any(v is not None for v in (self.max_ppl_delta, self.max_kl, self.min_heldout_agreement))

    @property
    def quantizes(self) -> bool:
        from passes import quantizes

        return quantizes(self.passes)

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
# max_ppl_delta, max_kl, min_heldout_agreement: the held-out quality a build must meet (compiler/measure/verdict.py).
QUALITY_KEYS = ("max_ppl_delta", "max_kl", "min_heldout_agreement")
PROMOTE_FORMATS = ("int8", "fp8")  # precision_search.SAFER's keys (that module sits above this one)
TOP_KEYS = ("name", "description", "passes", "tolerance", *QUALITY_KEYS, "promote")
TOLERANCE_KEYS = ("max_abs_logit_error", "mean_abs_logit_error", "max_rel_logit_error", "min_greedy_agreement")
LOGIT_BOUNDS = ("max_abs_logit_error", "mean_abs_logit_error", "max_rel_logit_error")


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _where(path: Path, node: yaml.Node) -> str:
    return f"{path}:{node.start_mark.line + 1}"


def _scalar(path: Path, node: yaml.Node, what: str) -> str:
    if not isinstance(node, yaml.ScalarNode):
        raise BadInputError(f"{_where(path, node)}: {what} must be a single value, not a {_kind(node)}")
    return node.value


def _kind(node: yaml.Node) -> str:
    return {yaml.MappingNode: "mapping", yaml.SequenceNode: "list", yaml.ScalarNode: "value"}[type(node)]


# Inclusive ranges of the recipe's numbers (a NaN tolerance would pass every comparison, an infinite one too).
RANGES = {"max_abs_logit_error": (0.0, 1e6), "mean_abs_logit_error": (0.0, 1e6), "max_rel_logit_error": (0.0, 1e6),
          "min_greedy_agreement": (0.0, 1.0), "max_ppl_delta": (0.0, 10.0), "max_kl": (0.0, 1e6),
          "min_heldout_agreement": (0.0, 1.0)}


def _number(path: Path, node: yaml.Node, key: str) -> float:
    text = _scalar(path, node, key)
    try:
        value = float(text)
    except ValueError:
        raise BadInputError(f"{_where(path, node)}: {key} must be a number, got {text!r}") from None
    low, high = RANGES[key]
    if not low <= value <= high:  # also false for NaN
        raise BadInputError(f"{_where(path, node)}: {key} must be in [{low:g}, {high:g}], got {text!r}")
    return value


def _mapping(path: Path, node: yaml.Node, what: str, known: tuple[str, ...]) -> dict[str, yaml.Node]:
    if not isinstance(node, yaml.MappingNode):
        raise BadInputError(f"{_where(path, node)}: {what} must be a mapping with keys {', '.join(known)}, not a {_kind(node)}")
    out = {}
    for key_node, value_node in node.value:
        key = _scalar(path, key_node, "a key")
        if key not in known:
            raise BadInputError(f"{_where(path, key_node)}: unknown key {key!r} in {what}; known keys: {', '.join(known)}")
        out[key] = value_node
    return out


def parse_recipe(text: str, path: Path) -> Recipe:
    """Check the recipe text node by node; every error names `path:line`, the cause and what is allowed."""
    from passes import REGISTRY

    try:
        root = yaml.compose(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise BadInputError(f"{path}{line}: not valid YAML ({exc.problem or exc.context}); fix the syntax") from None
    if root is None:
        raise BadInputError(f"{path}: empty recipe; it needs 'passes' and 'tolerance' (see recipes/fp16.yaml)")
    top = _mapping(path, root, "the recipe", TOP_KEYS)
    for required in ("passes", "tolerance"):
        if required not in top:
            raise BadInputError(f"{_where(path, root)}: recipe lacks '{required}' (see recipes/fp16.yaml)")
    if not isinstance(top["passes"], yaml.SequenceNode):
        raise BadInputError(f"{_where(path, top['passes'])}: passes must be a list of pass names, not a {_kind(top['passes'])}")
    passes, options = [], []
    data = yaml.safe_load(text)
    for item, value in zip(top["passes"].value, data["passes"]):
        name, opts = _pass_entry(path, item, value)
        if name not in REGISTRY:
            raise BadInputError(f"{_where(path, item)}: unknown pass {name!r}; known passes: {', '.join(REGISTRY)}")
        _check_options(path, item, name, opts)
        passes.append(name)
        options.append(opts)
    quality = {key: _number(path, top[key], key) for key in QUALITY_KEYS if key in top}  # max_ppl_delta 0.05 = 5%
    tol = _mapping(path, top["tolerance"], "tolerance", TOLERANCE_KEYS)
    if "min_greedy_agreement" not in tol or not any(k in tol for k in LOGIT_BOUNDS):
        raise BadInputError(f"{_where(path, top['tolerance'])}: tolerance needs min_greedy_agreement and at least one "
                            f"of {', '.join(LOGIT_BOUNDS)}")
    tolerance = Tolerance(**{k: _number(path, tol[k], k) for k in TOLERANCE_KEYS if k in tol})
    promote = None
    if "promote" in top:
        promote = _scalar(path, top["promote"], "promote")
        if promote not in PROMOTE_FORMATS:
            raise BadInputError(f"{_where(path, top['promote'])}: promote must be one of {', '.join(PROMOTE_FORMATS)}, "
                                f"got {promote!r}")
        if "max_ppl_delta" not in quality:
            raise BadInputError(f"{_where(path, top['promote'])}: promote needs max_ppl_delta, the budget it "
                                "promotes matmuls to meet; add it or drop promote")
    return Recipe(
        name=_scalar(path, top["name"], "name") if "name" in top else path.stem,
        description=_scalar(path, top["description"], "description") if "description" in top else "",
        passes=tuple(passes),
        tolerance=tolerance,
        source=path,
        sha256=hashlib.sha256(text.encode()).hexdigest(),
        pass_options=tuple(options),
        promote=promote,
        **quality,
    )


def _pass_entry(path: Path, node: yaml.Node, value) -> tuple[str, dict]:
    """A `passes:` item is a pass name, or a mapping `{pass: name, <option>: value, ...}`."""
    if isinstance(node, yaml.ScalarNode):
        return node.value, {}
    if isinstance(node, yaml.MappingNode) and isinstance(value, dict) and isinstance(value.get("pass"), str):
        opts = dict(value)
        return opts.pop("pass"), opts
    raise BadInputError(f"{_where(path, node)}: each pass is a name or a mapping with a 'pass' key and options, "
                        f"not a {_kind(node)}")


def _check_options(path: Path, node: yaml.Node, name: str, opts: dict) -> None:
    """Instantiate the pass once so a bad option fails at load time, naming the line and the pass."""
    from passes import PassContext, make_pass

    check_fields(opts, PASS_OPTION_FIELDS, _where(path, node), f"see the options of pass {name!r} in its file in passes/")
    try:
        make_pass(name, PassContext(max_positions=2), opts)
    except Exception as exc:  # noqa: BLE001 - YAML can give any type to any option; each pass raises its own
        raise BadInputError(f"{_where(path, node)}: pass {name!r} rejects its options {opts}: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def load_recipe(name_or_path: str) -> Recipe:
    """`fp16` -> recipes/fp16.yaml; a path to a .yaml file is read as is."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise BadInputError(f"unknown recipe {name_or_path!r}; available: {', '.join(available_recipes())} (or a path to a .yaml)")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"cannot read recipe {path}: {exc}") from exc
    return parse_recipe(text, path)
