#!/usr/bin/env python3
"""Build onnxmp/kernels/onnxruntime.json: which element types onnxruntime has kernels for.

Sources, either or both:

* a saved copy of onnxruntime's ``docs/OperatorKernels.md`` (generated upstream from the
  registered kernels). It has one section per execution provider ("## Operators implemented by
  CUDAExecutionProvider"), each a markdown table ``Op Name | Parameters | OpSet Version | Types
  Supported`` split by ``|**Operator Domain:** *ai.onnx*||||`` rows. A row whose first cell is
  empty continues the op above with an older opset range. Versions read ``[7, 12]``, ``13`` or
  ``13+``; types read ``**T** = tensor(double), tensor(float)<br/> **T1** = tensor(int64)``.
  The Parameters column is not used and may be empty.
* ``--from-runtime``: the kernel registry of the installed onnxruntime
  (``get_all_opkernel_def()``, what the upstream doc generator reads). The CPU wheel only holds
  CPUExecutionProvider. Providers read from the runtime replace those read from markdown.

Usage::

    python tools/gen_kernel_tables.py OperatorKernels.md --commit <sha> [--from-runtime] \
        [-o onnxmp/kernels/onnxruntime.json]

The output is deterministic: keys sorted, entries sorted by opset, types sorted, fixed indent.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

PROVIDERS = {
    "CPUExecutionProvider": "cpu",
    "CUDAExecutionProvider": "cuda",
}
DEFAULT_DOMAINS = ("ai.onnx", "com.microsoft")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "onnxmp" / "kernels" / "onnxruntime.json"
OPEN_END = 2147483647  # INT_MAX: how the kernel registry spells "no end version"

_SECTION = re.compile(r"^##\s+Operators implemented by\s+(\w+)")
_DOMAIN = re.compile(r"^\|\s*\*\*Operator Domain:\*\*\s*\*([^*]+)\*")
_CONSTRAINT = re.compile(r"\*\*([^*]+)\*\*\s*=\s*(.*)")


class ParseError(ValueError):
    pass


def parse_version(cell: str) -> tuple[int, int | None]:
    """``[7, 12]`` -> (7, 12); ``13`` -> (13, 13); ``13+`` -> (13, None)."""
    text = cell.strip()
    m = re.fullmatch(r"\[\s*(\d+)\s*,\s*(\d+)\s*\]", text)
    if m:
        return int(m.group(1)), int(m.group(2))
    m = re.fullmatch(r"(\d+)\+", text)
    if m:
        return int(m.group(1)), None
    m = re.fullmatch(r"\d+", text)
    if m:
        return int(text), int(text)
    raise ParseError(f"bad opset version cell: {cell!r}")


def _split_types(text: str) -> list[str]:
    """Split ``seq(tensor(float)), tensor(int64)`` at the commas outside parentheses."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def parse_types(cell: str) -> dict[str, list[str]]:
    """``**T** = tensor(a), tensor(b)<br/> **U** = tensor(c)`` -> {"T": [...], "U": [...]}."""
    result: dict[str, list[str]] = {}
    for part in re.split(r"<br\s*/?>", cell):
        part = part.strip()
        if not part:
            continue
        m = _CONSTRAINT.fullmatch(part)
        if not m:
            raise ParseError(f"bad type constraint: {part!r}")
        name, types = m.group(1).strip(), _split_types(m.group(2))
        result.setdefault(name, [])
        result[name] = sorted(set(result[name]) | set(types))
    return result


def _cells(line: str) -> list[str]:
    body = line.strip()
    if body.startswith("|"):
        body = body[1:]
    if body.endswith("|"):
        body = body[:-1]
    return body.split("|")


def parse_markdown(text: str, domains=DEFAULT_DOMAINS, providers=PROVIDERS) -> dict:
    """Markdown text -> {provider: {domain: {op: [entry, ...]}}} for the chosen providers/domains."""
    tables: dict = {}
    provider = domain = op = None
    for lineno, line in enumerate(text.splitlines(), 1):
        m = _SECTION.match(line)
        if m:
            provider = providers.get(m.group(1))
            domain = op = None
            continue
        if provider is None or not line.startswith("|"):
            continue
        m = _DOMAIN.match(line)
        if m:
            domain, op = m.group(1).strip(), None
            continue
        cells = _cells(line)
        first = cells[0].strip()
        if len(cells) != 4 or first == "Op Name" or (first and set(first) <= {"-"}):
            continue  # table header, separator, "| |" spacer rows
        if domain is None:
            raise ParseError(f"line {lineno}: kernel row before any domain heading")
        name = cells[0].strip()
        if name:
            op = name
        elif op is None:
            raise ParseError(f"line {lineno}: continuation row with no op above it")
        if domain not in domains:
            continue
        try:
            since, until = parse_version(cells[2])
            types = parse_types(cells[3])
        except ParseError as exc:
            raise ParseError(f"line {lineno}: {exc}") from None
        ops = tables.setdefault(provider, {}).setdefault(domain, {})
        ops.setdefault(op, []).append({"since": since, "until": until, "types": types})
    return tables


