"""The accuracy card: `report.md` (+ PNG plots) beside `report.json`, and `llmc report` to print it.

Why: report.json holds every number but nobody reads JSON to decide whether to ship a build. The
card puts what a person checks on one page: model and recipe, what precision each layer got, how
far the compiled model is from PyTorch (validation, held-out perplexity / KL / agreement), what
each pass did to the logits (--check-passes), and the bytes against FP16 and against the floor.
It is rendered from report.json alone, so it can be re-rendered for any artifact.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from compiler.report.sensitivity_plot import plot_sensitivity
from compiler.measure.verdict import POLICY

CARD = "report.md"
PASS_PLOT = "pass_errors.png"
WEIGHTS_PLOT = "weights.png"
SENSITIVITY_PLOT = "sensitivity.png"
SEARCH_PLOT = "precision_search.png"


def onnx_bytes(report: dict) -> int:
    """Bytes of the compiled graph on disk (model.onnx + model.onnx.data), as report.json recorded them."""
    return sum(v for k, v in report.get("sizes_bytes", {}).items() if k.startswith("model.onnx"))


def write_card(artifact_dir: Path) -> Path:
    """Render report.md (and its plots) from artifact_dir/report.json; returns the card's path."""
    artifact_dir = Path(artifact_dir)
    report = json.loads((artifact_dir / "report.json").read_text())
    plots = _plots(report, artifact_dir)
    path = artifact_dir / CARD
    path.write_text(render_card(report, plots))
    return path


def render_card(report: dict, plots: dict[str, str] | None = None) -> str:
    plots = plots or {}
    lines = [f"# llmc accuracy card: {report['model']['name']} ({report['recipe']['name']})", ""]
    status = report.get("status", "?")
    lines += [f"**Result: {status.upper()}**" + (f" ({'; '.join(report['failures'])})" if report.get("failures") else ""), ""]
    if report.get("verdict_basis"):
        lines += [f"Decided on {report['verdict_basis']}. {POLICY}", ""]
    lines += _model(report) + _recipe(report) + _numerics(report) + _quality(report) + _sizes(report, plots)
    lines += _precision(report) + _search(report, plots) + _pass_checks(report, plots) + _speculation(report)
    if report.get("warnings"):
        lines += ["## Warnings", "", *[f"- {w}" for w in report["warnings"]], ""]
    return "\n".join(lines).rstrip() + "\n"


def _model(report: dict) -> list[str]:
    m = report["model"]
    params = m.get("parameters")
    return ["## Model", "", f"- name: `{m['name']}` ({m.get('architecture', '?')})",
            f"- parameters: {params / 1e6:.2f}M" if params else "- parameters: unknown",
            f"- path: `{m.get('path', '?')}`", ""]


def _recipe(report: dict) -> list[str]:
    r = report["recipe"]
    tol = r.get("tolerance") or {}
    bounds = [f"{label} {tol[key]:g}" for key, label in (
        ("max_abs_logit_error", "max |logit err|"), ("mean_abs_logit_error", "mean |logit err|"),
        ("max_rel_logit_error", "relative logit err (wiring check)")) if tol.get(key) is not None]
    out = ["## Recipe", "", f"- name: `{r['name']}`", f"- passes: {' -> '.join(r.get('passes', []))}",
           f"- tolerance vs PyTorch (validation prompt): {', '.join(bounds)}, greedy agreement >= "
           f"{tol.get('min_greedy_agreement')}"]
    if r.get("max_ppl_delta") is not None:
        out.append(f"- max held-out perplexity increase: {r['max_ppl_delta']:.2%}")
    if r.get("max_kl") is not None:
        out.append(f"- max held-out KL: {r['max_kl']:g} nats/token")
    if r.get("min_heldout_agreement") is not None:
        out.append(f"- min held-out greedy agreement: {r['min_heldout_agreement']:.1%}")
    opts = report.get("options") or {}
    if opts:
        out.append(f"- engine limits: max batch {opts.get('max_batch')}, max seq {opts.get('max_seq')}")
    return out + [""]


