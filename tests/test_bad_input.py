"""Bad input and faults: one line naming cause and fix, a distinct exit code, and an output path that
holds the previous complete artifact or nothing (no half-written files, no staging dirs, no lock).

The matrix cases all fail before export (seconds each); the faults that need a running build use
the session's stage cache (disk full) or a subprocess signalled during export (SIGTERM / Ctrl-C).
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from compiler.commands.cli import main
from compiler.errors import UnsupportedModelError
from compiler.frontend.load import load_model

PREVIOUS = {"report.json": '{"previous": true}\n', "model.onnx": "previous build\n"}


def _copy_model(model_dirs, tmp_path, name="model") -> Path:
    return Path(shutil.copytree(model_dirs["llama"], tmp_path / name))


def _recipe(tmp_path, text) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def _edit_config(model: Path, **changes) -> None:
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(changes)
    (model / "config.json").write_text(json.dumps(cfg))


def case_missing_dir(tmp_path, dirs):
    return [str(tmp_path / "nope")]


def case_no_config(tmp_path, dirs):
    model = _copy_model(dirs, tmp_path)
    (model / "config.json").unlink()
    return [str(model)]


def case_unsupported_arch(tmp_path, dirs):
    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    return [str(model)]


def case_shape_mismatch(tmp_path, dirs):
    model = _copy_model(dirs, tmp_path)
    _edit_config(model, intermediate_size=320)
    return [str(model)]


def case_missing_layer(tmp_path, dirs):
    model = _copy_model(dirs, tmp_path)
    _edit_config(model, num_hidden_layers=3)
    return [str(model)]


def case_truncated_safetensors(tmp_path, dirs):
    model = _copy_model(dirs, tmp_path)
    weights = model / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return [str(model)]


def case_corrupt_safetensors(tmp_path, dirs):
    model = _copy_model(dirs, tmp_path)
    (model / "model.safetensors").write_bytes((10).to_bytes(8, "little") + b"not json!!" + b"\0" * 64)
    return [str(model)]


def case_missing_tokenizer(tmp_path, dirs):
    model = _copy_model(dirs, tmp_path)
    (model / "tokenizer.json").unlink()
    return [str(model)]


def case_recipe_unknown_pass(tmp_path, dirs):
    recipe = _recipe(tmp_path, "name: x\npasses:\n  - cleanup\n  - fuse-everything\n"
                               "tolerance: {max_abs_logit_error: 1, mean_abs_logit_error: 1, min_greedy_agreement: 0}\n")
    return [str(dirs["llama"]), "--recipe", str(recipe)]


def case_recipe_wrong_type(tmp_path, dirs):
    recipe = _recipe(tmp_path, "name: x\npasses: [cleanup]\ntolerance:\n  max_abs_logit_error: small\n"
                               "  mean_abs_logit_error: 1\n  min_greedy_agreement: 0\n")
    return [str(dirs["llama"]), "--recipe", str(recipe)]


def case_recipe_passes_not_a_list(tmp_path, dirs):
    recipe = _recipe(tmp_path, "name: x\npasses: cleanup\n"
                               "tolerance: {max_abs_logit_error: 1, mean_abs_logit_error: 1, min_greedy_agreement: 0}\n")
    return [str(dirs["llama"]), "--recipe", str(recipe)]


def case_recipe_unknown_key(tmp_path, dirs):
    recipe = _recipe(tmp_path, "name: x\npasses: [cleanup]\ntolerance: {max_abs_logit_error: 1, "
                               "mean_abs_logit_error: 1, min_greedy_agreement: 0}\ntolerence: 3\n")
    return [str(dirs["llama"]), "--recipe", str(recipe)]


def case_recipe_bad_yaml(tmp_path, dirs):
    recipe = _recipe(tmp_path, "name: x\npasses: [cleanup\ntolerance: {}\n")
    return [str(dirs["llama"]), "--recipe", str(recipe)]


def case_unknown_recipe(tmp_path, dirs):
    return [str(dirs["llama"]), "--recipe", "int3-magic"]


def case_max_seq_beyond_positions(tmp_path, dirs):
    return [str(dirs["llama"]), "--max-seq", "100000"]


def case_pickle_weights(tmp_path, dirs):
    model = _copy_model(dirs, tmp_path)
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    return [str(model)]


def case_remote_code(tmp_path, dirs):
    model = _copy_model(dirs, tmp_path)
    _edit_config(model, auto_map={"AutoModelForCausalLM": "modeling_x.X"})
    return [str(model)]


# --- config.json / tokenizer / recipe values of the wrong type or range (compiler/input_schema.py) -----------

def case_config_malformed_number(tmp_path, dirs):  # was blamed on the tokenizer (AutoTokenizer reads config.json)
    model = _copy_model(dirs, tmp_path)
    _edit_config(model, rms_norm_eps="1e-5x")
    return [str(model)]


def case_config_infinite_layers(tmp_path, dirs):  # Python's JSON reads Infinity: int(inf) was a traceback
    model = _copy_model(dirs, tmp_path)
    _edit_config(model, num_hidden_layers=float("inf"))
    return [str(model)]


def case_config_negative_layers(tmp_path, dirs):  # built a model with no decoder layers
    model = _copy_model(dirs, tmp_path)
    _edit_config(model, num_hidden_layers=-1)
    return [str(model)]


def case_config_not_an_object(tmp_path, dirs):
    model = _copy_model(dirs, tmp_path)
    (model / "config.json").write_text("[1, 2]")
    return [str(model)]


def case_config_not_utf8(tmp_path, dirs):
    model = _copy_model(dirs, tmp_path)
    (model / "config.json").write_bytes(b'{"hidden_size": "\xff\xfe"}')
    return [str(model)]


def case_config_unknown_activation(tmp_path, dirs):
    model = _copy_model(dirs, tmp_path)
    _edit_config(model, hidden_act="swiglu2")
    return [str(model)]


def case_tokenizer_config_wrong_type(tmp_path, dirs):
    model = _copy_model(dirs, tmp_path)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["eos_token"] = 2
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    return [str(model)]


def case_tokenizer_json_not_an_object(tmp_path, dirs):
    model = _copy_model(dirs, tmp_path)
    (model / "tokenizer.json").write_text("[]")
    return [str(model)]


def case_recipe_nan_tolerance(tmp_path, dirs):  # NaN passes every comparison: any numerics would "pass"
    recipe = _recipe(tmp_path, "name: x\npasses: [cleanup]\ntolerance:\n  max_abs_logit_error: nan\n"
                               "  mean_abs_logit_error: 1\n  min_greedy_agreement: 0\n")
    return [str(dirs["llama"]), "--recipe", str(recipe)]


def case_recipe_agreement_above_one(tmp_path, dirs):  # no build could ever pass
    recipe = _recipe(tmp_path, "name: x\npasses: [cleanup]\ntolerance:\n  max_abs_logit_error: 1\n"
                               "  mean_abs_logit_error: 1\n  min_greedy_agreement: 2\n")
    return [str(dirs["llama"]), "--recipe", str(recipe)]


def case_recipe_option_wrong_type(tmp_path, dirs):  # targets of numbers: a traceback inside the pass
    recipe = _recipe(tmp_path, "name: x\npasses:\n  - cleanup\n  - {pass: quantize-int8-wo, targets: [1, 2]}\n"
                               "tolerance: {max_abs_logit_error: 9, mean_abs_logit_error: 9, min_greedy_agreement: 0}\n")
    return [str(dirs["llama"]), "--recipe", str(recipe)]


def case_max_batch_huge(tmp_path, dirs):
    return [str(dirs["llama"]), "--max-batch", str(1 << 40)]


# --- file-system oddities around the model directory (compiler/host/paths.py) --------------------------------

def case_model_dir_symlink_loop(tmp_path, dirs):  # Path.resolve raised RuntimeError
    link = tmp_path / "loop"
    link.symlink_to(link)
    return [str(link)]


def case_model_dir_dangling_link(tmp_path, dirs):
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "gone")
    return [str(link)]


def case_model_dir_is_fifo(tmp_path, dirs):
    os.mkfifo(tmp_path / "pipe")
    return [str(tmp_path / "pipe")]


def _model_with(tmp_path, dirs, name, make):
    """A copy of the tiny model whose file `name` is replaced by what `make(path)` puts there."""
    model = _copy_model(dirs, tmp_path)
    (model / name).unlink()
    make(model / name)
    return [str(model)]


def case_config_symlink_loop(tmp_path, dirs):  # was reported as "no config.json"
    return _model_with(tmp_path, dirs, "config.json", lambda p: p.symlink_to(p))


def case_config_is_fifo(tmp_path, dirs):
    return _model_with(tmp_path, dirs, "config.json", os.mkfifo)


def case_weights_are_a_directory(tmp_path, dirs):  # open() raised IsADirectoryError
    return _model_with(tmp_path, dirs, "model.safetensors", lambda p: p.mkdir())


def case_weights_are_a_fifo(tmp_path, dirs):  # open() blocked forever, waiting for a writer
    return _model_with(tmp_path, dirs, "model.safetensors", os.mkfifo)


def case_tokenizer_is_fifo(tmp_path, dirs):
    return _model_with(tmp_path, dirs, "tokenizer.json", os.mkfifo)


# (case, exit code, substrings of the one-line message: the cause and the fix)
MATRIX = [
    (case_missing_dir, 2, ["model directory not found", "pass a local Hugging Face model directory"]),
    (case_no_config, 2, ["no config.json", "not a Hugging Face model directory"]),
    (case_unsupported_arch, 3, ["unsupported architecture GPT2LMHeadModel", "supported: LlamaForCausalLM"]),
    (case_shape_mismatch, 2, ["config.json does not match the weights", "mlp", "[256, 128]", "[320, 128]",
                              "use the config that came with the weights"]),
    (case_missing_layer, 2, ["model.layers.2.", "missing", "num_hidden_layers"]),
    (case_truncated_safetensors, 2, ["model.safetensors is truncated", "re-download"]),
    (case_corrupt_safetensors, 2, ["model.safetensors is corrupt", "re-download"]),
    (case_missing_tokenizer, 2, ["no tokenizer in", "copy the tokenizer files"]),
    (case_recipe_unknown_pass, 2, ["recipe.yaml:4:", "unknown pass 'fuse-everything'", "known passes: cleanup"]),
    (case_recipe_wrong_type, 2, ["recipe.yaml:4:", "max_abs_logit_error must be a number", "'small'"]),
    (case_recipe_passes_not_a_list, 2, ["recipe.yaml:2:", "passes must be a list"]),
    (case_recipe_unknown_key, 2, ["recipe.yaml:4:", "unknown key 'tolerence'", "known keys: name"]),
    (case_recipe_bad_yaml, 2, ["recipe.yaml:3:", "not valid YAML", "fix the syntax"]),
    (case_unknown_recipe, 2, ["unknown recipe 'int3-magic'", "available: fp16"]),
    (case_max_seq_beyond_positions, 2, ["--max-seq 100000 exceeds", "max_position_embeddings (2048)", "lower --max-seq"]),
    (case_pickle_weights, 3, ["only pickle weights (pytorch_model.bin)", "--allow-pickle", "can execute code"]),
    (case_remote_code, 3, ["auto_map", "--trust-remote-code", "executes that code"]),
    (case_config_malformed_number, 2, ["config.json: field 'rms_norm_eps' must be a finite number", "'1e-5x'",
                                       "fix config.json"]),
    (case_config_infinite_layers, 2, ["config.json: field 'num_hidden_layers' must be an integer in [1, 1024]",
                                      "Infinity"]),
    (case_config_negative_layers, 2, ["config.json: field 'num_hidden_layers'", "got -1"]),
    (case_config_not_an_object, 2, ["config.json must hold a JSON object, not list", "fix config.json"]),
    (case_config_not_utf8, 2, ["config.json is not UTF-8 text", "fix config.json"]),
    (case_config_unknown_activation, 2, ["field 'hidden_act' must be one of \"silu\"", "'swiglu2'"]),
    (case_tokenizer_config_wrong_type, 2, ["tokenizer_config.json: field 'eos_token' must be a string", "got 2",
                                           "copy tokenizer_config.json of the original model"]),
    (case_tokenizer_json_not_an_object, 2, ["tokenizer.json must hold a JSON object, not list"]),
    (case_recipe_nan_tolerance, 2, ["recipe.yaml:4:", "max_abs_logit_error must be in [0, 1e+06]", "'nan'"]),
    (case_recipe_agreement_above_one, 2, ["recipe.yaml:6:", "min_greedy_agreement must be in [0, 1]"]),
    (case_recipe_option_wrong_type, 2, ["recipe.yaml:4:", "field 'targets' must be a list of name patterns",
                                        "[1, 2]"]),
    (case_max_batch_huge, 2, ["--max-batch must be an integer in [1, 65536]", "1099511627776"]),
    (case_model_dir_symlink_loop, 2, ["model directory", "is a symbolic link loop", "pass a local Hugging Face"]),
    (case_model_dir_dangling_link, 2, ["model directory", "is a dangling symbolic link", "gone"]),
    (case_model_dir_is_fifo, 2, ["not a directory:", "is a named pipe (FIFO)"]),
    (case_config_symlink_loop, 2, ["config.json is a symbolic link loop"]),
    (case_config_is_fifo, 2, ["config.json is a named pipe (FIFO), not a regular file"]),
    (case_weights_are_a_directory, 2, ["model.safetensors is a directory, not a regular file", "re-download"]),
    (case_weights_are_a_fifo, 2, ["model.safetensors is a named pipe (FIFO), not a regular file"]),
    (case_tokenizer_is_fifo, 2, ["tokenizer.json is a named pipe (FIFO), not a regular file"]),
]


def _place_previous(out: Path) -> None:
    out.mkdir(parents=True)
    for name, text in PREVIOUS.items():
        (out / name).write_text(text)


def _assert_previous_or_nothing(out: Path, previous: bool) -> None:
    if previous:
        assert {p.name: p.read_text() for p in out.iterdir()} == PREVIOUS
        assert list(out.parent.iterdir()) == [out]  # no staging dir, no lock file, no .failed
    else:
        assert not out.exists()
        assert not out.parent.exists() or list(out.parent.iterdir()) == []


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmc: error: "), stderr
    return lines[0]


@pytest.mark.parametrize("previous", [False, True], ids=["empty", "previous-artifact"])
@pytest.mark.parametrize("case,code,expected", MATRIX, ids=[c[0].__name__[5:] for c in MATRIX])
def test_bad_input_matrix(model_dirs, tmp_path, case, code, expected, previous):
    args = case(tmp_path, model_dirs)
    out = tmp_path / "outs" / "artifact"
    if previous:
        _place_previous(out)
    result = CliRunner().invoke(main, ["build", *args, "-o", str(out)])
    assert result.exit_code == code, result.output
    line = _one_line(result.stderr)
    for text in expected:
        assert text in line, (text, line)
    _assert_previous_or_nothing(out, previous)


def test_output_path_not_writable(model_dirs, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = CliRunner().invoke(main, ["build", str(model_dirs["llama"]), "-o", str(blocker / "sub" / "out")])
    assert result.exit_code == 2
    line = _one_line(result.stderr)
    assert "is not writable" in line and "is a file" in line and "choose another -o" in line
    assert blocker.read_text() == "x"


DAC_CAPS = "-dac_override,-dac_read_search"


def _permission_bits_apply() -> list[str]:
    """A command prefix under which file permission bits bind: none for a user; for root (CI runs as
    root, and CAP_DAC_OVERRIDE ignores the bits), util-linux's setpriv removes CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH from the bounding set before exec, so the command runs without them."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without util-linux's setpriv: cannot drop CAP_DAC_OVERRIDE")
    return [setpriv, f"--bounding-set={DAC_CAPS}", f"--inh-caps={DAC_CAPS}", "--"]


