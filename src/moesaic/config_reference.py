"""Write the reference of every config key (path, type, default, meaning) from the config dataclasses.

    python -m moesaic.config_reference --out docs/config-reference.md   # regenerate
    python -m moesaic.config_reference --check docs/config-reference.md # exit 1 when stale

The text comes from :meth:`moesaic._config.Section.describe` over :class:`moesaic.train.config.TrainConfig`,
so a key added to a section (with its ``doc``) appears here on the next run; a unit test fails when
the committed file differs from what this module renders.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ._config import KeyDoc
from .deepspeed.accepted import accepted_rows
from .deepspeed.keys import FEATURE_SECTIONS, VALUE_HINTS, hint_rows, refused_rows
from .train.config import RENAMED, TrainConfig

COMMAND = "python -m moesaic.config_reference --out docs/config-reference.md"

_INTRO = f"""# Config reference

Generated from the config dataclasses by `{COMMAND}`; do not edit by hand
(`tests/unit/test_config_reference.py` fails when this file is stale).

One tree holds every setting. `moesaic train` reads it from TOML (or JSON): a key `a.b.c` is `c`
in table `[a.b]`, and `--set a.b.c=VALUE` overrides it (TOML syntax for the value). `moesaic.initialize`
takes the `engine` section alone, in DeepSpeed's layout: the same keys without the `engine.` prefix
(`{{"train_micro_batch_size_per_gpu": 16, "bf16": {{"enabled": true}}, "optimizer": {{...}}}}`).
Unknown keys are errors at every level. `null` means absent (TOML has no null; JSON and dicts may
write it).
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _tables(rows: List[KeyDoc]) -> List[Tuple[str, List[KeyDoc]]]:
    """Rows grouped by section (the path without its last key) and variant, in first-seen order."""
    groups: Dict[Tuple[str, str], List[KeyDoc]] = {}
    for row in rows:
        groups.setdefault((row.path.rpartition(".")[0], row.variant), []).append(row)
    return [(f"`{where}`" + (f" when `{variant}`" if variant else ""), group)
            for (where, variant), group in groups.items()]


def render() -> str:
    """The whole reference as Markdown."""
    out = [_INTRO]
    for title, rows in _tables(TrainConfig.describe()):
        out.append(f"\n## {title}\n\n| key | type | default | meaning |\n|---|---|---|---|")
        out.extend(f"| `{r.path}` | {_cell(r.type)} | `{_cell(r.default)}` | {_cell(r.doc)} |" for r in rows)
    out.append("\n## DeepSpeed keys moesaic accepts with what it does\n\nKeys of DeepSpeed's config that only choose "
               "between DeepSpeed's own implementations. The DeepSpeed bridge (`moesaic.initialize`, "
               "`moesaic.deepspeed.load_config`, and `moesaic train`'s `engine` section, under `engine.`) accepts "
               "the values that describe what moesaic does, refuses any other with the reason, and drops them: "
               "they are not settings of the engine config above, which names the bridge when given one "
               "directly.\n\n| key | type | default | meaning |\n|---|---|---|---|")
    out.extend(f"| `{r.path}` | {_cell(r.type)} | `{_cell(r.default)}` | {_cell(r.doc)}"
               f"{' (optimizer type Adam or AdamW)' if r.path.startswith('optimizer.params.') else ''} |"
               for r in accepted_rows())
    out.append("\n## DeepSpeed keys moesaic refuses\n\nKeys of DeepSpeed's config for features moesaic does not have "
               "are refused with the reason below whatever their value (in `moesaic train`, under `engine.`). "
               "The feature sections among them (" + ", ".join(f"`{s}`" for s in FEATURE_SECTIONS) +
               ") are accepted when disabled (`{\"enabled\": false}`).\n\n"
               "| key | why it is refused |\n|---|---|")
    out.extend(f"| `{path}` | {_cell(reason)} |" for path, reason in refused_rows())
    out.append("\n## DeepSpeed hints moesaic accepts with a note\n\nKeys that in DeepSpeed only tune speed, memory "
               "placement or logging and cannot change the numbers: accepted with any value, and `initialize` notes "
               "each once (rank 0). Keys of the tables above whose other values are such hints are noted too "
               "(" + ", ".join(f"`{k}`" for k in VALUE_HINTS) + ").\n\n| key | note |\n|---|---|")
    out.extend(f"| `{path}` | {_cell(note)} |" for path, note in hint_rows())
    out.append("\n## Keys of the former layout\n\nRefused with a message naming the new key "
               "(checkpoints written with them still resume).\n\n| former key | now |\n|---|---|")
    out.extend(f"| `{old}` | `{new}` |" for old, new in RENAMED.items())
    return "\n".join(out) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moesaic.config_reference", description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--out", help="write the reference to this file (default: print it)")
    mode.add_argument("--check", metavar="FILE", help="exit 1 when FILE differs from the rendered reference")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = Path(args.check).read_text(encoding="utf-8") if Path(args.check).is_file() else ""
        if current != text:
            print(f"{args.check} is stale; regenerate it with `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
