"""Configuration: packaged default YAML <- user YAML <- ``key=value`` overrides.

One parser for every entry point. Defaults live inside the package (``dinov2/configs``) so an
installed toolkit needs no checkout; the resolved result is written next to the outputs and
embedded in every checkpoint so a run can be rebuilt from its files alone.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig, OmegaConf


def packaged_config_path(name: str) -> Path:
    """Path of a YAML shipped inside ``dinov2/configs`` (e.g. ``"ssl3d_default_config"``)."""
    rel = name if name.endswith(".yaml") else name + ".yaml"
    path = Path(str(resources.files("dinov2") / "configs" / rel))
    if not path.is_file():
        available = sorted(
            str(p.relative_to(path.parents[len(Path(rel).parts) - 1]))
            for p in Path(str(resources.files("dinov2") / "configs")).rglob("*.yaml")
        )
        raise FileNotFoundError(f"No packaged config '{rel}'. Available: {', '.join(available)}")
    return path


def load_yaml(path: str | os.PathLike) -> DictConfig:
    """Read one YAML file into a DictConfig, with an error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file not found: {path}. Pass an existing YAML with --config-file.")
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends: re-raise with the file name
        raise ValueError(f"Could not parse config file {path}: {exc}") from exc
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"Config file {path} must hold a mapping at the top level, got {type(cfg).__name__}.")
    return cfg


def merge_configs(
    default: str | os.PathLike | DictConfig | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
) -> DictConfig:
    """Merge default <- config_file <- overrides and resolve interpolations.

    Args:
        default: packaged config name (``"ssl3d_default_config"``), a YAML path, or a DictConfig.
        config_file: optional user YAML merged on top.
        overrides: ``key=value`` strings (OmegaConf dotlist), merged last.

    Returns:
        The resolved DictConfig. Keys in ``config_file`` / ``overrides`` that the default
        does not define are accepted (new experiments add keys), but a typo in a nested key
        of the default is easy to miss, so :func:`unknown_keys` lists them for a warning.
    """
    parts = []
    if default is not None:
        if isinstance(default, DictConfig):
            parts.append(default)
        elif Path(str(default)).suffix == ".yaml" and Path(default).is_file():
            parts.append(load_yaml(default))
        else:
            parts.append(load_yaml(packaged_config_path(str(default))))
    if config_file:
        parts.append(load_yaml(config_file))
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"Override '{item}' is not of the form key=value (e.g. optim.epochs=10).")
    if overrides:
        parts.append(OmegaConf.from_dotlist(overrides))
    cfg = OmegaConf.merge(*parts) if parts else OmegaConf.create()
    OmegaConf.resolve(cfg)
    return cfg


def unknown_keys(cfg: DictConfig, reference: DictConfig, prefix: str = "") -> list[str]:
    """Dotted keys present in ``cfg`` but absent from ``reference`` (likely typos)."""
    out = []
    # keys() rather than `in`: OmegaConf reports a key whose value is still ??? as absent.
    known = set(reference.keys())
    for key in cfg.keys():
        dotted = f"{prefix}{key}"
        if key not in known:
            out.append(dotted)
            continue
        value, ref = cfg._get_node(key), reference._get_node(key)
        if isinstance(value, DictConfig) and isinstance(ref, DictConfig):
            out.extend(unknown_keys(value, ref, dotted + "."))
    return out


def save_config(cfg: DictConfig, output_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config to ``output_dir/name`` and return the path."""
    path = Path(output_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)
    return path


def config_to_dict(cfg: DictConfig) -> dict:
    """Plain-container copy of a config, for embedding in checkpoints (no OmegaConf pickles)."""
    return OmegaConf.to_container(cfg, resolve=True)
