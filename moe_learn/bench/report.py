"""A run's results as Markdown: the headline ratios, issue #15's targets met or not, one table per section.

Works on a stored ``results.json`` without a GPU (``moe-learn bench --report results.json``).
Every ratio is "ours x the baseline" in speed: ``baseline time / our time``, so 0.77x means ours
is slower.
"""

from __future__ import annotations

from moe_learn.bench.cases import cases as prefill_cases
from moe_learn.bench.cases import decode_cases, experts_cases
from moe_learn.bench.timing import geomean

BASELINES = {"default": "the default", "liger": "Liger-Kernel"}
LABELS = {"ours": "ours", "default": "default (`grouped_mm`)", "liger": "Liger-Kernel", "eager": "eager loop"}
DECODE_MODES = ("loop", "single", "graph")


# ---------------------------------------------------------------------------------------
# Ratios and summaries (stored in results.json too)
# ---------------------------------------------------------------------------------------


def experts_ratios(rows: list[dict], mode: str, baseline: str) -> list[tuple[str, float]]:
    """(case, ours vs ``baseline``) for each case where both were timed; mode "forward" or "training"."""
    out = []
    for r in rows:
        ours, base = r.get(mode, {}).get("ours", {}), r.get(mode, {}).get(baseline, {})
        if "ms" in ours and "ms" in base:
            out.append((r["name"], base["ms"] / ours["ms"]))
    return out


def decode_ratios(rows: list[dict], mode: str) -> list[tuple[str, float]]:
    """(case, ours vs ``torch._grouped_mm``) for each decode case timed both ways in ``mode``."""
    out = []
    for r in rows:
        ours, base = r.get("us", {}).get("ours", {}), r.get("us", {}).get("grouped_mm", {})
        if mode in ours and mode in base:
            out.append((r["name"], base[mode] / ours[mode]))
    return out


def prefill_ratios(rows: list[dict]) -> list[tuple[str, float]]:
    return [(r["name"], r["ms"]["grouped_mm"] / r["ms"]["ours"]) for r in rows if "ms" in r]


def _lowest(ratios):
    return min(ratios, key=lambda p: p[1]) if ratios else (None, float("nan"))


def summarize_experts(rows: list[dict]) -> dict:
    out = {}
    for mode in ("forward", "training"):
        for base in BASELINES:
            ratios = experts_ratios(rows, mode, base)
            case, low = _lowest(ratios)
            out[f"{mode}_vs_{base}"] = {"geomean": geomean(v for _, v in ratios), "lowest": low, "lowest_case": case,
                                        "cases": len(ratios)}
    return out


def summarize_decode(rows: list[dict]) -> dict:
    out = {}
    for mode in DECODE_MODES:
        ratios = decode_ratios(rows, mode)
        case, low = _lowest(ratios)
        out[mode] = {"geomean": geomean(v for _, v in ratios), "lowest": low, "lowest_case": case, "cases": len(ratios)}
    fracs = [r["floor_us"] / r["us"]["ours"]["graph"] for r in rows if "graph" in r.get("us", {}).get("ours", {})
             and "floor_us" in r]
    out["geomean_ours_graph_frac_floor"] = geomean(fracs)
    return out


def summarize_gemm(rows: list[dict]) -> dict:
    """The prefill section's summary (the key ``gemm_summary`` of results.json, read by chapter 08)."""
    rows = [r for r in rows if "ms" in r]
    speedup = [r["ms"]["grouped_mm"] / r["ms"]["ours"] for r in rows]
    return {
        "geomean_speedup_vs_grouped_mm": geomean(speedup),
        "min_speedup_vs_grouped_mm": min(speedup, default=float("nan")),
        "geomean_frac_roofline_ours": geomean(r["frac_roofline"]["ours"] for r in rows),
        "geomean_frac_roofline_grouped_mm": geomean(r["frac_roofline"]["grouped_mm"] for r in rows),
        "max_rel_err_vs_grouped_mm": max((r["rel_err_vs_grouped_mm"] for r in rows), default=float("nan")),
        "max_rel_err_vs_fp32": max((r.get("rel_err_vs_fp32", float("nan")) for r in rows), default=float("nan")),
    }


# ---------------------------------------------------------------------------------------
# Targets (issue #15): each a ratio measured side by side in one run
# ---------------------------------------------------------------------------------------


