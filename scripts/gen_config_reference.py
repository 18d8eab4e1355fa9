"""Generate docs/configuration.md from the packaged YAML files, so the reference cannot drift.

Every key of every file under ``dinov2/configs`` is listed with its default and the comment
written beside it (or on the lines just above it) in the YAML, then the command-line flags of
each entry point and the config keys they set, and the deprecated spellings of renamed keys
(``dinov2.utils.config.DEPRECATED_KEYS``). ``tests/test_docs.py`` fails when the committed page
differs from what this script writes.

    python scripts/gen_config_reference.py            # rewrite docs/configuration.md
    python scripts/gen_config_reference.py --check    # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's dinov2, also when it is not installed
CONFIG_DIR = REPO / "dinov2" / "configs"
OUTPUT = REPO / "docs" / "configuration.md"

# Order and one-line purpose of each packaged file; files not listed follow alphabetically.
FILES = {
    "ssl3d_default_config.yaml": "pretraining defaults (`python -m dinov2.train.train3d`); merged over data_defaults.yaml",
    "data_defaults.yaml": "pretraining crops, augmentation and preprocessing (`crops:`, `preprocessing:`)",
    "train/vit3d_highres.yaml": "the high-resolution stage, merged over the pretraining defaults",
    "eval/segmentation_default.yaml": "`python -m dinov2.eval.segmentation` defaults",
    "eval/linear_default.yaml": "`python -m dinov2.eval.linear` defaults",
}

KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_]+):(?P<rest>.*)$")


def split_comment(text: str) -> tuple[str, str]:
    """Split ``value  # comment`` outside quotes."""
    quote = None
    for i, ch in enumerate(text):
        if ch in "'\"":
            quote = None if quote == ch else (ch if quote is None else quote)
        elif ch == "#" and quote is None and (i == 0 or text[i - 1].isspace()):
            return text[:i].strip(), text[i + 1:].strip()
    return text.strip(), ""


def entries(path: Path) -> list[tuple[str, str, str]]:
    """``(dotted key, default, meaning)`` for every key of a block-style YAML file."""
    rows, stack, pending = [], [], []
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        match = KEY_LINE.match(raw)
        if not match:
            pending = []
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([k for _, k in stack] + [match["key"]])
        value, comment = split_comment(match["rest"])
        meaning = " ".join(p for p in pending + [comment] if p)
        pending = []
        if value == "":  # a section: its children follow
            stack.append((indent, match["key"]))
            if meaning:
                rows.append((key, "", meaning))
            continue
        rows.append((key, value, meaning))
    return rows


# Entry points whose flags set config keys: (command, module, the module's flag -> key maps).
ENTRY_POINTS = [
    ("python -m dinov2.train.train3d", "dinov2.train.train3d", ("FLAG_KEYS",)),
    ("python -m dinov2.eval.segmentation", "dinov2.eval.segmentation.finetune", ("FLAG_KEYS", "DATASET_FLAG_KEYS")),
    ("python -m dinov2.eval.linear", "dinov2.eval.linear.run", ("FLAG_KEYS", "DATASET_FLAG_KEYS")),
]


def flag_rows() -> list[str]:
    """One table per entry point: each flag (all its spellings) and the config key it sets."""
    import importlib

    from dinov2.eval.presets import DATASET_FLAG_KEYS

    out = ["## Command-line flags", "",
           "Flags are merged after `--config-file` and before `key=value` overrides; the same flag sets the",
           "same key in every entry point.", ""]
    for command, module_name, maps in ENTRY_POINTS:
        module = importlib.import_module(module_name)
        keys = {}
        for name in maps:
            keys.update(DATASET_FLAG_KEYS if name == "DATASET_FLAG_KEYS" else getattr(module, name))
        out += [f"### `{command}`", "", "| flag | config key |", "|---|---|"]
        for action in module.get_args_parser()._actions:
            if action.dest in keys:
                flags = " ".join(f"`{f}`" for f in action.option_strings)
                out.append(f"| {flags} | `{keys[action.dest]}` |")
        out.append("")
    return out


def deprecated_rows() -> list[str]:
    from dinov2.utils.config import DEPRECATED_KEYS

    out = ["## Deprecated spellings", "",
           "Still accepted for one release, in YAML files, presets and `key=value` overrides, with a warning",
           "that names the new key; giving both spellings is an error.", "",
           "| old key | new key |", "|---|---|"]
    out += [f"| `{old}` | `{new}` |" for old, new in DEPRECATED_KEYS.items()]
    out.append("")
    return out


def render() -> str:
    paths = sorted(CONFIG_DIR.rglob("*.yaml"))
    rel = {p.relative_to(CONFIG_DIR).as_posix(): p for p in paths}
    order = [n for n in FILES if n in rel] + sorted(n for n in rel if n not in FILES)
    out = ["# Configuration reference", "",
           "Generated by `python scripts/gen_config_reference.py` from the YAML files packaged in",
           "`dinov2/configs/`; do not edit by hand. Merge order for every entry point (one builder,",
           "`dinov2.utils.config.load_config`): packaged defaults ← dataset preset (`--dataset-name`, into",
           "`dataset:`) ← `--config-file` ← command-line flags ← `key=value` on the command line",
           "(OmegaConf dotlist). A key that is not listed here is an error that names the key, the file",
           "(or the command line) it came from and the closest known key. `???` marks a value you must give.", ""]
    known: dict[str, tuple[str, str]] = {}  # dotted key -> (file, meaning) of the first file that explains it
    for name in order:
        purpose = FILES.get(name) or ("dataset preset" if name.startswith("datasets/") else "")
        out += [f"## `{name}`", ""]
        if purpose:
            out += [purpose[0].upper() + purpose[1:] + ".", ""]
        yaml.safe_load(rel[name].read_text())  # fail loudly on a file that is not valid YAML
        out += ["| key | default | meaning |", "|---|---|---|"]
        for key, value, meaning in entries(rel[name]):
            if meaning:
                known.setdefault(key, (name, meaning))
            elif key in known:  # an override file repeats a key explained in a base file
                meaning = f"as in `{known[key][0]}`: {known[key][1]}"
            shown = f"`{value}`" if value else "*(section)*"
            out.append(f"| `{key}` | {shown} | {meaning.replace('|', '/')} |")
        out.append("")
    out += flag_rows() + deprecated_rows()
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT} is out of date: run python scripts/gen_config_reference.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