def test_output_directory_without_write_permission(model_dirs, tmp_path):
    """A real `llmc build` process that may not write the output's parent (mode 0500)."""
    locked = tmp_path / "read-only"
    locked.mkdir(mode=0o500)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([*_permission_bits_apply(), sys.executable, "-m", "compiler.commands.cli", "build",
                           str(model_dirs["llama"]), "-o", str(locked / "out")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    line = _one_line(proc.stderr)
    assert f"output path {locked / 'out'} is not writable (Permission denied" in line and "permissions" in line
    assert list(locked.iterdir()) == []


def test_flags_say_what_they_risk():
    help_text = " ".join(CliRunner().invoke(main, ["build", "--help"]).output.split())
    assert "--allow-pickle" in help_text and "pickle can execute arbitrary code" in help_text
    assert "--trust-remote-code" in help_text and "that code runs with your permissions" in help_text


def test_allow_pickle_loads_bin_weights(model_dirs, llama, tmp_path):
    import torch

    model = _copy_model(model_dirs, tmp_path)
    (model / "model.safetensors").unlink()
    torch.save(llama.model.state_dict(), model / "pytorch_model.bin")
    with pytest.raises(UnsupportedModelError, match="--allow-pickle"):
        load_model(model)
    loaded = load_model(model, allow_pickle=True)
    for (name, a), b in zip(llama.model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_trust_remote_code_runs_the_models_code_only_when_allowed(model_dirs, tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    model = _copy_model(model_dirs, tmp_path, "remote-llama")
    marker = tmp_path / "remote-code-ran"
    (model / "modeling_custom.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaForCausalLM\n\n\n"
        "class CustomLlama(LlamaForCausalLM):\n    pass\n"
    )
    _edit_config(model, auto_map={"AutoModelForCausalLM": "modeling_custom.CustomLlama"})
    with pytest.raises(UnsupportedModelError, match="--trust-remote-code"):
        load_model(model)
    assert not marker.exists()
    loaded = load_model(model, trust_remote_code=True)
    assert marker.read_text() == "ran" and type(loaded.model).__name__ == "CustomLlama"


@pytest.mark.parametrize("where", ["compiler.stages.engine:restore_files", "compiler.driver.build:write_manifest"])
def test_disk_full_mid_write_exit_6_and_previous_artifact_kept(cached_build, model_dirs, tmp_path, monkeypatch, where):
    """ENOSPC while copying the engine into staging, or while writing the manifest at package time."""
    import importlib

    module_name, where = where.split(":")
    driver = importlib.import_module(module_name)
    first, cache, _, _ = cached_build
    out = tmp_path / "outs" / "artifact"
    shutil.copytree(first, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real = getattr(driver, where)

    def full_disk(*args, **kwargs):
        real(*args, **kwargs)  # write the real thing, then fail as a full disk would mid-way
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[-1]))

    monkeypatch.setattr(driver, where, full_disk)
    result = CliRunner().invoke(main, ["build", str(model_dirs["llama"]), "--max-seq", "128", "-o", str(out),
                                       "--cache-dir", str(cache)])
    assert result.exit_code == 6, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("llmc: error: could not write the build (No space left on device")
    assert "free disk space" in line and f"{out} was left as it was" in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert list(out.parent.iterdir()) == [out]


def _wait_for(proc, text: str, timeout: float = 240) -> str:
    """Read the build's stderr until `text` appears (the build is then inside the next stage)."""
    seen = ""
    deadline = time.monotonic() + timeout
    while text not in seen:
        line = proc.stderr.readline()
        assert line and time.monotonic() < deadline, f"build ended before {text!r}: {seen[-2000:]}"
        seen += line
    return seen


def test_sigterm_mid_export_keeps_previous_artifact_and_second_build_is_locked_out(model_dirs, tmp_path):
    """A CI timeout: SIGTERM to a real `llmc build` process while torch.onnx export runs."""
    out = tmp_path / "outs" / "artifact"
    _place_previous(out)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "compiler.commands.cli", "build", str(model_dirs["llama"]), "-o", str(out)],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        _wait_for(proc, "[1/11] load")  # the reference and export (tens of seconds) run now
        second = CliRunner().invoke(main, ["build", str(model_dirs["llama"]), "-o", str(out)])
        assert second.exit_code == 2
        line = _one_line(second.stderr)
        assert f"another llmc build (pid {proc.pid}) is writing {out}" in line and "choose another -o" in line
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert time.monotonic() - start < 30  # unwinds promptly, not after export finishes
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("llmc: error: build terminated by signal 15") and "previous build or nothing" in last
    _assert_previous_or_nothing(out, previous=True)


_SIGNAL_MID_BUILD = """
import signal, sys, time
import compiler.stages.engine as engine_stage
from compiler.commands.cli import main

signum, model, out, cache = int(sys.argv[1]), *sys.argv[2:5]
# As in a terminal: a process started from a background job or an xdist worker inherits SIGINT
# *ignored*, and Python then installs no KeyboardInterrupt handler at all.
signal.signal(signal.SIGINT, signal.default_int_handler)
real = engine_stage.restore_files

def restore_then_signal(*args, **kwargs):
    real(*args, **kwargs)
    signal.raise_signal(signum)  # delivered at the next bytecode, as from a terminal or CI runner
    time.sleep(5)  # never reached in full: the handler raises first

engine_stage.restore_files = restore_then_signal
handler = signal.getsignal(signal.SIGTERM)
try:
    main(["build", model, "--max-seq", "128", "-o", out, "--cache-dir", cache])
finally:
    if signal.getsignal(signal.SIGTERM) != handler:  # the build must restore the handler it replaced
        print("SIGTERM handler not restored", file=sys.stderr)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_signal_mid_build_in_process(cached_build, model_dirs, tmp_path, signum):
    """A real signal to the build's own process while the (cached) build copies the engine into staging.

    The build runs `main()` in a fresh interpreter (not this test process, whose signal state other
    tests and libraries share), with `_restore` wrapped to raise the signal right after a copy."""
    first, cache, _, _ = cached_build
    out = tmp_path / "outs" / "artifact"
    _place_previous(out)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_MID_BUILD, str(int(signum)), str(model_dirs["llama"]), str(out),
                           str(cache)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 128 + signum, proc.stderr[-3000:]
    assert "not restored" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("llmc: error: build ") and "previous build or nothing" in last
    _assert_previous_or_nothing(out, previous=True)


@pytest.mark.parametrize("kind", ["loop", "dangling", "through-loop"])
def test_output_path_links(model_dirs, tmp_path, kind):
    """-o at a link loop, a dangling link (the build would land at its target) or a path through a loop."""
    outs = tmp_path / "outs"
    outs.mkdir()
    out = outs / "artifact"
    if kind == "loop":
        out.symlink_to(out)
    elif kind == "dangling":
        out.symlink_to(tmp_path / "elsewhere" / "artifact")
    else:
        (outs / "loop").symlink_to(outs / "loop")
        out = outs / "loop" / "artifact"
    before = sorted(os.listdir(outs))
    result = CliRunner().invoke(main, ["build", str(model_dirs["llama"]), "-o", str(out)])
    assert result.exit_code == 2, result.output
    line = _one_line(result.stderr)
    expected = {"loop": f"output path {out} is a symbolic link loop; remove the link or choose another -o",
                "dangling": f"output path {out} is a dangling symbolic link (to {tmp_path / 'elsewhere'}",
                "through-loop": f"output path {out} is, or passes through, a symbolic link loop; choose another -o"}
    assert expected[kind] in line
    assert sorted(os.listdir(outs)) == before and not (tmp_path / "elsewhere").exists()
