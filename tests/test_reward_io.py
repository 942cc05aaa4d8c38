"""Import/export of release-layout PyTorch reward models, against PEFT + torch as the oracle.

The oracle is a tiny transformers Molmo2 wrapped by PEFT (LoRA on the language model, random non-zero
B), a torch value head `Linear(H, 1024) -> SiLU -> Linear(1024, 1)`, and score = head(h[read position])
/ sqrt(H) with h the final-norm last hidden state. The adapter is saved by PEFT itself (native names)
and, for the release's original names, written by hand with fused `att_proj` / `ff_proj`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import peft
import pytest
import safetensors.numpy
import safetensors.torch
import tokenizers
import torch
from PIL import Image
from transformers.video_utils import VideoMetadata

from mrrm_jax.backbones import checkpoint
from mrrm_jax.core import reward
from mrrm_jax.interop import reward_io
from mrrm_jax.backbones import load_processor
from mrrm_jax.data.formatting import RESP_SEP, format_example
from mrrm_jax.backbones.molmo2.hf_batch import batch_from_processor
from mrrm_jax.core.lora import LoraSpec
from mrrm_jax.backbones.molmo2 import Molmo2
from tests import oracle

TOLERANCE = 1e-4  # max abs score error, float32
RANK, ALPHA = 4, 8
# LoRA on the language model only: the ViT and the adapter have q_proj ... down_proj too. In the native
# case down_proj is adapted in layers 0 and 2 only (as `layers_to_transform` would), so layer 1 must
# come out as zero factors.
NATIVE_TARGETS = (r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up)_proj)"
                  r"|model\.language_model\.layers\.[02]\.mlp\.down_proj")
ALL_LM_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"

MEDIA = {
    "text": {},
    "image": {"images": [Image.fromarray(np.random.RandomState(1).randint(0, 256, (100, 150, 3), dtype=np.uint8))]},
    "video": {"video": np.random.RandomState(4).randint(0, 256, (6, 100, 140, 3), dtype=np.uint8),
              "video_metadata": VideoMetadata(total_num_frames=6, fps=2.0, duration=3.0, height=100, width=140)},
}
RESPONSES = ["A cat on a mat.", "Two dogs, probably.", "I cannot tell from this.", "A red car parked by a tree."]


@dataclasses.dataclass
class Release:
    """A release-layout reward model and its PyTorch oracle."""

    base_dir: pathlib.Path
    adapter_dir: pathlib.Path
    peft_model: peft.PeftModel
    head: torch.nn.Module


def _peft_model(torch_model, target_modules, share_a: bool, seed: int) -> peft.PeftModel:
    """LoRA with random non-zero B. `share_a`: q/k/v share one A, up/gate too (so the fused form exists)."""
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.05, target_modules=target_modules)
    model = peft.get_peft_model(copy.deepcopy(torch_model), config).eval()
    generator = torch.Generator().manual_seed(seed)
    lm = model.base_model.model.model.language_model
    with torch.no_grad():
        for layer in lm.layers:
            for linear in (*[getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")],
                           *[getattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]):
                if isinstance(linear, peft.tuners.lora.LoraLayer):
                    linear.lora_A["default"].weight.normal_(0, 0.1, generator=generator)
                    linear.lora_B["default"].weight.normal_(0, 0.1, generator=generator)
            if share_a:
                for block, source, copies in ((layer.self_attn, "q_proj", ("k_proj", "v_proj")),
                                              (layer.mlp, "gate_proj", ("up_proj",))):
                    for name in copies:
                        getattr(block, name).lora_A["default"].weight.copy_(getattr(block, source).lora_A["default"].weight)
    return model


def _value_head(hidden_size: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    head = torch.nn.Sequential(torch.nn.Linear(hidden_size, 1024), torch.nn.SiLU(), torch.nn.Linear(1024, 1))
    with torch.no_grad():
        head[2].weight.mul_(10)  # scores of order 1, so that 1e-4 is a tight bound
    return head.eval()


def _release_config(hidden_size: int) -> dict:
    return {"value_head_type": "mlp", "value_head_hidden_dim": 1024, "value_head_activation": "silu",
            "value_head_input_dim": hidden_size, "resp_repr_mode": "last"}


def _original_layout_adapter(peft_model, num_layers: int) -> dict[str, torch.Tensor]:
    """The release's names: fused att_proj = [q; k; v] and ff_proj = [up; gate] with their shared A.
    Keys keep PEFT's adapter name (`.default.`), as a raw PeftModel state dict does."""
    native = peft.get_peft_model_state_dict(peft_model)
    tensors = {}
    for i in range(num_layers):
        ours = lambda m, f: native[f"base_model.model.model.language_model.layers.{i}.{m}.lora_{f}.weight"]
        fused = {"self_attn.att_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "self_attn.attn_out": ("self_attn.o_proj",),
                 "mlp.ff_proj": ("mlp.up_proj", "mlp.gate_proj"), "mlp.ff_out": ("mlp.down_proj",)}
        for name, parts in fused.items():
            key = f"base_model.model.model.transformer.blocks.{i}.{name}"
            tensors[f"{key}.lora_A.default.weight"] = ours(parts[0], "A")
            tensors[f"{key}.lora_B.default.weight"] = torch.cat([ours(p, "B") for p in parts])
    return {k: v.contiguous() for k, v in tensors.items()}


