"""mmlm serve: the Gradio app on 127.0.0.1, every endpoint called with gradio_client, and a screenshot of the page."""

import shutil
import socket
import subprocess

import pytest
import torch
from PIL import Image

from hf_helpers import images, tiny_vlm

gradio = pytest.importorskip("gradio", reason="the [app] extra (gradio) is not installed")
gradio_client = pytest.importorskip("gradio_client", reason="gradio_client is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_generator():
    from mmlm.models.diffusion import AutoencoderConfig, DenoiserConfig, TextEncoderConfig, TextToImage
    from mmlm.models.diffusion import TextToImageConfig

    torch.manual_seed(0)
    config = TextToImageConfig(
        image_size=16, space="pixel",
        denoiser=DenoiserConfig(block_out_channels=(8, 16), attention=(False, True), norm_num_groups=4,
                                hidden_size=16, num_layers=1),
        text_encoder=TextEncoderConfig(hidden_size=16, num_layers=1, num_heads=1, max_length=8, vocab_size=300),
        vae=AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4, batch_size=8))
    return TextToImage.from_config(config, corpus=["a red circle", "a blue square", "a green triangle"])


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from mmlm.serve import serve

    root = tmp_path_factory.mktemp("serve")
    vlm = tiny_vlm()
    vlm.save_pretrained(root / "captioner")
    generator = tiny_generator()
    generator.save_pretrained(root / "generator")
    port = free_port()
    server = serve([root / "captioner", root / "generator"], host="127.0.0.1", port=port, block=False)
    image = root / "image.png"
    images()[0].save(image)
    yield {"url": f"http://127.0.0.1:{port}/", "vlm": vlm, "generator": generator, "image": image, "root": root}
    server.close()


def test_every_endpoint_answers_as_the_models_do(app):
    client = gradio_client.Client(app["url"], verbose=False)
    picture = gradio_client.handle_file(str(app["image"]))
    vlm, image = app["vlm"], Image.open(app["image"]).convert("RGB")
    assert client.predict(picture, "", 8, api_name="/caption_0") == vlm.caption([image], max_new_tokens=8)[0]
    assert client.predict(picture, "what is it?", 8, api_name="/ask_0") == \
        vlm.answer([image], ["what is it?"], max_new_tokens=8)[0]
    label = client.predict(picture, "circle,square", "a photo of a {}", api_name="/classify_0")
    probs = vlm.classify([image], ["circle", "square"], prompt=["a photo of a {}"])[0].tolist()
    assert label["label"] == ["circle", "square"][int(torch.tensor(probs).argmax())]
    got = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert got == pytest.approx({"circle": probs[0], "square": probs[1]}, abs=1e-6)
    path = client.predict("a red circle", 3, 2, 2.0, api_name="/generate_1")
    from mmlm.api import load

    generator = load(app["root"] / "generator")  # what the app serves: the saved folder
    expected = generator.generate(["a red circle"], num_inference_steps=2, guidance_scale=2.0, seed=3)[0]
    served = Image.open(path).convert("RGB")
    assert served.size == expected.size
    assert list(served.getdata()) == list(expected.convert("RGB").getdata())


def test_a_bad_input_is_an_error_message_not_a_crash(app):
    client = gradio_client.Client(app["url"], verbose=False)
    with pytest.raises(Exception, match="labels"):
        client.predict(gradio_client.handle_file(str(app["image"])), " , ", "a photo of a {}",
                       api_name="/classify_0")


def test_the_page_renders_in_headless_chromium(app, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium) for the page screenshot")
    shot = tmp_path / "page.png"
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,900",
                           "--virtual-time-budget=15000", f"--screenshot={shot}", app["url"]],
                          capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    page = Image.open(shot).convert("RGB")
    assert page.size == (1200, 900)
    assert len(set(page.resize((120, 90)).getdata())) > 20  # rendered content, not a blank page


def test_cli_serve_passes_models_host_and_port(monkeypatch, tmp_path):
    import mmlm.serve
    from mmlm.cli import main

    calls = []
    monkeypatch.setattr(mmlm.serve, "serve", lambda models, **kwargs: calls.append((models, kwargs)))
    assert main(["serve", str(tmp_path / "a"), str(tmp_path / "b"), "--host", "0.0.0.0", "--port", "7861"]) == 0
    assert calls == [([str(tmp_path / "a"), str(tmp_path / "b")], {"host": "0.0.0.0", "port": 7861, "share": False})]


@pytest.mark.parametrize("command", ["export", "serve"])
def test_export_and_serve_have_help_with_an_example(command, capsys):
    from mmlm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "examples:" in out and f"mmlm {command}" in out