def from_runtime(domains=DEFAULT_DOMAINS, providers=PROVIDERS) -> tuple[dict, dict]:
    """The installed onnxruntime's registered kernels, merged per (op, opset range) as in the doc."""
    import onnxruntime
    from onnxruntime.capi import onnxruntime_pybind11_state as rtpy

    merged: dict = {}
    for kdef in rtpy.get_all_opkernel_def():
        provider = providers.get(kdef.provider)
        domain = kdef.domain or "ai.onnx"
        if provider is None or domain not in domains:
            continue
        start, end = kdef.version_range
        key = (provider, domain, kdef.op_name, start, None if end >= OPEN_END else end)
        slot = merged.setdefault(key, {})
        for name, types in kdef.type_constraints.items():
            slot.setdefault(name, set()).update(types)
    tables: dict = {}
    for (provider, domain, op, since, until), types in merged.items():
        ops = tables.setdefault(provider, {}).setdefault(domain, {})
        entry = {"since": since, "until": until, "types": {k: sorted(v) for k, v in types.items()}}
        ops.setdefault(op, []).append(entry)
    info = {"kind": "runtime", "onnxruntime": onnxruntime.__version__}
    build = getattr(onnxruntime, "get_build_info", lambda: "")()
    m = re.search(r"git-commit-id=(\w+)", build)
    if m:
        info["git_commit"] = m.group(1)
    return tables, {p: dict(info) for p in tables}


def normalize(tables: dict) -> dict:
    """Sort each op's entries by opset and merge duplicate ranges (union of types)."""
    out: dict = {}
    for provider, doms in tables.items():
        for domain, ops in doms.items():
            for op, entries in ops.items():
                by_range: dict = {}
                for e in entries:
                    slot = by_range.setdefault((e["since"], e["until"]), {})
                    for name, types in e["types"].items():
                        slot.setdefault(name, set()).update(types)
                out.setdefault(provider, {}).setdefault(domain, {})[op] = [
                    {"since": s, "until": u, "types": {k: sorted(v) for k, v in sorted(t.items())}}
                    for (s, u), t in sorted(by_range.items(), key=lambda kv: (kv[0][0], kv[0][1] or OPEN_END))
                ]
    return out


def build(markdown: str | None = None, *, commit: str | None = None, version: str | None = None,
          use_runtime: bool = False, domains=DEFAULT_DOMAINS) -> dict:
    tables: dict = {}
    sources: dict = {}
    if markdown is not None:
        tables = parse_markdown(markdown, domains)
        md_info = {"kind": "markdown", "file": "docs/OperatorKernels.md (microsoft/onnxruntime)"}
        if commit:
            md_info["commit"] = commit
        if version:
            md_info["onnxruntime"] = version
        sources = {p: dict(md_info) for p in tables}
    if use_runtime:
        rt_tables, rt_sources = from_runtime(domains)
        tables.update(rt_tables)
        sources.update(rt_sources)
    versions = []
    for provider in sorted(sources):
        src = sources[provider]
        if src.get("onnxruntime"):
            label = src["onnxruntime"] + (f" (git {src['git_commit']})" if src.get("git_commit") else "")
        else:
            label = f"docs at commit {src.get('commit', 'unknown')}"
        versions.append(f"{provider}: {label}")
    return {
        "onnxruntime_version": "; ".join(versions),
        "sources": sources,
        "providers": normalize(tables),
    }


def dumps(table: dict) -> str:
    """Stable JSON: sorted keys, nested objects indented by one, each kernel entry on one line."""

    def one(obj) -> str:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    def emit(obj, depth: int) -> str:
        pad, inner = " " * depth, " " * (depth + 1)
        if isinstance(obj, dict) and obj:
            items = [f"{inner}{json.dumps(k)}: {emit(v, depth + 1)}" for k, v in sorted(obj.items())]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(obj, list) and obj and all(isinstance(e, dict) and "since" in e for e in obj):
            return "[\n" + ",\n".join(inner + one(e) for e in obj) + "\n" + pad + "]"
        return one(obj)

    return emit(table, 0) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("markdown", nargs="?", type=Path, help="saved docs/OperatorKernels.md (or an excerpt)")
    ap.add_argument("--commit", help="onnxruntime commit the markdown was read at")
    ap.add_argument("--version", help="onnxruntime version the markdown describes, if known")
    ap.add_argument("--from-runtime", action="store_true",
                    help="take the providers the installed onnxruntime has from its kernel registry")
    ap.add_argument("--domains", default=",".join(DEFAULT_DOMAINS), help="comma-separated domains to keep")
    ap.add_argument("-o", "--output", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.markdown is None and not args.from_runtime:
        ap.error("give a markdown file, --from-runtime, or both")
    text = args.markdown.read_text(encoding="utf-8") if args.markdown else None
    table = build(text, commit=args.commit, version=args.version, use_runtime=args.from_runtime,
                  domains=tuple(d.strip() for d in args.domains.split(",") if d.strip()))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(dumps(table), encoding="utf-8")
    counts = {p: sum(len(ops) for ops in doms.values()) for p, doms in table["providers"].items()}
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes): ops per provider {counts}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
