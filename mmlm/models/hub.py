"""What a saved VLM folder carries for transformers and the Hub, beside mmlm's own keys.

``config.json`` gets ``model_type`` / ``architectures`` (so ``AutoConfig`` / ``AutoModelForImageTextToText``
resolve it once :mod:`mmlm.hf` is imported) and the image side a processor needs without building the tower
(``num_image_tokens``, timm's resolved ``data_config``). All keys are additive: mmlm's loader ignores them.
"""

from __future__ import annotations

from typing import Any

MODEL_TYPE = "mmlm_vlm"
ARCHITECTURE = "MmlmVLMForConditionalGeneration"


def transformers_keys(vlm) -> dict[str, Any]:
    """The additive ``config.json`` keys of ``vlm`` (a VisionLanguageModel)."""
    data_config = {k: list(v) if isinstance(v, tuple) else v for k, v in vlm.vision.data_config.items()}
    return {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], "num_image_tokens": vlm.num_image_tokens,
            "data_config": data_config}
