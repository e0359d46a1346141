"""Chat rendering (mmlm.models.chat) on Hub-shaped tokenizers, vlm.chat / vlm.answer, and the chat / ask CLI."""

import io
import json
import sys

import pytest
import torch
from PIL import Image

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from hub_fixtures import load_tokenizer, with_chat_template  # noqa: E402

from mmlm.models import chat  # noqa: E402
from mmlm.models.language import IMAGE_TOKEN, add_vlm_special_tokens  # noqa: E402
from mmlm.models.sequence import IGNORE_INDEX, encode_segments  # noqa: E402

# (fixture tokenizer, template): Qwen2 with its own ChatML, Llama-3's template on a SentencePiece Llama tokenizer,
# SmolLM2's on a GPT-2 byte-level BPE.
SHAPES = {"qwen2_chatml": ("qwen2", None), "llama3": ("llama_sp", "llama3"), "smollm2": ("gpt2", "smollm2")}
END_OF_TURN = {"qwen2_chatml": "<|im_end|>", "llama3": "<|eot_id|>", "smollm2": "<|im_end|>"}
MESSAGES = [
    {"role": "user", "content": "<image>\nwhat colour is the circle?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "and what is left of the blue square?"},
    {"role": "assistant", "content": "a green star"},
]
NUM_IMAGE_TOKENS = 3


def hub_tokenizer(name):
    kind, template = SHAPES[name]
    tokenizer = load_tokenizer(kind)
    if template:
        with_chat_template(tokenizer, template)
    add_vlm_special_tokens(tokenizer)
    return tokenizer


def expand_images(ids, tokenizer):
    image = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return [t for i in ids for t in ([i] * NUM_IMAGE_TOKENS if i == image else [i])]


def encode(tokenizer, segments):
    return encode_segments(tokenizer, segments, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                           num_image_tokens=NUM_IMAGE_TOKENS)


def chat_ids(tokenizer, messages, **kw):
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_label_mask_is_exactly_the_assistant_turns_and_their_end_of_turn(name):
    tokenizer = hub_tokenizer(name)
    encoded = encode(tokenizer, chat.conversation_segments(tokenizer, MESSAGES))
    # The whole sequence is apply_chat_template's tokens (images expanded), cut after the last assistant turn.
    reference = expand_images(chat_ids(tokenizer, MESSAGES), tokenizer)
    assert encoded.input_ids == reference[:len(encoded.input_ids)]
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN[name])
    runs, starts = [], []  # the trained tokens, as runs of consecutive positions
    for t, (token, label) in enumerate(zip(encoded.input_ids, encoded.labels)):
        if label == IGNORE_INDEX:
            continue
        assert label == token
        if starts and t == starts[-1] + len(runs[-1]):
            runs[-1].append(token)
        else:
            runs.append([token])
            starts.append(t)
    assert [tokenizer.decode(r) for r in runs] == [f"red{END_OF_TURN[name]}", f"a green star{END_OF_TURN[name]}"]
    assert all(r[-1] == eot for r in runs)
    assert starts[-1] + len(runs[-1]) == len(encoded.input_ids)  # nothing after the last turn
    # Before each assistant turn, the trained model saw exactly the generation prompt's tokens.
    for k, start in zip((1, 3), starts):
        prompt = expand_images(chat_ids(tokenizer, MESSAGES[:k], add_generation_prompt=True), tokenizer)
        assert encoded.input_ids[:len(prompt)] == prompt
        assert start == len(prompt)
    assert chat.stop_token_ids(tokenizer) == [eot]


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_generation_prompt_equals_apply_chat_template(name):
    tokenizer = hub_tokenizer(name)
    question = [{"role": "user", "content": "<image>\nhow many circles are there?"}]
    (segment,) = chat.prompt_segments(tokenizer, question)
    assert segment.text == tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    assert encode(tokenizer, [segment]).input_ids == expand_images(
        chat_ids(tokenizer, question, add_generation_prompt=True), tokenizer)