@pytest.fixture(scope="module")
def releases(tiny_models, processor_dir, tmp_path_factory) -> dict[str, Release]:
    """"native": PEFT's own save, processor in the adapter dir (with `<|resp_sep|>`), value_head.pt.
    "original": hand-written fused names over the original-layout base, which holds the processor
    (no `<|resp_sep|>` yet), value_head.safetensors."""
    root = tmp_path_factory.mktemp("releases")
    hidden_size = tiny_models.torch_model.config.text_config.hidden_size
    num_layers = tiny_models.torch_model.config.text_config.num_hidden_layers
    processor = load_processor(processor_dir)

    native = Release(tiny_models.native_dir, root / "native_adapter",
                     _peft_model(tiny_models.torch_model, NATIVE_TARGETS, share_a=False, seed=1), _value_head(hidden_size, 2))
    native.peft_model.save_pretrained(native.adapter_dir)
    processor.save_pretrained(native.adapter_dir)
    torch.save(native.head.state_dict(), native.adapter_dir / "value_head.pt")
    (native.adapter_dir / "reward_model_config.json").write_text(json.dumps(_release_config(hidden_size)))

    original = Release(root / "original_base", root / "original_adapter",
                       _peft_model(tiny_models.torch_model, ALL_LM_TARGETS, share_a=True, seed=3), _value_head(hidden_size, 4))
    shutil.copytree(tiny_models.original_dir, original.base_dir)
    shutil.copytree(processor_dir, original.base_dir, dirs_exist_ok=True)
    original.adapter_dir.mkdir()
    peft_config = json.loads((native.adapter_dir / "adapter_config.json").read_text())
    peft_config["target_modules"] = ["att_proj", "attn_out", "ff_proj", "ff_out"]  # as the release's train script
    (original.adapter_dir / "adapter_config.json").write_text(json.dumps(peft_config))
    safetensors.torch.save_file(_original_layout_adapter(original.peft_model, num_layers),
                                original.adapter_dir / "adapter_model.safetensors")
    safetensors.torch.save_file(original.head.state_dict(), original.adapter_dir / "value_head.safetensors")
    (original.adapter_dir / "reward_model_config.json").write_text(json.dumps(_release_config(hidden_size)))
    return {"native": native, "original": original}


