"""Configuration: one builder for every entry point, always strict.

:func:`load_config` merges, later winning::

    packaged defaults <- dataset preset <- --config-file <- command-line flags <- key=value overrides

An unknown key, from any of these, is a :class:`ConfigError` whose message names the key, where
it came from (the file, the preset, or "command line") and the closest known key. Old spellings
of renamed keys (:data:`DEPRECATED_KEYS`) still work for one release, with a warning that names
the new key. Defaults live inside the package (``dinov2/configs``) so an installed toolkit needs
no checkout; the resolved result is written next to the outputs and embedded in every checkpoint
so a run can be rebuilt from its files alone.
"""

from __future__ import annotations

import difflib
import os
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from omegaconf import DictConfig, OmegaConf

from dinov2.utils.deprecation import warn_deprecated_key
from dinov2.utils.errors import UsageError

COMMAND_LINE = "command line"

# Old spelling -> current key. Accepted by load_config (in YAML files, presets and key=value
# overrides) with a DeprecatedConfigKeyWarning naming the new key; to be removed in the next release.
DEPRECATED_KEYS: dict[str, str] = {
    "train.device": "device",                                  # pretraining, segmentation
    "train.amp": "compute_precision.dtype",                    # segmentation
    "train.eval_iters": "evaluation.eval_period_iterations",   # segmentation
    "train.log_every": "train.log_period_iterations",          # segmentation
    "dataset_name": "dataset.name",                            # segmentation
    "base_data_dir": "dataset.base_data_dir",                  # segmentation
    "dataset_percent": "dataset.percent",                      # segmentation
    "dataset.roi_size": "dataset.image_size",                  # segmentation presets
}


class ConfigError(UsageError):
    """A config key the defaults do not define, or a value the config cannot hold.

    A ``ValueError`` (through :class:`~dinov2.utils.errors.UsageError`); entry points print it as
    one ``ERROR:`` line. The message names the key, its source and the closest known key.
    """


def packaged_config_path(name: str) -> Path:
    """Path of a YAML shipped inside ``dinov2/configs`` (e.g. ``"ssl3d_default_config"``)."""
    rel = name if name.endswith(".yaml") else name + ".yaml"
    path = Path(str(resources.files("dinov2") / "configs" / rel))
    if not path.is_file():
        root = Path(str(resources.files("dinov2") / "configs"))
        available = sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml"))
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
        raise ConfigError(f"Could not parse config file {path}: {exc}") from exc
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"Config file {path} must hold a mapping at the top level, got {type(cfg).__name__}.")
    return cfg


