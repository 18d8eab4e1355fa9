"""Self-supervised pretraining (DINO + iBOT + KoLeo) of 3D Vision Transformers for medical images."""

import logging as _logging
import warnings as _warnings

__version__ = "0.1.0"

# MONAI announces on every import that NVIDIA's GPU DICOM codec is absent and that it falls back
# to pydicom's decoders; that is the normal case for us, so keep it out of users' logs.
_logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(_logging.ERROR)
_warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader", category=UserWarning)