@pytest.fixture(scope="module")
def imported(releases, tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("imported")
    return {layout: reward_io.import_peft(r.base_dir, r.adapter_dir, root / layout) for layout, r in releases.items()}


@pytest.fixture(scope="module")
def processor(imported):
    return load_processor(imported["native"] / checkpoint.PROCESSOR_DIR)


@pytest.fixture(scope="module")
def examples(processor):
    return {(media, n): format_example(processor, "Which answer is best?", RESPONSES[:n], **MEDIA[media])
            for media in MEDIA for n in (2, 4)}


def _torch_scores(peft_model, head, example, processor) -> np.ndarray:
    inputs = {k: torch.from_numpy(v) for k, v in oracle.as_transformers(processor, example.processor_outputs).items()}
    with torch.no_grad():
        hidden_td = peft_model(**inputs, output_hidden_states=True).hidden_states[-1][0]
        scores_n = head(hidden_td[torch.from_numpy(example.read_positions).long()])[:, 0]
    return (scores_n / math.sqrt(hidden_td.shape[-1])).numpy()


@dataclasses.dataclass
class Imported:
    """An imported reward-model directory, loaded."""

    backbone: Molmo2
    head: reward.ValueHead
    base: dict
    trainable: dict
    lora_spec: LoraSpec


@pytest.fixture(scope="module")
def loaded(imported) -> dict[str, Imported]:
    out = {}
    for layout, reward_dir in imported.items():
        cfg, base = checkpoint.load_base(reward_dir / checkpoint.BASE_DIR)
        trainable, head_config, lora_spec = checkpoint.load_trainable(reward_dir)
        out[layout] = Imported(Molmo2(cfg), reward.ValueHead(head_config), base, trainable, lora_spec)
    return out


def _padded(array, shape, fill):
    out = np.full(shape, fill, array.dtype)
    out[tuple(slice(0, n) for n in array.shape)] = array
    return out


@pytest.fixture(scope="module")
def batches(examples, loaded):
    """Our batches, padded to one static shape for text and one for media (padding tokens in segment 0,
    zero crops, -1 pooling slots, -1 read positions), so that two compiled programs serve every case."""
    cfg = loaded["native"].backbone.config
    raw = {key: {**batch_from_processor(ex.processor_outputs, cfg.image_patch_id), "read_positions": ex.read_positions[None]}
           for key, ex in examples.items()}
    tokens = max(b["tokens"].shape[1] for b in raw.values())
    crops, pooled, slots = (max(b[k].shape[i] for b in raw.values() if "crops" in b)
                            for k, i in (("crops", 1), ("pooling", 1), ("pooling", 2)))
    batches = {}
    for key, b in raw.items():
        batch = {k: _padded(b[k], (1, tokens), 0) for k in ("tokens", "positions", "segment_ids")}
        batch["read_positions"] = _padded(b["read_positions"], (1, len(RESPONSES)), -1)
        if "crops" in b:
            batch["crops"] = _padded(b["crops"], (1, crops, *b["crops"].shape[2:]), 0)
            batch["pooling"] = _padded(b["pooling"], (1, pooled, slots), -1)
        batches[key] = batch
    return batches


# The backbone, head and LoRA spec of both layouts compare equal, so they share the compiled programs.
_forward_scores = jax.jit(reward.forward_scores, static_argnums=(0, 1, 5))


def _our_scores(model: Imported, batch, num_responses) -> np.ndarray:
    scores = _forward_scores(model.backbone, model.head, model.base, model.trainable, batch, model.lora_spec)
    return np.asarray(scores)[0, :num_responses]


@pytest.fixture(scope="module")
def reference(releases, examples, processor) -> dict[tuple, np.ndarray]:
    """PyTorch scores per (layout, media, N)."""
    return {(layout, *key): _torch_scores(release.peft_model, release.head, example, processor)
            for layout, release in releases.items() for key, example in examples.items()}


@pytest.mark.parametrize("num_responses", [2, 4])
@pytest.mark.parametrize("media", list(MEDIA))
@pytest.mark.parametrize("layout", ["native", "original"])
def test_scores_match_peft_and_torch(layout, media, num_responses, reference, loaded, batches):
    want = reference[layout, media, num_responses]
    got = _our_scores(loaded[layout], batches[media, num_responses], num_responses)
    error = np.abs(got - want).max()
    print(f"{layout} {media} N={num_responses}: scores {np.round(want, 3)}, max abs error {error:.2e}")
    assert error <= TOLERANCE, (got, want)


@pytest.mark.parametrize("layout", ["native", "original"])
def test_the_lora_changes_the_scores_far_beyond_the_tolerance(layout, releases, examples, reference, processor):
    release = releases[layout]
    with release.peft_model.disable_adapter():
        without_lora = _torch_scores(release.peft_model, release.head, examples["image", 4], processor)
    assert np.abs(reference[layout, "image", 4] - without_lora).min() > 100 * TOLERANCE


def test_imported_directory(imported, loaded):
    native = loaded["native"]
    assert (native.lora_spec.rank, native.lora_spec.alpha, native.lora_spec.dropout) == (RANK, ALPHA, 0.05)
    assert native.head.config == reward.HeadConfig(head_type="mlp", hidden_dim=1024, pooling="last")
    down_b = np.asarray(native.trainable["lora"]["language_model/layers/mlp/down_proj/kernel"]["b"])
    assert np.abs(down_b[1]).max() == 0 and (np.abs(down_b[[0, 2]]).max(axis=(1, 2)) > 0).all()  # layer 1 not adapted
    for reward_dir in imported.values():
        # The processor came from the adapter dir (native) or the base dir (original): both saved the separator.
        saved = tokenizers.Tokenizer.from_file(str(reward_dir / checkpoint.PROCESSOR_DIR / "tokenizer.json"))
        assert saved.token_to_id(RESP_SEP) == 151946


def test_export_then_peft_from_pretrained_gives_the_same_scores(tiny_models, imported, examples, reference, processor,
                                                                 tmp_path):
    exported = reward_io.export_peft(imported["native"], tmp_path / "peft")
    model = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_models.torch_model), exported).eval()
    head = _value_head(tiny_models.torch_model.config.text_config.hidden_size, seed=0)
    head.load_state_dict(safetensors.torch.load_file(exported / "value_head.safetensors"))
    assert json.loads((exported / "reward_model_config.json").read_text()) == _release_config(head[0].in_features)
    for media in MEDIA:
        error = np.abs(_torch_scores(model, head, examples[media, 4], processor) - reference["native", media, 4]).max()
        print(f"round trip {media}: max abs error {error:.2e}")
        assert error <= TOLERANCE, error


