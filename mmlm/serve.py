"""``mmlm serve``: a local Gradio app over saved models (extra ``[app]``: ``pip install "mmlm[app]"``).

A vision-language model gets caption / ask / classify tabs, a text-to-image model a prompt box with a seed;
each tab calls the model method the matching CLI command calls (``caption``, ``answer``, ``classify``,
``generate``), with the CLI's defaults. Every tab is also an API endpoint (``/caption_<i>``, ``/ask_<i>``,
``/classify_<i>``, ``/generate_<i>``, ``i`` = the model's position on the command line) for ``gradio_client``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _gradio():
    try:
        import gradio as gr
    except ImportError as err:
        raise ImportError("mmlm serve needs Gradio: pip install \"mmlm[app]\"") from err
    return gr


def _vlm_tabs(gr, model, index: int, name: str) -> None:
    def caption(image, prompt: str, max_new_tokens: int) -> str:
        return model.caption([image], prompt=prompt or None, max_new_tokens=int(max_new_tokens))[0]

    def ask(image, question: str, max_new_tokens: int) -> str:
        if not question.strip():
            raise gr.Error("ask: type a question")
        return model.answer([image], [question], max_new_tokens=int(max_new_tokens))[0]

    def classify(image, labels: str, template: str) -> dict[str, float]:
        names = [label.strip() for label in labels.split(",") if label.strip()]
        if not names:
            raise gr.Error("classify: give comma-separated labels, e.g. circle,square")
        probs = model.classify([image], names, prompt=[template or "a photo of a {}"])[0].tolist()
        return dict(zip(names, probs))

    with gr.Tab(f"caption · {name}"):
        image, prompt = gr.Image(type="pil", label="image"), gr.Textbox(label="prompt (optional)")
        tokens, out = gr.Slider(1, 128, value=32, step=1, label="max new tokens"), gr.Textbox(label="caption")
        gr.Button("caption").click(caption, [image, prompt, tokens], out, api_name=f"caption_{index}")
    with gr.Tab(f"ask · {name}"):
        image, question = gr.Image(type="pil", label="image"), gr.Textbox(label="question")
        tokens, out = gr.Slider(1, 128, value=32, step=1, label="max new tokens"), gr.Textbox(label="answer")
        gr.Button("ask").click(ask, [image, question, tokens], out, api_name=f"ask_{index}")
    with gr.Tab(f"classify · {name}"):
        image = gr.Image(type="pil", label="image")
        labels = gr.Textbox(label="labels (comma-separated)", value="circle,square,triangle,star")
        template, out = gr.Textbox(label="template", value="a photo of a {}"), gr.Label(label="probabilities")
        gr.Button("classify").click(classify, [image, labels, template], out, api_name=f"classify_{index}")


def _generator_tab(gr, model, index: int, name: str) -> None:
    def generate(prompt: str, seed: int, steps: int, guidance_scale: float):
        if not prompt.strip():
            raise gr.Error("generate: type a prompt")
        return model.generate([prompt], num_inference_steps=int(steps), guidance_scale=float(guidance_scale),
                              seed=int(seed))[0]

    with gr.Tab(f"generate · {name}"):
        prompt = gr.Textbox(label="prompt", value="a red circle")
        seed = gr.Number(value=0, precision=0, label="seed")
        steps = gr.Slider(1, 100, value=20, step=1, label="steps")
        scale = gr.Slider(0.0, 10.0, value=2.0, step=0.5, label="guidance scale")
        out = gr.Image(type="pil", label="image", format="png")  # lossless: the exact pixels
        gr.Button("generate").click(generate, [prompt, seed, steps, scale], out, api_name=f"generate_{index}")


def build_app(models: list[str | Path] | list[Any]):
    """A ``gradio.Blocks`` app with the tabs of every model (folders are loaded with ``mmlm.api.load``)."""
    gr = _gradio()
    from mmlm.api import load

    loaded = [(Path(m).name, load(m)) if isinstance(m, (str, Path)) else (type(m).__name__, m) for m in models]
    if not loaded:
        raise ValueError("mmlm serve: give at least one saved model folder")
    with gr.Blocks(title="mmlm") as app:
        gr.Markdown("# mmlm\n" + "\n".join(f"- `{name}`: {type(model).__name__}" for name, model in loaded))
        for index, (name, model) in enumerate(loaded):
            if hasattr(model, "caption"):
                _vlm_tabs(gr, model, index, name)
            else:
                _generator_tab(gr, model, index, name)
    return app


def serve(models: list[str | Path], host: str = "127.0.0.1", port: int = 7860, share: bool = False,
          block: bool = True):
    """Start the app on ``host:port`` (local only unless ``share``); returns it when ``block`` is False."""
    app = build_app(models)
    app.queue().launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block)
    return app