def _experts_tflops(rows, model, tokens, mode):
    for r in rows:
        if r["model"] == model and r["tokens"] == tokens:
            entry = r.get(mode, {}).get("ours", {})
            return [(r["name"], entry["tflops"])] if "tflops" in entry else []
    return []


# (text, section key in results.json, how to read the values, aggregate, threshold, unit)
TARGETS = (
    ("experts fwd+bwd vs transformers' default, geometric mean", "experts",
     lambda rows: experts_ratios(rows, "training", "default"), "geomean", 1.3, "x"),
    ("experts fwd+bwd vs Liger-Kernel, geometric mean", "experts",
     lambda rows: experts_ratios(rows, "training", "liger"), "geomean", 1.15, "x"),
    ("experts fwd+bwd vs the default, every case", "experts",
     lambda rows: experts_ratios(rows, "training", "default"), "lowest", 1.0, "x"),
    ("experts fwd+bwd vs Liger-Kernel, every case", "experts",
     lambda rows: experts_ratios(rows, "training", "liger"), "lowest", 1.0, "x"),
    ("experts forward vs the default, geometric mean", "experts",
     lambda rows: experts_ratios(rows, "forward", "default"), "geomean", 1.3, "x"),
    ("experts forward vs Liger-Kernel, geometric mean", "experts",
     lambda rows: experts_ratios(rows, "forward", "liger"), "geomean", 1.1, "x"),
    ("Qwen3-30B-A3B T=32768 forward (set for an H100)", "experts",
     lambda rows: _experts_tflops(rows, "qwen3-30b-a3b", 32768, "forward"), "value", 450.0, " TFLOP/s"),
    ("Qwen3-30B-A3B T=32768 fwd+bwd (set for an H100)", "experts",
     lambda rows: _experts_tflops(rows, "qwen3-30b-a3b", 32768, "training"), "value", 350.0, " TFLOP/s"),
    ("decode eager calls vs `_grouped_mm`, geometric mean", "decode",
     lambda rows: decode_ratios(rows, "loop"), "geomean", 1.0, "x"),
    ("decode eager calls vs `_grouped_mm`, every case", "decode",
     lambda rows: decode_ratios(rows, "loop"), "lowest", 0.85, "x"),
    ("decode from a CUDA graph vs `_grouped_mm`, geometric mean", "decode",
     lambda rows: decode_ratios(rows, "graph"), "geomean", 1.1, "x"),
    ("prefill vs `_grouped_mm`, geometric mean", "gemm", prefill_ratios, "geomean", 1.1, "x"),
    ("prefill vs `_grouped_mm`, every case", "gemm", prefill_ratios, "lowest", 0.95, "x"),
)


# The cases each section's targets are set over (issue #15): a run with fewer is incomplete, not met.
ISSUE_CASES = {"experts": len(experts_cases()), "decode": len(decode_cases()), "gemm": len(prefill_cases())}


def evaluate_targets(result: dict) -> list[dict]:
    """Each target of issue #15 as met / not met / incomplete / not measured, with the measured value."""
    out = []
    liger = result.get("environment", {}).get("liger_kernel")
    for text, section, read, how, threshold, unit in TARGETS:
        target = f"{'≥' if how != 'lowest' else 'no case below'} {threshold:g}{unit}"
        entry = {"target": f"{text}: {target}", "threshold": threshold, "value": None, "cases": 0, "expected": 0}
        rows = result.get(section)
        if not rows:
            entry.update(status="not measured", measured="section not in this run")
            out.append(entry)
            continue
        pairs = read(rows)
        expected = 1 if how == "value" else max(len(rows), ISSUE_CASES.get(section, 0))
        entry.update(cases=len(pairs), expected=expected)
        if not pairs:
            why = "Liger-Kernel not installed" if "Liger" in text and liger == "not installed" else "no case measured"
            entry.update(status="not measured", measured=why)
            out.append(entry)
            continue
        if how == "geomean":
            value, where = geomean(v for _, v in pairs), ""
        else:
            case, value = _lowest(pairs)
            where = f" ({case})" if how == "lowest" else ""
        met = value >= threshold
        gpu = result.get("environment", {}).get("gpu", "")
        if "(set for an H100)" in text and "H100" not in gpu:  # a TFLOP/s target holds for the GPU it names
            entry.update(value=value, status="not measured on an H100",
                         measured=f"{value:.0f}{unit} on {gpu} ({'above' if met else 'below'} the H100's target)")
            out.append(entry)
            continue
        if len(pairs) < expected:
            status = "not met" if (how == "lowest" and not met) else "incomplete"
            where += f", {len(pairs)} of {expected} cases"
        else:
            status = "met" if met else "not met"
        entry.update(value=value, status=status, measured=f"{value:.3g}{unit}{where}" if unit == "x"
                     else f"{value:.0f}{unit}{where}")
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------