def test_default_template_for_trained_tokenizers_and_the_none_layout():
    tokenizer = load_tokenizer("gpt2")  # no chat template of its own
    add_vlm_special_tokens(tokenizer)
    assert chat.resolve_template(tokenizer, "auto") == chat.DEFAULT_CHAT_TEMPLATE
    segments = chat.conversation_segments(tokenizer, MESSAGES)
    # the space after "assistant:" is the answer's (" red" is one token; a tokenizer without " yes" learns " ")
    assert [s.text for s in segments if s.train] == [" red<|endoftext|>", " a green star<|endoftext|>"]
    assert chat.prompt_segments(tokenizer, MESSAGES[:1])[0].text.endswith("\nassistant:")
    plain = chat.conversation_segments(tokenizer, MESSAGES[:2], "none")
    assert [(s.text, s.train) for s in plain] == [("<image>\nwhat colour is the circle?", False),
                                                 (" red<|endoftext|>", True)]
    custom = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
              "{% if add_generation_prompt %}[assistant]{% endif %}")
    assert chat.conversation_segments(tokenizer, MESSAGES[:2], custom)[-1].text == " red<|endoftext|>"
    assert chat.prompt_segments(tokenizer, MESSAGES[:1], custom)[0].text.endswith("<|endoftext|>[assistant]")
    with pytest.raises(ValueError, match="model.chat_template"):
        chat.resolve_template(tokenizer, "chatml")


def test_bad_conversations_are_clear_errors():
    tokenizer = hub_tokenizer("qwen2_chatml")
    with pytest.raises(ValueError, match="no assistant turn"):
        chat.conversation_segments(tokenizer, MESSAGES[:1])
    with pytest.raises(ValueError, match=r"messages\[1\]: role 'bot'"):
        chat.conversation_segments(tokenizer, [MESSAGES[0], {"role": "bot", "content": "red"}])
    with pytest.raises(ValueError, match="cannot start with an assistant"):
        chat.conversation_segments(tokenizer, MESSAGES[1:])
    with pytest.raises(ValueError, match="2 '<image>' markers for 1 image"):
        chat.with_image_markers([{"role": "user", "content": "<image><image> hi"}], 1)
    last_turn_only = "{{ messages[-1]['role'] + ': ' + messages[-1]['content'] }}"
    with pytest.raises(ValueError, match="not a prefix"):
        chat.conversation_segments(tokenizer, MESSAGES, last_turn_only)
    assert chat.with_image_markers([{"role": "user", "content": "hi"}], 1)[0]["content"] == "<image>\nhi"


# ----------------------------------------------------------------------------------------- through the VLM


def tiny_vlm(kind="qwen2", **kw):
    from hub_fixtures import language_config

    from mmlm.models import ProjectorConfig, VisionConfig, VisionLanguageModel, VLMConfig

    torch.manual_seed(0)
    return VisionLanguageModel.from_config(VLMConfig(
        vision=VisionConfig(name="resnet10t", features_only_stage=1, image_size=32, pos_embed_2d=True),
        projector=ProjectorConfig(type="mlp"), language=language_config(kind), max_length=64, **kw))