def test_export_original_layout_reproduces_the_fused_release(releases, imported, tmp_path):
    exported = reward_io.export_peft(imported["original"], tmp_path / "peft", layout="original")
    written = safetensors.numpy.load_file(exported / "adapter_model.safetensors")
    release = safetensors.numpy.load_file(releases["original"].adapter_dir / "adapter_model.safetensors")
    assert sorted(written) == sorted(k.replace(".default.", ".") for k in release)
    for key, value in release.items():
        np.testing.assert_array_equal(written[key.replace(".default.", ".")], value)
    # q/k/v with different A have no fused form: a clear error, not a silently different model.
    with pytest.raises(ValueError, match="different A factors"):
        reward_io.export_peft(imported["native"], tmp_path / "fails", layout="original")


def test_linear_head_as_the_release_names_it(tmp_path):
    """The release's linear head is a bare nn.Linear (`weight`, `bias`, no Sequential index), and its
    config keeps the unused default activation "selu"."""
    torch.manual_seed(5)
    linear = torch.nn.Linear(64, 1)
    torch.save(linear.state_dict(), tmp_path / "value_head.pt")
    config = {"value_head_type": "linear", "value_head_hidden_dim": None, "value_head_activation": "selu",
              "value_head_input_dim": 64, "resp_repr_mode": "last"}
    (tmp_path / "reward_model_config.json").write_text(json.dumps(config))
    head_config, params = reward_io._read_head(tmp_path, hidden_size=64)
    features = np.random.RandomState(0).randn(3, 64).astype(np.float32)
    got = reward.ValueHead(head_config).apply({"params": params}, features)
    with torch.no_grad():
        want = linear(torch.from_numpy(features))[:, 0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


def _edit_json(name, **changes):
    def edit(adapter_dir):
        path = adapter_dir / name
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


def _add_lora_module(module):
    def edit(adapter_dir):
        path = adapter_dir / "adapter_model.safetensors"
        tensors = safetensors.numpy.load_file(path)
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.zeros((RANK, 64), np.float32)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.zeros((64, RANK), np.float32)
        safetensors.numpy.save_file(tensors, path)
    return edit


BAD_ADAPTERS = {
    "unknown module": (_add_lora_module("model.language_model.layers.0.self_attn.qkv_fancy"), "qkv_fancy"),
    "vision tower module": (_add_lora_module("model.vision_tower.layers.0.self_attn.q_proj"), "language model"),
    "layer beyond the base": (_add_lora_module("model.language_model.layers.7.self_attn.o_proj"), "3 layers"),
    "activation not silu": (_edit_json("reward_model_config.json", value_head_activation="gelu"), "value_head_activation"),
    "pooling unknown": (_edit_json("reward_model_config.json", resp_repr_mode="middle"), "resp_repr_mode"),
    "dora": (_edit_json("adapter_config.json", use_dora=True), "use_dora"),
}


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_bad_adapter_is_a_clear_error(case, releases, tmp_path):
    edit, message = BAD_ADAPTERS[case]
    adapter_dir = shutil.copytree(releases["native"].adapter_dir, tmp_path / "adapter")
    edit(adapter_dir)
    with pytest.raises(ValueError, match=message):
        reward_io.import_peft(releases["native"].base_dir, adapter_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_other_architecture_is_a_clear_error(releases, tmp_path):
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ValueError, match=r"qwen: config.json has model_type='qwen2'; supported: \['molmo2', 'qwen3_vl'\]"):
        reward_io.import_peft(tmp_path / "qwen", releases["native"].adapter_dir, tmp_path / "out")


def test_the_import_tool_needs_no_torch(releases, imported, no_torch_env, tmp_path):
    """The release with a value_head.pt, imported where torch is not installed, gives what the import
    in this process (torch present) gave."""
    release = releases["native"]
    result = subprocess.run(
        [sys.executable, "-S", "tools/import_reward_model.py", f"--base={release.base_dir}",
         f"--adapter={release.adapter_dir}", f"--out={tmp_path / 'out'}"],
        cwd=pathlib.Path(__file__).resolve().parents[1], env=no_torch_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ours, head, spec = checkpoint.load_trainable(tmp_path / "out")
    expected, expected_head, expected_spec = checkpoint.load_trainable(imported["native"])
    assert (head, spec) == (expected_head, expected_spec)
    jax.tree.map(np.testing.assert_array_equal, ours, expected)
