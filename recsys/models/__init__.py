"""CTR models; each takes its embedding module (KJT in, KeyedTensor out) as an argument."""

from recsys.models.base import ModelConfig
from recsys.models.dcnv2 import DCNv2, DCNv2Config
from recsys.models.deepfm import DeepFM, DeepFMConfig
from recsys.models.dlrm import DLRMConfig

__all__ = ["DCNv2", "DCNv2Config", "DLRMConfig", "DeepFM", "DeepFMConfig", "ModelConfig"]