IMAGES = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
QUESTION = "what colour is it?"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Qwen2-backed VLM that learned to answer QUESTION for two images, in ChatML."""
    model = tiny_vlm()
    transform = model.image_transform()
    pixels = torch.stack([transform(im) for im in IMAGES])
    conversations = [[{"role": "user", "content": QUESTION}, {"role": "assistant", "content": answer}]
                     for answer in ("red", "blue")]
    batch = chat.prepare_conversations(model, pixels, conversations)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    folder = tmp_path_factory.mktemp("vqa_model")
    model.save_pretrained(folder)
    image_files = []
    for i, im in enumerate(IMAGES):
        image_files.append(folder / f"image{i}.png")
        im.save(image_files[-1])
    return model, folder, image_files


def test_chat_answers_in_chatml_and_stops_at_im_end(trained):
    model, _, _ = trained
    for image, answer in zip(IMAGES, ("red", "blue")):
        assert model.chat(image, [{"role": "user", "content": QUESTION}], max_new_tokens=6) == answer
    assert model.answer(IMAGES, QUESTION, max_new_tokens=6) == ["red", "blue"]
    # the end of turn, not EOS, ends the reply: generation without the stop id runs on past <|im_end|>
    from mmlm.models import generation

    row = chat.encode_prompt(model, [{"role": "user", "content": QUESTION}], 1)
    config = generation.resolve_config(model, max_new_tokens=6, do_sample=False)
    (free,) = generation.generate_rows(model, [row], model.pixel_values(IMAGES[:1]), config)
    im_end = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end != model.eos_token_id and im_end in free
    assert model.tokenizer.decode(free[:free.index(im_end)]) == "red"


def test_streamed_pieces_join_to_the_reply(trained):
    model, _, _ = trained
    messages = [{"role": "user", "content": QUESTION}]
    pieces = list(model.chat(IMAGES[1], messages, stream=True, max_new_tokens=6))
    assert "".join(pieces) == model.chat(IMAGES[1], messages, max_new_tokens=6) == "blue"
    beam_pieces = list(model.chat(IMAGES[0], messages, stream=True, max_new_tokens=6, repetition_penalty=1.2))
    assert "".join(beam_pieces) == model.chat(IMAGES[0], messages, max_new_tokens=6, repetition_penalty=1.2)


def test_cli_chat_reads_stdin_and_streams_replies(trained, monkeypatch, capsys):
    from mmlm import cli

    _, folder, files = trained
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\n\n{QUESTION}\n"))
    assert cli.main(["chat", str(folder), str(files[0]), "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.splitlines() == ["red", "red"]


def test_cli_ask_writes_one_json_line_per_image_and_question(trained, capsys):
    from mmlm import cli

    _, folder, files = trained
    assert cli.main(["ask", str(folder), *map(str, files), "--question", QUESTION, "--max-new-tokens", "6"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["image"], r["question"], r["answer"]) for r in rows] == [
        (str(files[0]), QUESTION, "red"), (str(files[1]), QUESTION, "blue")]


def test_the_none_layout_is_the_captioning_layout():
    """chat_template: none renders a one-turn conversation exactly as captioning's prompt + caption."""
    from mmlm.models import LanguageConfig, ProjectorConfig, VisionConfig, VisionLanguageModel, VLMConfig

    model = VisionLanguageModel.from_config(VLMConfig(
        vision=VisionConfig(name="resnet10t", features_only_stage=1, image_size=32),
        projector=ProjectorConfig(type="mlp"), chat_template="none",
        language=LanguageConfig(config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2},
                                vocab_size=300)), corpus=["describe: a red circle", "a blue square"])
    messages = [{"role": "user", "content": "<image>\ndescribe:"}, {"role": "assistant", "content": "a red circle"}]
    ours = chat.encode_conversation(model, messages, 1)
    theirs = model.encode_sample("<image>\ndescribe:", "a red circle")
    assert (ours.input_ids, ours.labels) == (theirs.input_ids, theirs.labels)
    assert chat.encode_prompt(model, messages[:1], 1) == model.prompt_ids("<image>\ndescribe:")


SAMPLING_FLAGS = ["--do-sample", "--temperature", "1.5", "--top-k", "5", "--top-p", "0.9",
                  "--repetition-penalty", "1.3", "--stop", "zz"]
SAMPLING_OPTIONS = dict(do_sample=True, temperature=1.5, top_k=5, top_p=0.9, repetition_penalty=1.3,
                        stop_strings=["zz"], max_new_tokens=6)


def test_cli_ask_and_chat_generation_flags_reach_the_model(trained, monkeypatch, capsys):
    """Each generation flag of ask/chat gives what the API gives with the same options and seed (the model is
    loaded after seeding on both sides: building it draws from the RNG)."""
    import torch
    from mmlm import api, cli

    _, folder, files = trained
    torch.manual_seed(0)
    assert cli.main(["ask", str(folder), str(files[0]), "--question", QUESTION, "--max-new-tokens", "6",
                     *SAMPLING_FLAGS]) == 0
    asked = json.loads(capsys.readouterr().out.splitlines()[0])["answer"]
    torch.manual_seed(0)
    assert asked == api.load_vlm(folder).answer([str(files[0])], [QUESTION], **SAMPLING_OPTIONS)[0]

    system = "Answer with one word."
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\n"))
    torch.manual_seed(1)
    assert cli.main(["chat", str(folder), str(files[0]), "--system", system, "--max-new-tokens", "6",
                     *SAMPLING_FLAGS]) == 0
    chatted = capsys.readouterr().out.splitlines()[0]
    torch.manual_seed(1)
    model = api.load_vlm(folder)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}]
    expected = "".join(model.chat([str(files[0])], messages, stream=True, **SAMPLING_OPTIONS))
    assert chatted == expected
