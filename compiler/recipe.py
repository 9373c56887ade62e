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
        passes = tuple(data["passes"])
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
    return Recipe(
        name=str(data.get("name", path.stem)),
        description=str(data.get("description", "")),
        passes=passes,
        tolerance=tolerance,
        source=path,
    )
