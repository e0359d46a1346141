"""mmlm models in the Hugging Face ecosystem.

Importing this package registers the VLM with transformers' Auto classes, so a folder saved by mmlm loads as

>>> import mmlm.hf  # noqa: F401
>>> from transformers import AutoModelForImageTextToText, AutoProcessor
>>> model = AutoModelForImageTextToText.from_pretrained("runs/cap/model")
>>> processor = AutoProcessor.from_pretrained("runs/cap/model")
>>> inputs = processor(images=[image])                  # text=None: the model's own prompt
>>> out = model.generate(**inputs, max_new_tokens=20)
>>> processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)   # = vlm.caption

``import mmlm`` alone does not register them: it stays light (no torch / transformers import) for the CLI.
Export to a class transformers ships, for use without mmlm: :func:`mmlm.hf.llava.export_llava`.
"""

from __future__ import annotations

from mmlm.hf.modeling import ARCHITECTURE, MODEL_TYPE, MmlmVLMConfig, MmlmVLMForConditionalGeneration
from mmlm.hf.processing import MmlmImageProcessor, MmlmProcessor

__all__ = ["ARCHITECTURE", "MODEL_TYPE", "MmlmImageProcessor", "MmlmProcessor", "MmlmVLMConfig",
           "MmlmVLMForConditionalGeneration", "register"]

_registered = False


def register() -> None:
    """Register mmlm's config, model and processor with AutoConfig / AutoModel* / AutoProcessor (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import (
        AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor,
    )

    AutoConfig.register(MODEL_TYPE, MmlmVLMConfig, exist_ok=True)
    for auto in (AutoModelForImageTextToText, AutoModel):
        auto.register(MmlmVLMConfig, MmlmVLMForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(MmlmVLMConfig, MmlmProcessor, exist_ok=True)
    _registered = True


register()