def _numerics(report: dict) -> list[str]:
    n = report.get("numerics")
    if not n:
        return []
    return ["## Numerics vs PyTorch (validation prompt)", "",
            f"- max |logit error| {n['max_abs_error']:.4g}, mean |logit error| {n['mean_abs_error']:.4g}"
            + (f", relative {n['max_rel_error']:.3g} (rms error / std of PyTorch's logits, worst position)"
               if n.get("max_rel_error") is not None else ""),
            f"- greedy agreement {n['greedy_agreement']:.1%} over {n['decode_steps'] + 1} tokens "
            f"({n['prompt_tokens']}-token prompt, {n['decode_steps']} teacher-forced decode steps)", ""]


def _quality(report: dict) -> list[str]:
    q = report.get("quality")
    if not q:
        return ["## Held-out quality", "", "Not measured (the recipe does not quantize; `--measure-quality` measures it).", ""]
    return ["## Held-out quality vs PyTorch", "",
            "| metric | value |", "|---|---|",
            f"| perplexity (PyTorch) | {q['reference_perplexity']:.4f} |",
            f"| perplexity (compiled) | {q['compiled_perplexity']:.4f} |",
            f"| perplexity delta | {q['ppl_delta']:+.2%} |",
            f"| KL (nats/token) | {q['kl_mean']:.5f} |",
            f"| greedy agreement | {q['greedy_agreement']:.1%} over {q['agreement_tokens']} tokens |",
            f"| evaluated tokens | {q['eval_tokens']} ({report.get('eval_data') or 'held-out text'}) |",
            *([f"| perplexity windows | {q['windows']} x {q['window']} tokens"
               + (" (cut to the graph's positions, --max-seq)" if q.get("window_cut_to_max_seq") else "") + " |"]
              if q.get("window") else []), ""]


def _speculation(report: dict) -> list[str]:
    s, d = report.get("speculation"), report.get("draft")
    if not s or not d:
        return []
    k = f"k = {s['num_draft_tokens']}, {'fixed' if s['fixed_k'] else 'adaptive'}"
    same = ("identical to plain greedy" if s["identical"] else
            f"**differs** from plain greedy on {len(s['divergences'])} prompt(s) (report.json speculation.divergences)")
    return ["## Speculative decoding (draft in draft/, its own card in draft/report.md)", "",
            "| figure | value |", "|---|---|",
            f"| draft | `{Path(d['model']).name}` ({d['architecture']}"
            + (f", {d['parameters'] / 1e6:.1f}M parameters" if d.get("parameters") else "") + "), "
            f"its own verdict {d['status']} |",
            f"| greedy output ({s['prompts']} prompts, {s['new_tokens']} tokens, {k}) | {same} |",
            f"| acceptance rate | {s['acceptance_rate']:.1%} |",
            f"| accepted tokens per target step | {s['accepted_per_target_step']:.2f} |",
            f"| target steps, speculative vs plain | {s['target_steps']} vs {s['plain_steps']} |",
            f"| wall time, speculative vs plain (onnxruntime, CPU) | {s['speculative_seconds']:.2f} s vs "
            f"{s['plain_seconds']:.2f} s |", ""]


def size_line(report: dict) -> str:
    """The card's one-line size summary (tests parse it back and recompute it from the files)."""
    w = report["weights"]
    size = onnx_bytes(report)
    return (f"Size: model.onnx {size} bytes = {size / w['fp16_bytes']:.3f}x FP16 ({w['fp16_bytes']} bytes), "
            f"{size / w['floor_bytes']:.3f}x floor ({w['floor_bytes']} bytes)")


SIZE_LINE = re.compile(r"^Size: model\.onnx (\d+) bytes = ([\d.]+)x FP16 \((\d+) bytes\), ([\d.]+)x floor \((\d+) bytes\)$",
                       re.MULTILINE)