def versus(ratio: float, who: str) -> str:
    """'ours 0.77x the default (slower)': the plain sentence for a speed ratio."""
    side = "slower" if ratio < 0.995 else "faster" if ratio > 1.005 else "even"
    return f"ours {ratio:.2f}x {who} ({side})"


def _short_error(error: str) -> str:
    if "not installed" in error:
        return "not installed"
    return "out of memory" if error.startswith("out of memory") else "error"


def _cell(entry: dict | None, key: str, fmt: str, bold: bool = False) -> str:
    if not entry:
        return "-"
    if key in entry:
        text = format(entry[key], fmt)
        return f"**{text}**" if bold else text
    return _short_error(entry["error"]) if "error" in entry else "-"


def _errors(rows, *groups) -> list[str]:
    """Each distinct error of the rows, once, with where it happened."""
    seen: dict[str, list[str]] = {}
    for r in rows:
        if "error" in r:
            seen.setdefault(r["error"], []).append(r["name"])
        for group in groups:
            for impl, entry in r.get(group, {}).items():
                if isinstance(entry, dict) and "error" in entry:
                    seen.setdefault(f"{LABELS.get(impl, impl)}: {entry['error']}", []).append(r["name"])
    return [f"- {err} ({', '.join(dict.fromkeys(names))})" for err, names in seen.items()]


def _headline_experts(rows, mode, title) -> str:
    parts, lows = [], []
    for base, who in BASELINES.items():
        ratios = experts_ratios(rows, mode, base)
        if not ratios:
            parts.append(f"{who}: not measured")
            continue
        parts.append(f"{versus(geomean(v for _, v in ratios), who)}")
        case, low = _lowest(ratios)
        lows.append(f"{versus(low, who)} at {case}")
    n = max(len(experts_ratios(rows, mode, b)) for b in BASELINES)
    return f"- **{title}**, geometric mean over {n} cases: " + "; ".join(parts) + ". Lowest: " + \
        ("; ".join(lows) or "-") + "."


def headlines(result: dict) -> list[str]:
    lines = []
    if result.get("experts"):
        rows = result["experts"]
        lines.append(_headline_experts(rows, "training", "Experts forward+backward (training)"))
        lines.append(_headline_experts(rows, "forward", "Experts forward"))
    if result.get("decode"):
        rows = result["decode"]
        parts = []
        for mode, what in (("loop", "eager calls back to back"), ("single", "one call alone"),
                           ("graph", "replayed from a CUDA graph")):
            ratios = decode_ratios(rows, mode)
            if ratios:
                case, low = _lowest(ratios)
                parts.append(f"{what}: {versus(geomean(v for _, v in ratios), '`_grouped_mm`')}, lowest {low:.2f}x "
                             f"({case})")
        lines.append(f"- **Decode GEMMs** ({len(rows)} cases), geometric means: " + "; ".join(parts) + ".")
    ratios = prefill_ratios(result.get("gemm", []))
    if ratios:
        case, low = _lowest(ratios)
        mean = geomean(v for _, v in ratios)
        lines.append(f"- **Prefill GEMMs** ({len(ratios)} cases): {versus(mean, '`_grouped_mm`')} in geometric mean, "
                     f"lowest {low:.2f}x ({case}).")
    return lines


SECTIONS_WITH_ROWS = ("experts", "decode", "gemm")
SAME_IN_EVERY_RUN = ("gpu", "torch", "triton", "transformers", "liger_kernel", "cuda")


