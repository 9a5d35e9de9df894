"""README.md and docs/*.md: every quoted table of measurements equals the file it comes
from, and the pages describe the software and its measurements, not how it came to be.

A quoted block is marked by a comment on the line before it,
`<!-- table from SOURCE -->` (the table's rows follow) or `<!-- lines from SOURCE -->`
(a fenced block follows); each of its lines must be a line of SOURCE as its generator
writes it: a generated .md file as it is, a JSON file through the bench script's own
table printer, docs/default_run.jsonl through the run's own accuracy line.
"""

import contextlib
import io
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARK = re.compile(r"^<!-- (table|lines) from (\S+) -->$")
HISTORY = re.compile(r"this session|issue [0-9]|used to|previous preset", re.IGNORECASE)


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def quotes(path: Path) -> list[tuple[str, list[str]]]:
    """(source, quoted lines) for each marked block of a page."""
    lines = path.read_text().splitlines()
    found = []
    for i, line in enumerate(lines):
        m = MARK.match(line)
        if not m:
            continue
        rest = lines[i + 1 :]
        if m.group(1) == "table":
            block = []
            for row in rest:
                if not row.startswith("|"):
                    break
                block.append(row)
        else:
            assert rest and rest[0].startswith("```"), (path.name, line)
            block = rest[1 : 1 + next(j for j, r in enumerate(rest[1:]) if r.startswith("```"))]
        assert block, (path.name, line)
        found.append((m.group(2), block))
    return found


def bench_module(name: str):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(ROOT / "bench"))


def printed(fn, *args) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn(*args)
    return out.getvalue()


def default_run_lines(path: Path) -> list[str]:
    """The held-out table of a run's metrics.jsonl, and the two lines the run prints at its end."""
    from harness.evaluation import format_accuracy

    rows = [json.loads(x) for x in path.read_text().splitlines()]
    evals = [
        {k: v for k, v in r.items() if k.startswith("eval_") or k == "step"}
        for r in rows
        if "eval_greedy" in r
    ]
    table = ["| step | held-out mean@4 | pass@4 | greedy | teacher view, greedy |", "|---|---|---|---|---|"]
    table += [
        f"| {e['step']} | {100 * e['eval_mean@4']:.1f}% | {100 * e['eval_pass@4']:.1f}% | "
        f"{100 * e['eval_greedy']:.1f}% | {100 * e['eval_teacher_greedy']:.1f}% |"
        for e in evals
    ]
    first, last = ({k: v for k, v in e.items() if k != "step"} for e in (evals[0], evals[-1]))
    return table + [
        f"held-out accuracy before: {format_accuracy(first)}",
        f"held-out accuracy after:  {format_accuracy(last)}",
    ]


def source_lines(source: str) -> set[str]:
    """The lines of `source` as its generator prints them."""
    path = ROOT / source
    assert path.exists(), source
    if path.suffix == ".md":
        return set(path.read_text().splitlines())
    if source == "docs/default_run.jsonl":
        return set(default_run_lines(path))
    data = json.loads(path.read_text())
    if source.startswith("bench/kl_bench"):
        # bench/kl_bench_8192.json's rows have no divergence field: they are the reverse KL
        rows = [{"divergence": "reverse", **r} for r in data["rows"]]
        return set(printed(bench_module("kl_bench").print_table, rows).splitlines())
    if source.startswith("bench/dtype_bench"):  # the small preset's file and the tiny one's
        return set(bench_module("dtype_bench").table(data).splitlines())
    if source == "bench/generate_bench.json":
        return set(bench_module("generate_bench").table(data).splitlines())
    if source == "docs/regime_map.json":
        return set(bench_module("regime_map").report(data).splitlines())
    if source == "docs/style_leak.json":
        return set(bench_module("style_leak").table(data).splitlines())
    if source == "bench/step_bench.json":  # bench/step_bench.py's table
        lines = ["| contender | s / step | generate s / step | peak RSS GB |", "|---|---|---|---|"]
        for c, s in data["summary"].items():
            gen = f"{s['generate_s']:.2f}" if s["generate_s"] is not None else "n/a"
            lines.append(f"| {c} | {s['step_s']:.2f} | {gen} | {s['peak_rss_gb']:.2f} |")
        return set(lines)
    if source == "bench/verifier_soak.json":  # bench/verifier_soak.py's table
        lines = ["| kind | inputs | exceptions | slowest call (ms) |", "|---|---|---|---|"]
        lines += [f"| {k} | {s['n']} | {s['exceptions']} | {s['slowest_ms']:.1f} |" for k, s in data.items()]
        return set(lines)
    raise AssertionError(f"no generator known for {source}")


@pytest.mark.parametrize("page", [p.relative_to(ROOT).as_posix() for p in pages()])
def test_every_quoted_table_equals_its_source(page):
    wrong = []
    for source, block in quotes(ROOT / page):
        known = source_lines(source)
        wrong += [
            f"{page} quotes {source}, which has no line {line!r}" for line in block if line not in known
        ]
    assert not wrong, "\n".join(wrong)


def test_readme_quotes_its_results_and_each_results_table_names_its_source():
    readme = ROOT / "README.md"
    sources = [s for s, _ in quotes(readme)]
    for needed in ("docs/default_run.jsonl", "docs/compare_algos.md", "docs/real_model.md"):
        assert needed in sources, needed
    results = readme.read_text().split("## Results in brief", 1)[1].split("\n## ", 1)[0].splitlines()
    for i, line in enumerate(results):
        if line.startswith("|") and not results[i - 1].startswith("|"):  # a table's first row
            assert MARK.match(results[i - 1]), f"README results table without its source: {line}"


def test_the_pages_describe_the_software_not_its_history():
    """As `grep -niE "this session|issue [0-9]|used to|previous preset" README.md docs/*.md`."""
    hits = [
        f"{p.relative_to(ROOT)}:{n}: {line}"
        for p in pages()
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if HISTORY.search(line)
    ]
    assert not hits, "\n".join(hits)


def test_every_docs_page_is_linked_and_every_link_resolves():
    readme = (ROOT / "README.md").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert f"](docs/{page.name})" in readme, f"README does not link docs/{page.name}"
    for page in pages():
        for target in re.findall(r"\]\(([^)#:]+)\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links {target}"


def test_the_regime_map_page_is_its_json_through_the_bench_printer():
    data = json.loads((ROOT / "docs" / "regime_map.json").read_text())
    assert (ROOT / "docs" / "regime_map.md").read_text() == bench_module("regime_map").report(data)
