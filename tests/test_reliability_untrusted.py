"""Untrusted files: pickles that would run code are refused, remote code never runs unless asked for,
and manifest paths stay inside the dataset root unless absolute paths are allowed.

Every malicious file here would create a marker file if its code ran; each test asserts it does not exist.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import os
import pickle
import tarfile
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mmlm.data import DataError, read_records
from mmlm.safety import UnsafeFileError, load_state_dict, load_torch_file
from mmlm.training.trainer import reset_accelerate_state

PACKAGE = Path(__file__).resolve().parents[1] / "mmlm"


class WritesMarker:
    """Unpickling this runs ``open(marker, "w")``: what a malicious checkpoint does with os.system."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_torch_file(path: Path, marker: Path) -> Path:
    torch.save({"weight": torch.zeros(2), "payload": WritesMarker(marker)}, path)
    return path


def malicious_plain_pickle(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"weight": WritesMarker(marker)}))
    return path


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("make", [malicious_torch_file, malicious_plain_pickle], ids=["torch.save", "pickle"])
@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pth", ".ckpt"])
def test_malicious_pickles_are_refused_without_running(tmp_path, make, suffix):
    marker = tmp_path / "code_ran"
    path = make(tmp_path / f"weights{suffix}", marker)
    with pytest.raises(UnsafeFileError, match=rf"weights\{suffix}: refused to load.*could execute code") as info:
        load_state_dict(path)
    assert "GLOBAL" in str(info.value) or "Unsupported" in str(info.value)  # says what was blocked
    assert not marker.exists()
    assert isinstance(info.value, ValueError)


def test_safe_files_load(tmp_path):
    from safetensors.torch import save_file

    weights = {"a": torch.arange(4.0), "b": torch.ones(2, 2)}
    torch.save(weights, tmp_path / "plain.pt")
    torch.save({"state_dict": weights, "epoch": 3}, tmp_path / "wrapped.pth")
    save_file(weights, str(tmp_path / "w.safetensors"))
    for name in ("plain.pt", "wrapped.pth", "w.safetensors"):
        loaded = load_state_dict(tmp_path / name)
        assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert load_torch_file(tmp_path / "wrapped.pth")["epoch"] == 3