def merge_results(results: list[dict]) -> dict:
    """Several stored runs of one machine type and one software stack as one result, for one report.

    Each case's ratios were measured within one run (ours and the baselines back to back), so
    cases from several runs can share a table and a geometric mean; runs on another GPU or with
    other versions cannot, and raise. A case measured in more than one run keeps its last run's
    row. The summaries are left out: the report computes them from the merged rows.
    """
    if not results:
        raise ValueError("merge_results needs at least one stored run")
    if len(results) == 1:
        return results[0]
    first = results[0]["environment"]
    for i, result in enumerate(results[1:], start=2):
        env = result["environment"]
        differ = [f"{key}: {first.get(key)!r} vs {env.get(key)!r}" for key in SAME_IN_EVERY_RUN
                  if first.get(key) != env.get(key)]
        if differ:
            raise ValueError(f"run 1 and run {i} differ in {'; '.join(differ)}: runs on other GPUs or other versions "
                             "cannot share one report (their ratios are not comparable); report them separately")
    merged = {"environment": {**first, "date": ", ".join(dict.fromkeys(r["environment"]["date"] for r in results))},
              "runs": []}
    for i, result in enumerate(results, start=1):
        names = []
        for section in SECTIONS_WITH_ROWS:
            rows = merged.setdefault(section, [])
            for row in result.get(section) or []:
                rows[:] = [r for r in rows if r["name"] != row["name"]]
                rows.append({**row, "run": i})
                names.append(row["name"])
        if "routing" in result:
            merged["routing"] = result["routing"]
        merged["runs"].append({key: result[key] for key in ("command", "rest_s", "elapsed_s", "peaks") if key in result}
                              | {"date": result["environment"]["date"], "cases": names})
    for section in SECTIONS_WITH_ROWS:
        if not merged[section]:
            del merged[section]
    if "experts" in merged:  # a model's cases together, fewest tokens first, whichever run measured them
        merged["experts"].sort(key=lambda row: (row["model"], row["tokens"]))
    return merged


def _runs_lines(result: dict) -> list[str]:
    """The environment, then one line per run of a merged result: its command and the cases it measured."""
    env = result["environment"]
    lines = [f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, transformers "
             f"{env.get('transformers', 'not recorded')}, Liger-Kernel {env.get('liger_kernel', 'not recorded')}, "
             f"CUDA {env['cuda']}, Python {env['python']}. {len(result['runs'])} runs, each case measured within "
             "one run (a case measured twice shows its last run):", ""]
    for i, run in enumerate(result["runs"], start=1):
        line = f"{i}. {run['date']}: `{run['command']}`"
        if "rest_s" in run:
            line += f", {run['rest_s']:g} s of idle before each timing"
        kept = [name for name in run["cases"]
                if any(r["name"] == name and r["run"] == i for s in SECTIONS_WITH_ROWS for r in result.get(s, []))]
        lines.append(line + (f": {', '.join(kept)}." if kept else ": no case kept (all measured again later)."))
    return lines


def _environment_line(result: dict) -> str:
    if "runs" in result:
        return "\n".join(_runs_lines(result))
    env = result["environment"]
    line = (f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, transformers "
            f"{env.get('transformers', 'not recorded')}, Liger-Kernel {env.get('liger_kernel', 'not recorded')}, "
            f"CUDA {env['cuda']}, Python {env['python']}, {env['date']}. Command: `{result['command']}`.")
    if "peaks" in result:
        peaks = result["peaks"]
        line += (f" Measured ceilings: bf16 matmul {peaks['matmul_tflops']:.0f} TFLOP/s, copy "
                 f"{peaks['copy_tbs']:.2f} TB/s.")
    if "rest_s" in result:
        line += f" Each timing followed {result['rest_s']:g} s of idle."
    if "elapsed_s" in result:
        line += f" The run took {result['elapsed_s'] / 60:.1f} min."
    return line