def merge_configs(
    default: str | os.PathLike | DictConfig | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
) -> DictConfig:
    """Merge default <- config_file <- overrides and resolve interpolations, without any check.

    The low-level merge for tests and tools that build a config by hand; every entry point uses
    :func:`load_config` instead (strict, presets, flags, deprecated spellings).

    Args:
        default: packaged config name (``"ssl3d_default_config"``), a YAML path, or a DictConfig.
        config_file: optional user YAML merged on top.
        overrides: ``key=value`` strings (OmegaConf dotlist), merged last.

    Returns:
        The resolved DictConfig. Keys in ``config_file`` / ``overrides`` that the default
        does not define are accepted here (:func:`unknown_keys` lists them).
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


def unknown_keys(cfg: DictConfig, reference: DictConfig, prefix: str = "", open_keys: Iterable[str] = ()) -> list[str]:
    """Dotted keys present in ``cfg`` but absent from ``reference`` (likely typos).

    ``open_keys``: dotted sections whose children are free (e.g. ``model.backbone_kwargs``, the
    constructor arguments of a backbone); a section the reference holds as ``null`` is free too.
    """
    open_keys = set(open_keys)
    out = []
    # keys() rather than `in`: OmegaConf reports a key whose value is still ??? as absent.
    known = set(reference.keys())
    for key in cfg.keys():
        dotted = f"{prefix}{key}"
        if key not in known:
            out.append(dotted)
            continue
        if dotted in open_keys:
            continue
        value, ref = cfg._get_node(key), reference._get_node(key)
        if isinstance(value, DictConfig) and isinstance(ref, DictConfig):
            out.extend(unknown_keys(value, ref, dotted + ".", open_keys))
    return out


def known_keys(reference: DictConfig, prefix: str = "") -> list[str]:
    """Every dotted key of ``reference``, sections included."""
    out = []
    for key in reference.keys():
        dotted = f"{prefix}{key}"
        out.append(dotted)
        node = reference._get_node(key)
        if isinstance(node, DictConfig):
            out.extend(known_keys(node, dotted + "."))
    return out


def closest_key(key: str, known: Iterable[str]) -> str | None:
    """The known key nearest to ``key`` (difflib): among its section's keys first, then all keys,
    then by its last part alone (a key put in the wrong section)."""
    known = list(known)
    section = key.rpartition(".")[0]
    siblings = [k for k in known if k.rpartition(".")[0] == section]
    match = (difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
             or difflib.get_close_matches(key, known, n=1, cutoff=0.6))
    if match:
        return match[0]
    by_leaf: dict[str, str] = {}
    for k in known:
        by_leaf.setdefault(k.rpartition(".")[2], k)
    match = difflib.get_close_matches(key.rpartition(".")[2], list(by_leaf), n=1, cutoff=0.75)
    return by_leaf[match[0]] if match else None


def where(source: str) -> str:
    """``source`` as a place in a sentence: "on the command line", "in my.yaml"."""
    return "on the command line" if source == COMMAND_LINE else f"in {source}"


def _unknown_key_error(unknown: list[str], source: str, reference: DictConfig) -> ConfigError:
    known = known_keys(reference)
    # A misspelt old spelling points to the new key.
    renamed = {old: new for old, new in DEPRECATED_KEYS.items() if new in known}
    parts = []
    for key in unknown:
        near = closest_key(key, known + list(renamed))
        near = renamed.get(near, near)
        parts.append(f"'{key}' (closest known key: '{near}')" if near else f"'{key}' (no known key is close)")
    noun = "key" if len(unknown) == 1 else "keys"
    return ConfigError(f"Unknown config {noun} {', '.join(parts)} {where(source)}; the known keys are listed in "
                       "docs/configuration.md.")


# --------------------------------------------------------------------------------- the builder
def _has_key(cfg: DictConfig, dotted: str) -> bool:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, DictConfig) or part not in node.keys():
            return False
        node = node._get_node(part)
    return True


def _pop_key(cfg: DictConfig, dotted: str) -> Any:
    """Remove ``dotted`` from ``cfg`` and return its value; sections left empty by it go too."""
    parent_key, _, leaf = dotted.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    node = parent._get_node(leaf)
    value = node if isinstance(node, DictConfig) or OmegaConf.is_list(node) else node._value()
    del parent[leaf]
    if parent_key and not len(parent):
        _pop_key(cfg, parent_key)
    return value


def _leaves(cfg: DictConfig, dotted: str) -> list[str]:
    """``dotted`` itself, or the dotted keys of the values under it when it is a non-empty section."""
    node = OmegaConf.select(cfg, dotted, throw_on_missing=False)
    if not isinstance(node, DictConfig) or not len(node):
        return [dotted]
    return [leaf for key in node.keys() for leaf in _leaves(cfg, f"{dotted}.{key}")]


def apply_deprecated_keys(layer: DictConfig, source: str, reference: DictConfig | None = None) -> DictConfig:
    """Move every old spelling of :data:`DEPRECATED_KEYS` in ``layer`` to its new key, warning once each.

    An alias applies only where ``reference`` (the entry point's defaults) knows the new key;
    elsewhere the old key stays and is reported as unknown.

    Raises:
        ConfigError: the old and the new spelling are both given in ``source``.
    """
    for old, new in DEPRECATED_KEYS.items():
        if not _has_key(layer, old) or (reference is not None and not _has_key(reference, new)):
            continue
        if _has_key(layer, new):
            raise ConfigError(f"Both '{old}' (deprecated) and '{new}' are set {where(source)}; keep only '{new}'.")
        warn_deprecated_key(old, new, source)
        value = _pop_key(layer, old)
        OmegaConf.update(layer, new, value, force_add=True, merge=False)
    return layer


def resolve_config_file(name: str | os.PathLike | None) -> Path | None:
    """``--config-file``: an existing path, or the name of a packaged config (``train/vit3d_highres``)."""
    if not name:
        return None
    path = Path(name)
    if path.is_file():
        return path
    try:
        return packaged_config_path(str(name))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"--config-file {name}: no such file, nor a packaged config. {exc}") from exc


def _defaults(default: str | os.PathLike | DictConfig | Iterable[str | os.PathLike | DictConfig]) -> DictConfig:
    items = [default] if isinstance(default, (str, os.PathLike, DictConfig)) else list(default)
    parts = []
    for item in items:
        if isinstance(item, DictConfig):
            parts.append(item)
        elif Path(str(item)).suffix == ".yaml" and Path(item).is_file():
            parts.append(load_yaml(item))
        else:
            parts.append(load_yaml(packaged_config_path(str(item))))
    return OmegaConf.merge(*parts) if parts else OmegaConf.create()


def _flag_layer(flags: Mapping[str, Any]) -> DictConfig:
    layer = OmegaConf.create()
    for key, value in flags.items():
        if value is not None:
            OmegaConf.update(layer, key, list(value) if isinstance(value, tuple) else value, force_add=True)
    return layer


def _override_layer(overrides: Iterable[str]) -> DictConfig:
    items = list(overrides)
    for item in items:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"Override '{item}' is not of the form key=value (e.g. optim.epochs=10).")
    try:
        return OmegaConf.from_dotlist(items)
    except Exception as exc:  # omegaconf's grammar errors: name the overrides
        raise ConfigError(f"Could not parse the key=value overrides {items}: {exc}") from exc


def load_config(
    default: str | os.PathLike | DictConfig | Iterable[str | os.PathLike | DictConfig],
    config_file: str | os.PathLike | None = None,
    flags: Mapping[str, Any] | None = None,
    overrides: Iterable[str] = (),
    *,
    preset_loader: Callable[[str], DictConfig] | None = None,
    preset_key: str = "dataset",
    reference: DictConfig | None = None,
    open_keys: Iterable[str] = (),
) -> DictConfig:
    """The run config: default <- dataset preset <- ``config_file`` <- ``flags`` <- ``overrides``.

    Every layer after the default is checked against the default (strict: an unknown key is an
    error) after its deprecated spellings were moved to their new keys (with a warning).

    Args:
        default: packaged config name(s) (``"eval/linear_default"``), YAML path(s) or DictConfig(s),
            merged in order; these define every key there is.
        config_file: ``--config-file``: a YAML path or a packaged name.
        flags: ``{dotted key: value}`` of the command-line flags given (``None`` values skipped).
        overrides: ``key=value`` strings (OmegaConf dotlist), merged last.
        preset_loader: with it, ``<preset_key>.name`` (wherever it was set, the later layer
            winning) names a preset, loaded by this callable and merged under ``<preset_key>``
            between the default and ``config_file``. No preset when the name is null or ``???``.
        preset_key: the section presets fill.
        reference: what the layers are checked against (default: ``default``), for a default
            whose section is a partial override of another file's (linear's ``dataset.preprocessing``).
        open_keys: dotted sections whose children are free (``model.backbone_kwargs``).

    Returns:
        The merged, resolved DictConfig. A ``???`` given by a layer and not set by a later one
        stays ``???`` (OmegaConf would keep the earlier value): callers list
        ``OmegaConf.missing_keys`` as required values.

    Raises:
        ConfigError: an unknown key (naming key, source and closest known key), a malformed
            override, an old and a new spelling both given, a file that is not a YAML mapping.
        FileNotFoundError: ``config_file`` is neither a file nor a packaged config; a preset is
            not found (from ``preset_loader``).
    """
    base = _defaults(default)
    reference = base if reference is None else reference
    open_keys = tuple(open_keys)
    path = resolve_config_file(config_file)
    layers: list[tuple[str, DictConfig]] = []
    if path is not None:
        layers.append((str(path), load_yaml(path)))
    if flags:
        layers.append((COMMAND_LINE, _flag_layer(flags)))
    overrides = list(overrides)
    if overrides:
        layers.append((COMMAND_LINE, _override_layer(overrides)))
    for source, layer in layers:
        apply_deprecated_keys(layer, source, reference)

    if preset_loader is not None:
        name_key = f"{preset_key}.name"
        name = None
        for _, layer in [("default", base), *layers]:
            if _has_key(layer, name_key):
                name = None if OmegaConf.is_missing(layer, name_key) else OmegaConf.select(layer, name_key)
        if name not in (None, "???"):
            preset = OmegaConf.create({preset_key: preset_loader(str(name))})
            layers.insert(0, (f"dataset preset '{name}'", apply_deprecated_keys(preset, f"dataset preset '{name}'",
                                                                                reference)))

    for source, layer in layers:
        # A whole unknown section is reported by its keys (train.amp, not train): they are what was typed.
        unknown = [leaf for key in unknown_keys(layer, reference, open_keys=open_keys) for leaf in _leaves(layer, key)]
        if unknown:
            raise _unknown_key_error(unknown, source, reference)

    try:
        cfg = OmegaConf.merge(base, *(layer for _, layer in layers))
    except Exception as exc:  # e.g. a section replaced by a scalar
        raise ConfigError(f"Could not merge the config: {exc}") from exc
    # A ??? in a later layer does not replace an earlier value in OmegaConf's merge: restore it.
    for index, (_, layer) in enumerate(layers):
        later = [other for _, other in layers[index + 1:]]
        for key in OmegaConf.missing_keys(layer):
            if not any(_has_key(other, key) for other in later):
                OmegaConf.update(cfg, key, "???", merge=False)
    OmegaConf.resolve(cfg)
    return cfg


def with_packaged_defaults(section: str, given: Mapping[str, Any] | DictConfig,
                           default: str = "ssl3d_default_config") -> DictConfig:
    """``given`` merged over the packaged YAML's ``section``: every key it documents is present.

    For functions that take a config section from callers that may pass only part of it (tests,
    scripts): they then read every key with ``[...]``, and the default lives in the YAML only.

    Args:
        section: top-level section name (``"ibot"``, ``"compute_precision"``, ...).
        given: the caller's section (a dict or DictConfig).
        default: packaged config holding the documented defaults.
    """
    packaged = load_yaml(packaged_config_path(default))[section]
    return OmegaConf.merge(packaged, OmegaConf.create(dict(given) if not isinstance(given, DictConfig) else given))


def save_config(cfg: DictConfig, output_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config to ``output_dir/name`` and return the path."""
    path = Path(output_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)
    return path


def config_to_dict(cfg: DictConfig) -> dict:
    """Plain-container copy of a config, for embedding in checkpoints (no OmegaConf pickles)."""
    return OmegaConf.to_container(cfg, resolve=True)