def _sizes(report: dict, plots: dict[str, str]) -> list[str]:
    w = report.get("weights")
    if not w:
        return []
    out = ["## Size", "", size_line(report), "",
           f"{w['parameters'] / 1e6:.3f}M weight elements. The floor is elements x bits of each stored format "
           "(scales included); FP16 is every weight element at 2 bytes.", "",
           "| stored dtype | elements | bytes |", "|---|---|---|"]
    for dtype, entry in sorted(w.get("by_dtype", {}).items(), key=lambda kv: -kv[1]["bytes"]):
        out.append(f"| {dtype} | {entry['elements']} | {entry['bytes']} |")
    out.append("")
    sizes = report.get("sizes_bytes") or {}
    if sizes:
        out += ["Files: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items()), ""]
    if WEIGHTS_PLOT in plots.values():
        out += [f"![bytes by format]({WEIGHTS_PLOT})", ""]
    return out


_PROJ = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")


def _precision(report: dict) -> list[str]:
    precision = report.get("precision") or {}
    default = "fp16" if "cast-fp16" in report["recipe"].get("passes", []) else "fp32"
    out = ["## Precision per layer", ""]
    if not precision:
        return out + [f"Every weight is {default} (no quantization pass).", ""]
    layers: dict[int, dict[str, str]] = defaultdict(dict)
    other = {}
    for module, fmt in precision.items():
        m = _PROJ.match(module)
        if m:
            layers[int(m.group(1))][m.group(2)] = fmt
        else:
            other[module] = fmt
    columns = sorted({c for row in layers.values() for c in row})
    out += ["| layer | " + " | ".join(c.split(".")[-1] for c in columns) + " |",
            "|---|" + "---|" * len(columns)]
    for layer in sorted(layers):
        out.append(f"| {layer} | " + " | ".join(layers[layer].get(c, default) for c in columns) + " |")
    out.append("")
    for module, fmt in sorted(other.items()):
        out.append(f"- `{module}`: {fmt}")
    fallbacks = [f for r in report.get("passes", []) for f in (r.get("details") or {}).get("fallbacks", [])]
    if fallbacks:
        out.append(f"- kept {default} by the quantizer: " + ", ".join(f"`{f}`" for f in map(str, fallbacks)))
    kept = "embeddings, norms and anything not listed" if "lm_head" in precision else "embeddings, norms, lm_head and anything not listed"
    out += [f"- {kept}: {default}", ""]
    return out


def _search(report: dict, plots: dict[str, str]) -> list[str]:
    """What `--max-ppl-delta` measured and chose (compiler/measure/precision_search.py)."""
    search = report.get("precision_search")
    if not search:
        return []
    start, final = search["start"], search["final"]
    out = [f"## Precision search (budget {search['budget']:.2%} held-out perplexity)", "",
           f"From recipe `{search.get('base_recipe', '?')}`: {search['evaluations']} graphs measured; "
           f"{search['promotions']} promotions applied, most damaging per byte first (damage "
           f"{'estimated by the Fisher/Taylor score' if (search.get('sensitivity') or [{}])[0].get('estimated') else 'measured'}"
           "). The chosen assignment is "
           "`recipe.yaml` in this directory (`llmc build MODEL --recipe recipe.yaml` rebuilds it).", "",
           "| assignment | formats | perplexity delta | KL | weight bytes |", "|---|---|---|---|---|"]
    for label, probe in (("every matmul in the recipe's format", start), ("chosen", final)):
        formats = ", ".join(f"{k} x{v}" for k, v in sorted(probe["formats"].items()))
        out.append(f"| {label} | {formats} | {probe['ppl_delta']:+.3%} | {probe['kl_mean']:.5f} | {probe['weight_bytes']} |")
    out.append("")
    for key, alt in (("search", "perplexity vs bytes of every assignment measured"), ("sensitivity", "sensitivity per matmul")):
        if key in plots:
            out += [f"![{alt}]({plots[key]})", ""]
    return out


def _pass_checks(report: dict, plots: dict[str, str]) -> list[str]:
    records = report.get("passes") or []
    if not any(r.get("check") for r in records):
        return ["## Per-pass check", "", "Not run (`llmc build --check-passes` measures each pass).", ""]
    out = ["## Per-pass check (logits of one prefill, onnxruntime, graph before vs after each pass)", "",
           "| # | pass | changed | nodes | max abs | mean abs | greedy agreement | vs export | tolerance | ok |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(records, 1):
        c = r.get("check") or {}
        if c.get("max_abs") is None:
            out.append(f"| {i} | {r['name']} | {r['modified']} | {r['nodes_before']}->{r['nodes_after']} | "
                       f"skipped: {c.get('skipped') or 'not run'} |||||")
            continue
        ok = "yes" if c["within"] else "**NO**"
        out.append(f"| {i} | {r['name']} | {r['modified']} | {r['nodes_before']}->{r['nodes_after']} | "
                   f"{c['max_abs']:.3g} | {c['mean_abs']:.3g} | {c['agreement']:.1%} | {c['total_max_abs']:.3g} | "
                   f"{c['tolerance_max_abs']:.3g} / {c['min_agreement']:.0%} | {ok} |")
    out.append("")
    if PASS_PLOT in plots.values():
        out += [f"![per-pass error]({PASS_PLOT})", ""]
    return out


def _plots(report: dict, artifact_dir: Path) -> dict[str, str]:
    """PNG plots where a picture reads faster than a table; {} where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    plots = {}
    records = [r for r in report.get("passes") or [] if (r.get("check") or {}).get("max_abs") is not None]
    if records:
        fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(records)), 3.2))
        labels = [f"{i}. {r['name']}" for i, r in enumerate(records, 1)]
        values = [max(r["check"]["max_abs"], 1e-9) for r in records]
        colors = ["tab:blue" if r["check"]["within"] else "tab:red" for r in records]
        ax.bar(range(len(records)), values, color=colors)
        ax.scatter(range(len(records)), [r["check"]["tolerance_max_abs"] for r in records], marker="_", s=400,
                   color="black", label="tolerance")
        ax.set_yscale("log")
        ax.set_xticks(range(len(records)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("max |logit diff| vs previous graph")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(artifact_dir / PASS_PLOT, dpi=100)
        plt.close(fig)
        plots["passes"] = PASS_PLOT
    search = report.get("precision_search") or {}
    if search.get("bisection"):
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        points = search["bisection"]
        ax.scatter([p["weight_bytes"] / 1e6 for p in points], [p["ppl_delta"] * 100 for p in points],
                   color=["tab:green" if p["ppl_delta"] <= search["budget"] else "tab:red" for p in points])
        for p in points:
            ax.annotate(str(p["promotions"]), (p["weight_bytes"] / 1e6, p["ppl_delta"] * 100), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        final = search["final"]
        ax.scatter([final["weight_bytes"] / 1e6], [final["ppl_delta"] * 100], s=160, facecolors="none",
                   edgecolors="black", label="chosen")
        ax.axhline(search["budget"] * 100, color="black", linestyle="--", linewidth=0.8, label="budget")
        ax.set_xlabel("weight bytes (MB)")
        ax.set_ylabel("held-out perplexity delta (%)")
        ax.set_title("assignments measured (label: promotions)", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(artifact_dir / SEARCH_PLOT, dpi=100)
        plt.close(fig)
        plots["search"] = SEARCH_PLOT
    rows = search.get("sensitivity")
    title = ("estimated KL of each unit in the recipe's format (Fisher/Taylor, one forward + backward)"
             if rows and rows[0].get("estimated") else "KL of each matmul alone in the recipe's format")
    if rows and plot_sensitivity(rows, artifact_dir / SENSITIVITY_PLOT, title):
        plots["sensitivity"] = SENSITIVITY_PLOT
    w = report.get("weights")
    if w and w.get("by_dtype") and onnx_bytes(report):
        fig, ax = plt.subplots(figsize=(5, 2.6))
        names = ["FP16", "floor", "model.onnx"]
        values = [w["fp16_bytes"], w["floor_bytes"], onnx_bytes(report)]
        ax.barh(names, [v / 1e6 for v in values], color=["tab:gray", "tab:green", "tab:blue"])
        ax.set_xlabel("MB")
        fig.tight_layout()
        fig.savefig(artifact_dir / WEIGHTS_PLOT, dpi=100)
        plt.close(fig)
        plots["weights"] = WEIGHTS_PLOT
    return plots


def read_card(artifact_dir: Path) -> str:
    """The card of a built artifact (rendered from report.json when report.md is missing, e.g. older builds)."""
    artifact_dir = Path(artifact_dir)
    card = artifact_dir / CARD
    if card.is_file():
        return card.read_text()
    return render_card(json.loads((artifact_dir / "report.json").read_text()))
