"""Property: whatever a config.json, tokenizer_config.json, recipe or CLI number holds, `llmc build` either
gets past its checks (it would build) or stops with one line and exit 2 / 3, naming the file and the
field; never a traceback.

hypothesis writes structurally valid files (JSON objects, YAML mappings) with wrong-typed, missing,
extra and extreme values. To keep examples fast, the stages are replaced: a config or tokenizer that
passes the checks is loaded for real (load_model: transformers' config, tokenizer and model, where
a value the checks let through would fail), a recipe's passes are run for real on the tiny Llama's
export, and then a sentinel is raised: reaching it is the "would build" outcome (tests/test_cli.py
builds for real). The fields' own tables live in compiler/input_schema.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from unittest import mock

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import compiler.driver.build as driver
from compiler.frontend.run_passes import run_passes
from compiler.stages.load import check_validation_fits
from compiler.commands.cli import main
from compiler.input_schema import CONFIG_FIELDS, TOKENIZER_CONFIG_FIELDS

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


class Reached(Exception):
    """The build got past every check: it would run its stages."""


def _load_then_stop(stages, state, outcome):
    """The load stage as the build runs it (one-line errors pass through), then the sentinel."""
    from compiler.frontend.load import load_model

    check_validation_fits(load_model(state.model_path), state.request)
    raise Reached


def _passes_then_stop(export: Path):
    def run(stages, state, outcome):
        """The passes stage on the tiny Llama's export, with the recipe as parsed, then the sentinel."""
        import onnx_ir as ir

        from compiler.graph_io import io_from_model
        from compiler.graph_io import ExportedGraph
        from passes import PassContext

        model = ir.load(export)
        run_passes(ExportedGraph(model, io_from_model(model)), state.recipe, PassContext(max_positions=128),
                   state.progress.pass_done)
        raise Reached

    return run


# Any JSON value, weighted toward the ones that break naive int() / float() / truthiness.
EXTREME_NUMBERS = st.sampled_from([0, -1, 1, 2**31, 2**63, 10**30, -10**30, 0.5, 1e308, -0.0,
                                   float("nan"), float("inf"), float("-inf")])
SCALARS = st.one_of(st.none(), st.booleans(), EXTREME_NUMBERS, st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=6), SCALARS, max_size=3))


def mutations(fields):
    """A list of edits of a JSON object: set a known field to anything, delete one, or add an unknown key."""
    known = st.sampled_from(sorted(fields))
    edit = st.one_of(st.tuples(st.just("set"), known, VALUES), st.tuples(st.just("delete"), known, st.none()),
                     st.tuples(st.just("extra"), st.text(min_size=1, max_size=12), VALUES))
    return st.lists(edit, min_size=1, max_size=3)


def _apply(data: dict, edits) -> dict:
    data = dict(data)
    for op, key, value in edits:
        if op == "delete":
            data.pop(key, None)
        else:
            data[key] = value
    return data


