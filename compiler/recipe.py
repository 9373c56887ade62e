"""Recipes: YAML files in recipes/ that name the pass pipeline and the tolerance its result must meet."""

from __future__ import annotations

from pathlib import Path

import yaml

from .errors import BadInputError
from .types import Recipe, Tolerance

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str) -> Recipe:
    """`fp16` -> recipes/fp16.yaml; a path to a .yaml file is read as is."""
    from passes import REGISTRY

    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise BadInputError(f"unknown recipe {name_or_path!r}; available: {', '.join(available_recipes())} (or a path to a .yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
        passes, options = _pass_entries(data["passes"], path)
        tol = data["tolerance"]
        tolerance = Tolerance(
            max_abs_logit_error=float(tol["max_abs_logit_error"]),
            mean_abs_logit_error=float(tol["mean_abs_logit_error"]),
            min_greedy_agreement=float(tol["min_greedy_agreement"]),
        )
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise BadInputError(f"malformed recipe {path}: {exc!r} (needs 'passes' and 'tolerance' with the three limits)") from exc
    unknown = [p for p in passes if p not in REGISTRY]
    if unknown:
        raise BadInputError(f"recipe {path} names unknown passes {unknown}; known: {', '.join(REGISTRY)}")
    _check_options(passes, options, path)
    max_ppl_delta = data.get("max_ppl_delta")
    if max_ppl_delta is not None and (not isinstance(max_ppl_delta, (int, float)) or max_ppl_delta < 0):
        raise BadInputError(f"recipe {path}: max_ppl_delta must be a non-negative number (0.05 = 5%), got {max_ppl_delta!r}")
    return Recipe(
        name=str(data.get("name", path.stem)),
        description=str(data.get("description", "")),
        passes=passes,
        tolerance=tolerance,
        source=path,
        pass_options=options,
        max_ppl_delta=None if max_ppl_delta is None else float(max_ppl_delta),
    )


def _pass_entries(entries, path: Path) -> tuple[tuple[str, ...], tuple[dict, ...]]:
    """`passes:` items are a pass name, or a mapping `{pass: name, <option>: value, ...}`."""
    names, options = [], []
    for entry in entries:
        if isinstance(entry, str):
            names.append(entry)
            options.append({})
        elif isinstance(entry, dict) and isinstance(entry.get("pass"), str):
            opts = dict(entry)
            names.append(opts.pop("pass"))
            options.append(opts)
        else:
            raise BadInputError(f"recipe {path}: each passes entry is a name or a mapping with a 'pass' key, got {entry!r}")
    return tuple(names), tuple(options)


def _check_options(passes: tuple[str, ...], options: tuple[dict, ...], path: Path) -> None:
    """Instantiate every pass once so a bad option fails at load time, naming the pass."""
    from passes import PassContext, make_pass

    ctx = PassContext(max_positions=2)
    for name, opts in zip(passes, options):
        try:
            make_pass(name, ctx, opts)
        except (TypeError, ValueError) as exc:
            raise BadInputError(f"recipe {path}: pass {name!r} rejects its options {opts}: {exc}") from exc
