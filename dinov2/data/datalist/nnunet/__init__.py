"""nnU-Net raw datasets in: read and check one, write our finetuning datalist and a dataset preset.

==================  ==========================================================================
:mod:`.meta`        ``dataset.json``: channels, labels (classes, regions, ignore), file ending
:mod:`.cases`       case files found by name, paired, grids and label values checked
:mod:`.dataset`     the whole dataset checked at once; splits (``splits_final.json`` or seeded)
:mod:`.preset`      the dataset preset: modalities, labels, normalisation, spacing, image size
:mod:`.command`     the command: everything checked, then the datalist and the preset written
==================  ==========================================================================

The command is ``python -m dinov2.data.datalist nnunet DATASET_DIR`` (:mod:`..cli`).
"""

from .cases import group_channel_files, split_channel_name
from .command import import_nnunet
from .dataset import SPLITS_FILE, NnunetDataset, nnunet_datalist, read_nnunet_dataset, split_training
from .meta import IGNORE_NAME, NnunetLabels, parse_labels
from .preset import build_preset, intensity_from_channels, preset_yaml, write_preset

__all__ = [
    "IGNORE_NAME", "SPLITS_FILE", "NnunetDataset", "NnunetLabels", "build_preset", "group_channel_files",
    "import_nnunet", "intensity_from_channels", "nnunet_datalist", "parse_labels", "preset_yaml",
    "read_nnunet_dataset", "split_channel_name",
    "split_training", "write_preset",
]