def test_garbage_and_unknown_files_get_clear_errors(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    (tmp_path / "junk.pt").write_bytes(b"hello, not a checkpoint")
    (tmp_path / "w.pkl").write_bytes(b"")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(UnsafeFileError, match=r"junk\.safetensors: not a valid safetensors file"):
        load_state_dict(tmp_path / "junk.safetensors")
    with pytest.raises(UnsafeFileError, match=r"junk\.pt: not a readable PyTorch weights file"):
        load_state_dict(tmp_path / "junk.pt")
    with pytest.raises(UnsafeFileError, match=r"w\.pkl: unsupported weights file '\.pkl'"):
        load_state_dict(tmp_path / "w.pkl")
    with pytest.raises(UnsafeFileError, match=r"list\.pt: expected a mapping of parameter names to tensors"):
        load_state_dict(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_state_dict(tmp_path / "absent.pt")


def test_timm_vision_weights_path_refuses_a_malicious_pickle(tmp_path):
    from mmlm.models.vision import VisionConfig, VisionEncoder

    marker = tmp_path / "code_ran"
    path = malicious_torch_file(tmp_path / "encoder.pth", marker)
    with pytest.raises(Exception) as info:  # timm's own weights_only loader refuses it
        VisionEncoder(VisionConfig(name="resnet10t", weights_path=str(path), image_size=32))
    assert not marker.exists()
    assert "weights_only" in str(info.value) or "encoder.pth" in str(info.value)


# ----------------------------------------------------------------------------- checkpoints and saved models


def test_resume_from_a_tampered_checkpoint_runs_no_code(tmp_path):
    from test_reliability_faults import PairsTask, pairs_config  # a tiny regression task

    from mmlm.training import CheckpointError, Trainer

    def reset():
        reset_accelerate_state()

    reset()
    config = pairs_config(tmp_path / "run")
    Trainer(config, PairsTask(config)).fit()
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000006"
    marker = tmp_path / "code_ran"
    malicious_plain_pickle(checkpoint / "random_states_0.pkl", marker)  # accelerate: weights_only, then ignored
    malicious_torch_file(checkpoint / "optimizer.bin", marker)
    reset()
    with pytest.raises(CheckpointError, match=r"step_000006: cannot restore the training state .*GLOBAL io.open"):
        Trainer(config, PairsTask(config), resume=True)
    reset()
    assert not marker.exists()


@pytest.fixture(scope="module")
def saved_vlm(tmp_path_factory):
    from mmlm.models import LanguageConfig, ProjectorConfig, VisionConfig, VisionLanguageModel, VLMConfig

    torch.manual_seed(0)
    lm = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128}
    config = VLMConfig(vision=VisionConfig(name="resnet10t", features_only_stage=1, image_size=32),
                       projector=ProjectorConfig(type="mlp"), language=LanguageConfig(config=lm, vocab_size=300))
    model = VisionLanguageModel.from_config(config, corpus=["a red circle", "a blue square"])
    folder = tmp_path_factory.mktemp("vlm")
    model.save_pretrained(folder)
    return folder


def copy_folder(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_saved_model_holds_no_pickles_and_a_pickle_in_its_place_is_refused(saved_vlm, tmp_path):
    from mmlm.models import VisionLanguageModel

    assert not [p for p in saved_vlm.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    folder = copy_folder(saved_vlm, tmp_path / "tampered")
    marker = tmp_path / "code_ran"
    malicious_torch_file(folder / "model.safetensors", marker)
    with pytest.raises(Exception) as info:
        VisionLanguageModel.from_pretrained(folder)
    assert not marker.exists()
    assert "safetensors" in str(info.value).lower() or "header" in str(info.value).lower()


REMOTE_CODE = 'import pathlib\npathlib.Path({marker!r}).write_text("ran")\n'


@pytest.mark.parametrize("model_type", ["llama", "evil_lm"], ids=["known-type", "custom-type"])
def test_remote_code_in_a_saved_model_does_not_run(saved_vlm, tmp_path, model_type):
    """A folder whose LM config points at custom code (``auto_map``): with the defaults that code never runs.

    A known model_type loads with the built-in class; an unknown one is refused, asking for trust_remote_code.
    """
    from mmlm.models import VisionLanguageModel

    folder = copy_folder(saved_vlm, tmp_path / "remote")
    marker = tmp_path / "code_ran"
    (folder / "language" / "evil.py").write_text(REMOTE_CODE.format(marker=str(marker)), encoding="utf-8")
    config_file = folder / "language" / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig",
                                                   "AutoModelForCausalLM": "evil.EvilModel"})
    config_file.write_text(json.dumps(config), encoding="utf-8")
    if model_type == "llama":
        assert isinstance(VisionLanguageModel.from_pretrained(folder), VisionLanguageModel)
    else:
        with pytest.raises(ValueError, match="trust_remote_code"):
            VisionLanguageModel.from_pretrained(folder)
    assert not marker.exists()


def test_trust_remote_code_defaults_to_false_everywhere():
    """Every config field named trust_remote_code defaults to False, and no call in mmlm turns it on."""
    import mmlm.models as models

    exported = [getattr(models, name) for name in models.__all__]  # mmlm.models loads its names lazily
    fields = [(cls.__name__, f) for cls in exported if dataclasses.is_dataclass(cls)
              for f in dataclasses.fields(cls) if f.name == "trust_remote_code"]
    assert fields, "expected LanguageConfig.trust_remote_code"
    assert all(f.default is False for _, f in fields), fields
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                assert not (isinstance(node.value, ast.Constant) and node.value.value is True), \
                    f"{path}:{node.value.lineno}: trust_remote_code=True"


def test_no_unsafe_deserialisation_in_the_package():
    """torch.load only with weights_only=True (or in mmlm.safety); no pickle.load(s) at all."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            name = ast.unparse(node.func)
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "joblib.load"):
                found.append(f"{path.name}:{node.lineno}: {name}")
            if name == "torch.load":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    found.append(f"{path.name}:{node.lineno}: torch.load without weights_only=True")
    assert not found, found


# ----------------------------------------------------------------------------- manifest paths stay inside the root


PATH_PARTS = st.lists(st.sampled_from(["..", ".", "a", "b", "", "x.png", "~", "\u2215", "%2e%2e"]),
                      min_size=1, max_size=6)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(PATH_PARTS, st.booleans(), st.booleans())
@example(["..", "..", "outside.txt"], False, False)
@example(["a", "..", "..", "x.png"], False, False)
@example(["", "etc", "passwd"], False, False)
def test_manifest_paths_cannot_escape_the_root(parts, absolute, allow):
    value = ("/" if absolute else "") + "/".join(parts)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp).resolve() / "data"
        root.mkdir()
        manifest = root / "manifest.jsonl"
        manifest.write_text(json.dumps({"image": value, "caption": "c"}) + "\n", encoding="utf-8")
        resolved = (Path(value) if Path(value).is_absolute() else root / value).resolve()
        try:
            records = read_records(manifest, check_files=False, allow_absolute_paths=allow)
        except DataError as err:
            assert "manifest.jsonl:1" in str(err)
            # refused only for a reason: an empty path, or (without permission) absolute / outside the root
            assert not value.strip() or (not allow and (Path(value).is_absolute()
                                                          or not resolved.is_relative_to(root))), err
            return
        image = Path(records[0].image).resolve()
        assert image == resolved
        assert allow or image.is_relative_to(root)


def test_dotdot_and_symlink_escapes_are_refused_unless_allowed(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (tmp_path / "outside.txt").write_text("secret", encoding="utf-8")
    os.symlink(tmp_path / "outside.txt", root / "link.png")
    for value in ("../outside.txt", "link.png", str(tmp_path / "outside.txt")):
        manifest = root / "m.jsonl"
        manifest.write_text(json.dumps({"image": value, "caption": "c"}) + "\n", encoding="utf-8")
        with pytest.raises(DataError, match=r"m\.jsonl:1: .*(escapes|absolute).*allow_absolute_paths"):
            read_records(manifest)
        assert len(read_records(manifest, allow_absolute_paths=True)) == 1


def test_build_datasets_honours_allow_absolute_paths(tmp_path):
    from mmlm.config import DataConfig
    from mmlm.data import build_datasets

    (tmp_path / "data").mkdir()
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")
    manifest = tmp_path / "data" / "m.jsonl"
    manifest.write_text("".join(json.dumps({"image": "../outside.png", "caption": f"c{i}"}) + "\n"
                                for i in range(4)), encoding="utf-8")
    with pytest.raises(DataError, match="escapes"):
        build_datasets(DataConfig(source=str(manifest)), None, None)
    built = build_datasets(DataConfig(source=str(manifest), allow_absolute_paths=True, val_fraction=0.25), None, None)
    assert len(built["train"]) + len(built["val"]) == 4


def test_shard_member_names_cannot_write_outside(tmp_path):
    """Shards are streamed into memory, never extracted: a '../' member name touches no file."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in (("../../escape.txt", b"caption"), ("../../escape.png", b"x"), ("/abs.png", b"y")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shard = tmp_path / "deep" / "er" / "shard.tar"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(buffer.getvalue())
    records = read_records(shard)
    assert [r.captions for r in records] == [["caption"], []] and [r.image for r in records] == [b"x", b"y"]
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "escape.png").exists()
    assert not Path("/abs.png").exists()
