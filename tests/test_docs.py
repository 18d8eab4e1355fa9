"""Documentation generated from code stays in step with it."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_configuration_reference_is_up_to_date():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_config_reference.py"), "--check"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


def test_configuration_reference_lists_every_packaged_key():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gen_config_reference as gen
    finally:
        sys.path.pop(0)
    from omegaconf import OmegaConf

    text = (REPO / "docs" / "configuration.md").read_text()
    for path in (REPO / "dinov2" / "configs").rglob("*.yaml"):
        flat = OmegaConf.to_container(OmegaConf.load(path), resolve=False)

        def leaves(node, prefix=""):
            for key, value in node.items():
                if isinstance(value, dict) and value:
                    yield from leaves(value, f"{prefix}{key}.")
                else:
                    yield f"{prefix}{key}"

        listed = {key for key, _, _ in gen.entries(path)}
        # A flow-style mapping ({a: 1, b: 2}) is listed once, as its parent's default.
        missing = [k for k in leaves(flat)
                   if not any(".".join(k.split(".")[:i]) in listed for i in range(1, k.count(".") + 2))]
        assert not missing, f"{path.name}: keys missing from the reference: {missing}"
        assert f"`{path.relative_to(REPO / 'dinov2' / 'configs').as_posix()}`" in text


def test_configuration_reference_lists_the_flags_and_the_deprecated_spellings():
    from dinov2.utils.config import DEPRECATED_KEYS

    text = (REPO / "docs" / "configuration.md").read_text()
    for old, new in DEPRECATED_KEYS.items():
        assert f"| `{old}` | `{new}` |" in text
    for command in ("dinov2.train.train3d", "dinov2.eval.segmentation", "dinov2.eval.linear"):
        assert f"### `python -m {command}`" in text
    assert "| `--device` | `device` |" in text and "| `--eval-period-iterations` `--eval-iters` |" in text