def _outcome(result, names_one_of: tuple[str, ...]) -> str:
    """'built' (reached the stages) or the error line; asserts the error is one line, exit 2/3, naming the cause."""
    if isinstance(result.exception, Reached):
        return "built"
    assert result.exit_code in (2, 3), (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmc: error: "), result.stderr
    assert any(name in lines[0] for name in names_one_of), (names_one_of, lines[0])
    return lines[0]


@pytest.fixture()
def stub_stages():
    with mock.patch.object(driver, "run_stages", _load_then_stop):
        yield


def _model_copy(model_dirs, tmp_path) -> Path:
    return Path(shutil.copytree(model_dirs["llama"], tmp_path / "model"))


def test_config_fields_any_value(model_dirs, tmp_path, stub_stages):
    model = _model_copy(model_dirs, tmp_path)
    original = json.loads((model / "config.json").read_text())
    seen = set()

    @SETTINGS
    @given(edits=mutations(CONFIG_FIELDS.keys() | original.keys()))
    def check(edits):
        (model / "config.json").write_text(json.dumps(_apply(original, edits)))
        result = CliRunner().invoke(main, ["build", str(model), "-o", str(tmp_path / "out")])
        touched = tuple(key for _, key, _ in edits if key in CONFIG_FIELDS)
        line = _outcome(result, ("config.json", "--max-seq", *touched))
        seen.add("built" if line == "built" else "error")

    check()
    assert seen == {"built", "error"}  # the generator reached both outcomes (else the property says little)


def test_tokenizer_config_fields_any_value(model_dirs, tmp_path, stub_stages):
    model = _model_copy(model_dirs, tmp_path)
    original = json.loads((model / "tokenizer_config.json").read_text())

    @SETTINGS
    @given(edits=mutations(TOKENIZER_CONFIG_FIELDS.keys() | original.keys()))
    def check(edits):
        (model / "tokenizer_config.json").write_text(json.dumps(_apply(original, edits)))
        result = CliRunner().invoke(main, ["build", str(model), "-o", str(tmp_path / "out")])
        _outcome(result, ("tokenizer_config.json",))

    check()


TOLERANCE = {"max_abs_logit_error": 9.0, "mean_abs_logit_error": 9.0, "min_greedy_agreement": 0.0}
OPTION_NAMES = ("block_size", "targets", "exclude", "include_lm_head", "clip", "no_such_option")
# One or two edits of a valid recipe, so that most examples get past the other values to the edited one.
RECIPE_EDITS = st.lists(st.one_of(st.tuples(st.just("tolerance"), st.sampled_from(sorted(TOLERANCE)), VALUES),
                                  st.tuples(st.just("max_ppl_delta"), st.none(), VALUES),
                                  st.tuples(st.just("option"), st.sampled_from(OPTION_NAMES), VALUES)),
                        min_size=1, max_size=2)


def test_recipe_values_any_value(model_dirs, tmp_path, exported):
    recipe = tmp_path / "recipe.yaml"
    stages = _passes_then_stop(exported(model_dirs["llama"]))
    seen = set()

    @SETTINGS
    @given(edits=RECIPE_EDITS, quantizer=st.sampled_from(["quantize-int4-rtn", "quantize-int8-wo", "quantize-fp8-wo"]))
    @example(edits=[("option", "targets", [1])], quantizer="quantize-int8-wo")  # fnmatch(name, 1) in the pass
    @example(edits=[("option", "block_size", 64.0)], quantizer="quantize-int4-rtn")  # 64.0 in (32, 64, 128)
    @example(edits=[("tolerance", "min_greedy_agreement", "nan")], quantizer="quantize-int8-wo")
    def check(edits, quantizer):
        tolerance, options, doc = dict(TOLERANCE), {}, {"name": "x"}
        for where, key, value in edits:
            if where == "tolerance":
                tolerance[key] = value
            elif where == "option":
                options[key] = value
            else:
                doc["max_ppl_delta"] = value
        doc.update(passes=["cleanup", {"pass": quantizer, **options}], tolerance=tolerance)
        recipe.write_text(yaml.safe_dump(doc))
        result = CliRunner().invoke(main, ["build", str(model_dirs["llama"]), "--recipe", str(recipe),
                                           "-o", str(tmp_path / "out")])
        seen.add("built" if _outcome(result, ("recipe.yaml:",)) == "built" else "error")

    with mock.patch.object(driver, "run_stages", stages):
        check()
    assert seen == {"built", "error"}


def test_cli_numbers_any_value(model_dirs, tmp_path, stub_stages):
    @SETTINGS
    @given(batch=st.one_of(EXTREME_NUMBERS.filter(lambda v: isinstance(v, int)), st.integers(-2**70, 2**70)),
           seq=st.one_of(EXTREME_NUMBERS.filter(lambda v: isinstance(v, int)), st.integers(-2**70, 2**70)))
    def check(batch, seq):
        result = CliRunner().invoke(main, ["build", str(model_dirs["llama"]), "--max-batch", str(batch),
                                           "--max-seq", str(seq), "-o", str(tmp_path / "out")])
        _outcome(result, ("--max-batch", "--max-seq"))

    check()