def _experts_cost_table(rows: list[dict]) -> list[str]:
    """What a user pays besides the time per call: the first calls' seconds and the GPU memory at the peak."""
    impls = ("ours", "default", "liger")
    if not any(r.get("setup_s") or "peak_mib" in r.get("training", {}).get("ours", {}) for r in rows):
        return []  # runs stored before these were recorded
    columns = ["case", *(f"{LABELS[i]} first calls s" for i in impls),
               *(f"{LABELS[i]} fwd+bwd peak MiB" for i in impls)]
    lines = ["### Experts: first calls and memory", "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for r in rows:
        setup = r.get("setup_s", {})
        cells = [f"{setup[i]:g}" if i in setup else "-" for i in impls]
        cells += [_cell(r.get("training", {}).get(i), "peak_mib", ".0f") for i in impls]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return lines + ["", "first calls: the seconds from building to the end of the first forward and forward+backward "
                    "with their check against the reference, which compile and autotune (ours tunes its own "
                    "kernels, Liger-Kernel its `triton.autotune` configs; `MOE_LEARN_TUNING_CACHE` keeps ours across "
                    "processes). peak MiB: GPU memory one forward+backward allocates beyond what was live before it: "
                    "what the forward keeps for the backward plus the backward's temporaries.", ""]


def _experts_tables(rows: list[dict]) -> list[str]:
    lines = []
    for mode, title, impls in (("forward", "forward (no grad)", ("ours", "default", "liger", "eager")),
                               ("training", "forward+backward (`autograd.grad` of the output)",
                                ("ours", "default", "liger"))):
        columns = ["case", *(f"{LABELS[i]} ms" for i in impls), *(f"{LABELS[i]} TFLOP/s" for i in impls[:3]),
                   "ours vs default", "ours vs Liger"]
        lines += [f"### Experts {title}", "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
        ratio = {b: dict(experts_ratios(rows, mode, b)) for b in BASELINES}
        for r in rows:
            t = r.get(mode, {})
            cells = [_cell(t.get(i), "ms", ".3g", bold=i == "ours") for i in impls]
            cells += [_cell(t.get(i), "tflops", ".0f") for i in impls[:3]]
            cells += [f"{ratio[b][r['name']]:.2f}x" if r["name"] in ratio[b] else "-" for b in BASELINES]
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _experts_cost_table(rows)
    notes = {r["note"] for r in rows if r.get("note")}
    lines += [f"Note: {n}." for n in sorted(notes)] + ([""] if notes else [])
    lines += ["FLOPs: forward 6·T·k·H·I, forward+backward 3x that. Relative error against a float32 reference "
              "(computed one expert at a time), for the forward output, the output the backward used, and the "
              "gradients of the hidden states, the routing weights and both weights:", "",
              "| case | implementation | out | out (fwd+bwd) | d hidden | d weights | d gate_up | d down |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for impl, errs in r.get("rel_err", {}).items():
            if "error" not in errs:
                vals = [f"{errs[k]:.1e}" if k in errs else "-" for k in
                        ("out", "out_train", "d_hidden", "d_weights", "d_gate_up", "d_down")]
                lines.append(f"| {r['name']} | {LABELS.get(impl, impl)} | " + " | ".join(vals) + " |")
    errors = _errors(rows, "forward", "training")
    return lines + ([""] + ["Not measured:"] + errors if errors else []) + [""]


def _decode_table(rows: list[dict]) -> list[str]:
    lines = ["### Decode GEMMs: ours vs `torch._grouped_mm` (µs per call)", "",
             "| case | M | experts hit | floor | ours loop | `_gmm` loop | ours single | `_gmm` single | ours graph | "
             "`_gmm` graph | loop ratio | graph ratio | ours graph / floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ratio = {m: dict(decode_ratios(rows, m)) for m in ("loop", "graph")}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['M']} | " + " | ".join(["-"] * 11) + " |")
            continue
        us = r.get("us", {})
        cells = [str(r["M"]), str(r["experts_hit"]), f"{r['floor_us']:.1f}" if "floor_us" in r else "-"]
        for mode in DECODE_MODES:
            cells += [_cell(us.get("ours"), mode, ".1f", bold=True), _cell(us.get("grouped_mm"), mode, ".1f")]
        cells += [f"{ratio[m][r['name']]:.2f}x" if r["name"] in ratio[m] else "-" for m in ("loop", "graph")]
        graph = us.get("ours", {}).get("graph")
        cells.append(f"{r['floor_us'] / graph:.0%}" if graph and "floor_us" in r else "-")
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines += ["", "loop: CUDA events around back-to-back eager calls (no L2 flush), host cost included; single: one "
              "call issued to an idle GPU; graph: replayed from a CUDA graph (device time). floor: bytes of X, Y and "
              "the weights of the experts that got tokens over the measured copy bandwidth. One rest before each "
              "case's six timings. Largest relative difference from `_grouped_mm`: "
              f"{max((r.get('rel_err_vs_grouped_mm', 0.0) for r in rows), default=float('nan')):.1e}; from a "
              f"float32 loop: {max((r.get('rel_err_vs_fp32', 0.0) for r in rows), default=float('nan')):.1e}."]
    errors = _errors(rows, "us")
    return lines + ([""] + ["Not measured:"] + errors if errors else []) + [""]


def _prefill_table(result: dict) -> list[str]:
    rows = result["gemm"]
    lines = ["### Prefill GEMMs: ours vs the per-expert loop, `torch._grouped_mm`, a dense matmul and the roofline",
             "", "| case | M | N | K | E | loop | dense | `_grouped_mm` | ours | roofline | ours / roofline "
             "| ours vs `_grouped_mm` |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ms" not in r:
            lines.append(f"| {r['name']} | {r['M']} | {r['N']} | {r['K']} | {r['E']} | "
                         + " | ".join(["-"] * 6) + f" | {_short_error(r.get('error', 'error'))} |")
            continue
        t = r["tflops"]
        loop = f"{t['loop']:.0f}" if "loop" in t else "-"
        lines.append(
            f"| {r['name']} | {r['M']} | {r['N']} | {r['K']} | {r['E']} | {loop} | {t['dense']:.0f} | "
            f"{t['grouped_mm']:.0f} | **{t['ours']:.0f}** | {r['roofline_tflops']:.0f} | "
            f"{r['frac_roofline']['ours']:.0%} | {r['ms']['grouped_mm'] / r['ms']['ours']:.2f}x |"
        )
    g = result.get("gemm_summary") or summarize_gemm(rows)
    lines += [
        "",
        "TFLOP/s; roofline = FLOPs / max(FLOPs / matmul peak, bytes / copy bandwidth). Geometric means: ours "
        f"**{g['geomean_speedup_vs_grouped_mm']:.3f}x** `_grouped_mm` (lowest case "
        f"{g['min_speedup_vs_grouped_mm']:.3f}x); ours at **{g['geomean_frac_roofline_ours']:.1%}** of the "
        f"roofline, `_grouped_mm` at {g['geomean_frac_roofline_grouped_mm']:.1%}. Largest relative difference "
        f"from `_grouped_mm`'s output: {g['max_rel_err_vs_grouped_mm']:.1e}; from a float32 per-expert loop: "
        f"{g.get('max_rel_err_vs_fp32', float('nan')):.1e}.",
    ]
    errors = _errors(rows)
    return lines + ([""] + ["Not measured:"] + errors if errors else []) + [""]


def markdown_report(result: dict) -> str:
    """The stored results of one run as Markdown (what docs/benchmarks.md shows)."""
    lines = [_environment_line(result), ""]
    heads = headlines(result)
    if heads:
        lines += ["### Headlines", "", *heads, ""]
    if result.get("environment", {}).get("liger_kernel") == "not installed" and result.get("experts"):
        lines += ["Liger-Kernel not installed: its columns are empty and its targets not measured "
                  "(`pip install liger-kernel`).", ""]
    targets = evaluate_targets(result)
    lines += ["### Targets (issue #15)", "", "| target | measured | |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {t['status']} |" for t in targets] + [""]
    if result.get("experts"):
        lines += _experts_tables(result["experts"])
    if result.get("decode"):
        lines += _decode_table(result["decode"])
    if result.get("gemm"):
        lines += _prefill_table(result)
    if "error" in result.get("routing", {}):
        lines += [f"Routing: not measured ({result['routing']['error']}).", ""]
    elif "routing" in result:
        r = result["routing"]
        sh = r["shape"]
        lines += [
            f"Routing (T={sh['T']}, E={sh['E']}, top-{sh['top_k']}, {sh['dtype']} logits): eager chain "
            f"{r['eager_us']:.0f} µs; fused {r['fused_us']:.0f} µs per call, {r['fused_graph_us']:.1f} µs replayed "
            f"from a CUDA graph (device time); identical to the eager chain on fp32 logits: {r['same_as_eager_fp32']}.",
            "",
        ]
    return "\n".join(lines)
