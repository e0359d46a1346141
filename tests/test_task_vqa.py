"""The VQA task (mmlm.tasks.vqa): recipe, loss on the assistant turns only, per-family evaluation, conversation
files; and the decompression-bomb message quoting the configured limit."""

import json
import struct
import zlib

import pytest
import torch
from PIL import Image

from mmlm.config import load_config
from mmlm.models import chat
from mmlm.models.sequence import IGNORE_INDEX
from mmlm.tasks import TASKS
from mmlm.tasks.vqa import VQATask, collate_vqa

TINY = ["data.shapes.n_train=16", "data.shapes.n_val=4", "data.shapes.n_test=12", "data.shapes.n_compositional=12",
        "data.shapes.image_size=32", "data.eval_batch_size=8", "model.vision.image_size=32",
        "model.vision.features_only_stage=1", "model.language.config.num_hidden_layers=1"]


def tiny_task(*overrides) -> VQATask:
    return TASKS["vqa"](load_config("configs/shapes_vqa.yaml", TINY + list(overrides)))


def test_recipe_is_the_vqa_task_at_batch_32():
    config = load_config("configs/shapes_vqa.yaml")
    assert config.task == "vqa" and config.data.batch_size == 32 and config.train.max_steps == 3000
    assert config.model.chat_template == "auto"
    assert set(VQATask(config).splits()) == {"train", "val", "test", "compositional"}


def test_loss_covers_the_answer_tokens_only():
    torch.manual_seed(0)
    task = tiny_task()
    model = task.build_model()
    train = task.build_datasets(model)["train"]
    batch = collate_vqa([train[i] for i in range(6)])
    inputs = chat.prepare_conversations(model, batch["pixel_values"], batch["messages"])
    for labels, answer in zip(inputs["labels"].tolist(), batch["answer"]):
        trained = [t for t in labels if t != IGNORE_INDEX]
        assert model.tokenizer.decode(trained) == " " + answer + model.tokenizer.eos_token
    loss = task.training_loss(model, batch)
    assert torch.isfinite(loss) and loss.item() > 0


def test_evaluation_scores_every_family_and_the_metric_is_not_vacuous(tmp_path, monkeypatch):
    torch.manual_seed(0)
    task = tiny_task()
    model = task.build_model().eval()
    test = task.build_datasets(model)["test"]
    with torch.no_grad():
        metrics = task.evaluate(model, test, tmp_path, "test")
    assert metrics["num_samples"] == len(test) == 12
    assert 0.0 <= metrics["accuracy"] <= 1.0
    families = {test[i]["family"] for i in range(len(test))}
    assert {f"accuracy_{f}" for f in families} | {"accuracy_en"} <= set(metrics)
    rows = [json.loads(line) for line in (tmp_path / "test_answers.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and (tmp_path / "test_answers.png").is_file()
    # an oracle answering every question right scores 1.0 in every family; one answering "no" scores less
    truth = iter([test[i]["answer"] for i in range(len(test))])  # evaluation goes through the split in order
    monkeypatch.setattr(type(model), "answer_pixels", lambda self, pixels, qs, **kw: [next(truth) for _ in qs])
    perfect = task.evaluate(model, test, tmp_path, "test")
    assert perfect["accuracy"] == 1.0 and all(perfect[f"accuracy_{f}"] == 1.0 for f in families)
    monkeypatch.setattr(type(model), "answer_pixels", lambda self, pixels, questions, **kw: ["no"] * len(questions))
    assert task.evaluate(model, test, tmp_path, "test")["accuracy"] < 1.0


def test_conversation_files_train_and_evaluate(tmp_path):
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{i}.png")
    rows = [{"image": f"{i}.png", "conversations": [{"from": "human", "value": "<image>\nwhat colour?"},
                                                     {"from": "gpt", "value": colour}]}
            for i, colour in enumerate(("red", "blue"))]
    rows.append({"images": ["0.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]},
        {"role": "assistant", "content": "red"}, {"role": "user", "content": "sure?"},
        {"role": "assistant", "content": "yes"}]})
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    torch.manual_seed(0)
    task = tiny_task(f"data.source={data}", f"data.test_source={data}")
    model = task.build_model()
    splits = task.build_datasets(model)
    batch = collate_vqa([splits["train"][i] for i in range(3)])
    assert torch.isfinite(task.training_loss(model, batch))
    metrics = task.evaluate(model.eval(), splits["test"], tmp_path / "eval", "test")
    assert metrics["num_samples"] == 3 and "accuracy_conversation" in metrics


def bomb_png(side: int = 20_000) -> bytes:
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def test_decompression_bomb_refusal_quotes_the_configured_limit(tmp_path):
    from mmlm.images import BadImageError, load_image

    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png())  # 400M pixels: over PIL's own refusal limit (2 x 89,478,485)
    with pytest.raises(BadImageError) as err:
        load_image(path, max_pixels=64_000_000)
    assert "max_pixels=64,000,000" in str(err.value) and "data.max_image_pixels" in str(err.value)
    assert "178956970" not in str(err.value) and "400,000,000 pixels" in str(err.value)
