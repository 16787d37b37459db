"""Build data/stdlib_chat.jsonl: chat rows from the standard library, a docstring asking for its function's source.

Each row is ``{"messages": [system, user, assistant]}``: the user turn gives a function's name, signature and
docstring, the assistant turn is the function's source without the docstring. Deterministic for a given
Python: fixed modules, functions in source order, no randomness. Small by construction (``--max-kb``).

    python tools/make_sft_data.py --out data/stdlib_chat.jsonl
"""

import argparse
import ast
import importlib
import inspect
import json
import textwrap
from pathlib import Path

MODULES = ["textwrap", "shlex", "fnmatch", "posixpath", "heapq", "bisect", "colorsys", "calendar", "statistics",
           "string", "difflib", "html", "base64", "quopri", "urllib.parse", "email.utils", "glob", "glob",
           "filecmp", "fractions", "random", "tokenize", "gettext", "locale", "copy", "pprint", "reprlib",
           "operator", "functools", "ipaddress", "mimetypes", "netrc", "ntpath", "csv", "dataclasses", "enum",
           "inspect", "zipfile", "tarfile", "shutil", "tempfile", "argparse", "configparser", "json.decoder",
           "json.encoder", "sched", "uuid", "wave", "zoneinfo._common", "graphlib", "contextlib", "abc", "numbers"]
SYSTEM = "You write small, correct Python functions in the style of the standard library."


def rows(max_chars: int):
    seen = set()
    for name in dict.fromkeys(MODULES):
        try:
            module = importlib.import_module(name)
            tree = ast.parse(inspect.getsource(module))
        except (ImportError, OSError, TypeError):
            continue
        source = inspect.getsource(module)
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(doc) < 40 or (name, node.name) in seen:
                continue
            seen.add((name, node.name))
            body = node.body[1:]  # without the docstring
            if not body:
                continue
            code = ast.get_source_segment(source, node)
            doc_node = node.body[0]
            lines = code.splitlines()
            first, last = doc_node.lineno - node.lineno, doc_node.end_lineno - node.lineno
            answer = textwrap.dedent("\n".join(lines[:first] + lines[last + 1:]))
            if len(answer) > max_chars or len(answer) < 40:
                continue
            args = ast.unparse(node.args)
            user = f"Write `{node.name}({args})` for the `{name}` module.\n\n{doc}"
            yield {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
                                {"role": "assistant", "content": f"```python\n{answer}\n```"}]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/stdlib_chat.jsonl")
    ap.add_argument("--max-kb", type=int, default=300, help="stop before the file passes this size")
    ap.add_argument("--max-chars", type=int, default=1200, help="longest answer kept (characters)")
    a = ap.parse_args()
    out, size, n = Path(a.out), 0, 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for row in rows(a.max_chars):
            line = json.dumps(row, ensure_ascii=False) + "\n"
            if size + len(line.encode()) > a.max_kb * 1024:
                break
            f.write(line)
            size, n = size + len(line.encode()), n + 1
    print(f"{out}: {n} conversations, {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
