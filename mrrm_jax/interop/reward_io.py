"""Import and export of PyTorch multi-response reward models in the release's layout.

The release (paper.md, "Released checkpoint layout") is a PEFT LoRA adapter directory over a Molmo2
base checkpoint:

    adapter_config.json         PEFT LoraConfig: r, lora_alpha, lora_dropout, target_modules, ...
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight [r, in], ...lora_B.weight [out, r]
    value_head.pt               torch state dict of the head (value_head.safetensors is read too)
    reward_model_config.json    value_head_type, value_head_hidden_dim, value_head_activation, resp_repr_mode
    tokenizer / processor files, `<|resp_sep|>` included

PEFT adds `x A^T B^T * alpha / r` to a Linear; our LoRA adds `x a b * alpha / r`, so a = A^T and b = B^T,
exactly. Module names are those of the original Molmo2 code (fused `att_proj` = [q; k; v], fused
`ff_proj` = [up; gate], `attn_out`, `ff_out`) or transformers' native ones. A fused module's B has the
rows of the fused weight, so it splits by the very row rules the base conversion uses for that weight
(`convert.plan`), and the parts share A.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from mrrm_jax import backbones
from mrrm_jax.backbones import checkpoint
from mrrm_jax.interop import convert
from mrrm_jax.core import reward
from mrrm_jax.interop import torch_files
from mrrm_jax.core.lora import LoraSpec

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
HEAD_SAFETENSORS, HEAD_PT, REWARD_MODEL_CONFIG = "value_head.safetensors", "value_head.pt", "reward_model_config.json"

# `base_model.model.<module>.lora_A.weight`. A state dict taken straight from a PeftModel keeps the
# adapter name (`.lora_A.default.weight`), PEFT's `save_pretrained` drops it; transformers' own
# adapter saving drops the `base_model.model.` prefix.
_PEFT_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight")

# adapter_config.json options that change what the factors mean, with the only value we import
# (absent, null or empty counts as that value).
_PLAIN_LORA = {"peft_type": "LORA", "bias": "none", "lora_bias": False, "use_dora": False, "use_rslora": False,
               "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None}

# Every backbone's PEFT export layouts (`Conversion.peft_modules`): the flag's choices.
EXPORT_LAYOUTS = sorted({name for b in backbones.BACKBONES.values() for name in b.conversion.peft_modules})

# Our LoRA targets: the language model's per-layer projections (the release adapts nothing else).
_LM_KERNEL = re.compile(r"language_model/layers/(?P<layer>\d+)/(?P<name>.+)/kernel")

# reward_model_config.json keys with the defaults the release's own loader (its README) uses.
_RELEASE_HEAD_DEFAULTS = {"value_head_type": "mlp", "value_head_hidden_dim": 1024, "value_head_activation": "silu",
                          "value_head_input_dim": None, "resp_repr_mode": "last"}

# Our ValueHead layer -> the release's state-dict prefix. Its "mlp" head is nn.Sequential(Linear, act,
# Linear) (`0.weight` ... `2.bias`); its "linear" head is a bare nn.Linear (`weight`, `bias`).
_HEAD_LAYERS = {"mlp": {"0": "0.", "2": "2."}, "linear": {"0": ""}}

@dataclasses.dataclass(frozen=True)
class _Part:
    """One of our kernels inside a PEFT LoRA module: rows [start, stop) of the module's B (and weight)."""

    kernel: str  # stacked path, e.g. language_model/layers/self_attn/q_proj/kernel
    layer: int
    rows: tuple[int, int]
    shape: tuple[int, int]  # the kernel's [in, out]


def _lora_parts(modules, cfg) -> dict[str, list[_Part]]:
    """PEFT module name (either layout) -> its parts, ordered by rows: the weight the module adapts,
    mapped by `convert.plan` exactly as the base conversion maps that weight."""
    weights = {module + ".weight": module for module in modules}
    try:
        target_plan = convert.plan(weights, cfg)
    except ValueError as error:
        raise ValueError(f"LoRA on modules this port does not know: {error}") from error
    kernel_shapes = convert.expected_leaves(cfg)
    parts: dict[str, list[_Part]] = {}
    outside = []
    for target, (sources, _) in target_plan.items():
        match = _LM_KERNEL.fullmatch(target)
        if match is None or target not in kernel_shapes:
            outside += [weights[key] for key, _ in sources]
            continue
        [(key, rows)] = sources  # a kernel always comes from one torch weight
        shape = kernel_shapes[target][0]
        parts.setdefault(weights[key], []).append(
            _Part(f"language_model/layers/{match['name']}/kernel", int(match["layer"]), rows or (0, shape[1]), shape))
    if outside:
        raise ValueError(f"LoRA on {sorted(set(outside))}: only the projections of the language model's "
                         f"{cfg.text.num_layers} layers can be imported")
    return {module: sorted(ps, key=lambda p: p.rows) for module, ps in parts.items()}


# -- import ----------------------------------------------------------------------------------------

def import_peft(base_hf_dir, adapter_dir, out_dir) -> pathlib.Path:
    """A release-layout reward model (Molmo2 or Qwen3-VL base + PEFT adapter dir) -> our reward-model directory
    (`checkpoint.save_trainable` layout). Everything is read and checked before anything is written."""
    base_hf_dir, adapter_dir, out_dir = (pathlib.Path(p) for p in (base_hf_dir, adapter_dir, out_dir))
    try:
        cfg = convert.hf_model_config(base_hf_dir)
    except ValueError as error:  # e.g. another architecture: say which directory
        raise ValueError(f"base checkpoint {base_hf_dir}: {error}") from error
    factors, lora_spec = _read_lora(adapter_dir, cfg)
    head_config, head_params = _read_head(adapter_dir, cfg.text.hidden_size)
    processor = backbones.load_processor(_processor_source(adapter_dir, base_hf_dir))

    convert.convert_dir(base_hf_dir, out_dir / checkpoint.BASE_DIR)
    checkpoint.save_trainable(out_dir, {"lora": factors, "head": head_params}, head_config, lora_spec)
    processor.save_pretrained(out_dir / checkpoint.PROCESSOR_DIR)
    return out_dir


def _read_json(path: pathlib.Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; a released reward model has {ADAPTER_CONFIG}, {ADAPTER_WEIGHTS}, "
                                f"{HEAD_PT} (or {HEAD_SAFETENSORS}) and {REWARD_MODEL_CONFIG}")
    return json.loads(path.read_text())


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of one file, float32 (SafetensorsShards reads a whole directory: keep this file's)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing")
    shards = convert.SafetensorsShards(path.parent)
    return {key: shards.read(key).astype(np.float32) for key, entry in shards.entries.items() if entry[0].name == path.name}


def _read_lora(adapter_dir: pathlib.Path, cfg) -> tuple[dict, LoraSpec]:
    """Stacked factors {kernel path: {"a" [L, in, r], "b" [L, r, out]}} and the LoraSpec."""
    peft_config = _read_json(adapter_dir / ADAPTER_CONFIG)
    changed = {k: peft_config[k] for k, plain in _PLAIN_LORA.items() if (peft_config.get(k) or plain) != plain}
    if changed:
        raise ValueError(f"{adapter_dir / ADAPTER_CONFIG}: {changed} are not supported (plain LoRA: {_PLAIN_LORA})")
    rank = peft_config["r"]

    weights_path = adapter_dir / ADAPTER_WEIGHTS
    factors_by_module: dict[str, dict[str, np.ndarray]] = {}
    for key, array in _read_safetensors(weights_path).items():
        match = _PEFT_KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"{weights_path}: tensor {key} is not a LoRA factor (base_model.model.<module>.lora_A.weight)")
        factors_by_module.setdefault(match["module"], {})[match["factor"]] = array
    if not factors_by_module:
        raise ValueError(f"{weights_path}: no LoRA factors")
    incomplete = sorted(m for m, ab in factors_by_module.items() if set(ab) != {"A", "B"})
    if incomplete:
        raise ValueError(f"{weights_path}: modules with only one of lora_A / lora_B: {incomplete}")
    try:
        parts_by_module = _lora_parts(factors_by_module, cfg)
    except ValueError as error:
        raise ValueError(f"{weights_path}: {error}") from error

    per_layer: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    for module, parts in parts_by_module.items():
        lora_a, lora_b = factors_by_module[module]["A"], factors_by_module[module]["B"]
        expected = ((rank, parts[0].shape[0]), (parts[-1].rows[1], rank))
        if (lora_a.shape, lora_b.shape) != expected:
            raise ValueError(f"{weights_path}: {module} has lora_A {lora_a.shape}, lora_B {lora_b.shape}; "
                             f"r={rank} and the base expect {expected[0]}, {expected[1]}")
        for part in parts:
            layers = per_layer.setdefault(part.kernel, {})
            if part.layer in layers:
                raise ValueError(f"{weights_path}: two LoRA modules adapt {part.kernel} in layer {part.layer}")
            layers[part.layer] = (lora_a.T, lora_b[part.rows[0]: part.rows[1]].T)

    factors = {}
    for kernel, layers in per_layer.items():
        # A layer PEFT left out (`layers_to_transform`) gets zero factors: a zero B adds exactly nothing.
        zeros = tuple(np.zeros_like(x) for x in next(iter(layers.values())))
        stacked = [layers.get(i, zeros) for i in range(cfg.text.num_layers)]
        factors[kernel] = {"a": np.stack([a for a, _ in stacked]), "b": np.stack([b for _, b in stacked])}
    spec = LoraSpec(rank=rank, alpha=float(peft_config["lora_alpha"]), dropout=float(peft_config.get("lora_dropout", 0.0)),
                    targets=tuple(re.escape(kernel) for kernel in sorted(factors)))
    return factors, spec


def _read_head(adapter_dir: pathlib.Path, hidden_size: int) -> tuple[reward.HeadConfig, dict]:
    config_path = adapter_dir / REWARD_MODEL_CONFIG
    raw = _read_json(config_path)
    unknown = sorted(set(raw) - set(_RELEASE_HEAD_DEFAULTS))
    if unknown:
        raise ValueError(f"{config_path}: unknown keys {unknown} (known: {sorted(_RELEASE_HEAD_DEFAULTS)})")
    options = {**_RELEASE_HEAD_DEFAULTS, **raw}
    head_type, pooling = options["value_head_type"], options["resp_repr_mode"]
    if head_type not in _HEAD_LAYERS:
        raise ValueError(f"{config_path}: value_head_type={head_type!r}; expected one of {sorted(_HEAD_LAYERS)}")
    # The release stores an activation for linear heads too (default "selu"); it is unused there.
    if head_type == "mlp" and str(options["value_head_activation"]).lower() != "silu":
        raise ValueError(f"{config_path}: value_head_activation={options['value_head_activation']!r}; "
                         "only 'silu' (the paper's head) is implemented")
    if pooling not in reward.POOLINGS:
        raise ValueError(f"{config_path}: resp_repr_mode={pooling!r}; expected one of {reward.POOLINGS}")

    if (adapter_dir / HEAD_SAFETENSORS).exists():
        state = _read_safetensors(adapter_dir / HEAD_SAFETENSORS)
    elif (adapter_dir / HEAD_PT).exists():
        state = {k: v.astype(np.float32) for k, v in torch_files.load_state_dict(adapter_dir / HEAD_PT).items()}
    else:
        raise FileNotFoundError(f"{adapter_dir}: no {HEAD_PT} or {HEAD_SAFETENSORS}")
    layers = _HEAD_LAYERS[head_type]
    expected_keys = sorted(prefix + p for prefix in layers.values() for p in ("weight", "bias"))
    if sorted(state) != expected_keys:
        raise ValueError(f"value head of {adapter_dir}: keys {sorted(state)}; a {head_type!r} head has {expected_keys}")
    params = {ours: {"kernel": state[prefix + "weight"].T, "bias": state[prefix + "bias"]} for ours, prefix in layers.items()}

    # The head reads H features per response, 2H for first_last_concat.
    input_dim = hidden_size * (2 if pooling == "first_last_concat" else 1)
    head_fields = dict(head_type=head_type, pooling=pooling)
    if head_type == "mlp":
        head_fields["hidden_dim"] = params["0"]["kernel"].shape[1]
        if options["value_head_hidden_dim"] not in (None, head_fields["hidden_dim"]):
            raise ValueError(f"{config_path}: value_head_hidden_dim={options['value_head_hidden_dim']} but the "
                             f"head's first layer has {head_fields['hidden_dim']} outputs")
    head_config = reward.HeadConfig(**head_fields)
    expected_shapes = jax.eval_shape(reward.ValueHead(head_config).init, jax.random.key(0), jnp.zeros((1, input_dim)))
    if jax.tree.map(np.shape, params) != jax.tree.map(lambda x: x.shape, expected_shapes["params"]):
        raise ValueError(f"value head of {adapter_dir}: shapes {jax.tree.map(np.shape, params)} do not fit a "
                         f"{head_type!r} head on {input_dim} features (LM hidden size {hidden_size}, {pooling!r} pooling)")
    return head_config, params


def _has_tokenizer(directory: pathlib.Path) -> bool:
    return (directory / "tokenizer.json").exists() or (directory / "tokenizer_config.json").exists()


def _processor_source(adapter_dir: pathlib.Path, base_hf_dir: pathlib.Path) -> pathlib.Path:
    """The release ships its tokenizer (with `<|resp_sep|>`) in the adapter dir; else the base's."""
    for directory in (adapter_dir, base_hf_dir):
        if _has_tokenizer(directory):
            return directory
    raise FileNotFoundError(f"no tokenizer files (tokenizer.json / tokenizer_config.json) in {adapter_dir} or {base_hf_dir}")


# -- export ----------------------------------------------------------------------------------------

def export_peft(reward_dir, out_dir, layout: str = "native") -> pathlib.Path:
    """Our reward-model directory -> the release's layout (see the module docstring), with the module
    names of `layout`, one of the backbone's `conversion.peft_modules`: "native" (transformers; Molmo2 and
    Qwen3-VL name the LM's projections alike) or, for Molmo2, "original" (its fused att_proj / ff_proj,
    as released)."""
    if layout not in EXPORT_LAYOUTS:
        raise ValueError(f"layout={layout!r}; expected one of {EXPORT_LAYOUTS}")
    reward_dir, out_dir = pathlib.Path(reward_dir), pathlib.Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; choose a new --out directory")
    cfg = checkpoint.load_config(reward_dir / checkpoint.BASE_DIR)
    layouts = backbones.BACKBONES[cfg.model_type].conversion.peft_modules
    if layout not in layouts:
        raise ValueError(f"layout={layout!r} is not a {cfg.model_type} module naming; a {cfg.model_type} model "
                         f"exports with layout={' or '.join(map(repr, sorted(layouts)))}")
    trainable, head_config, lora_spec = checkpoint.load_trainable(reward_dir)
    if not trainable["lora"]:
        raise ValueError(f"{reward_dir} has no LoRA factors: a PEFT adapter needs some")
    if not head_config.scale_by_sqrt_hidden:
        raise ValueError(f"{reward_dir}: the release always divides scores by sqrt(H); scale_by_sqrt_hidden=False "
                         "cannot be exported")
    processor_dir = reward_dir / checkpoint.PROCESSOR_DIR
    if not processor_dir.is_dir():
        raise FileNotFoundError(f"{processor_dir}: missing; the release ships its tokenizer with the adapter")

    lora_tensors, exported_modules = _export_lora(trainable["lora"], cfg, layout)
    head_type = head_config.head_type
    head_tensors = {}
    for ours, prefix in _HEAD_LAYERS[head_type].items():
        head_tensors[prefix + "weight"] = np.ascontiguousarray(np.asarray(trainable["head"][ours]["kernel"]).T)
        head_tensors[prefix + "bias"] = np.asarray(trainable["head"][ours]["bias"])
    peft_config = {
        **_PLAIN_LORA, "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "r": lora_spec.rank, "lora_alpha": lora_spec.alpha, "lora_dropout": lora_spec.dropout,
        # A regex over full module names, not suffixes: in transformers' Molmo2 the ViT and the
        # adapter also have q_proj ... down_proj, which PEFT would otherwise wrap too.
        "target_modules": "|".join(re.escape(m).replace(re.escape("{}"), r"\d+") for m in exported_modules),
    }
    release_config = {"value_head_type": head_type, "value_head_hidden_dim": head_config.hidden_dim if head_type == "mlp" else None,
                      "value_head_activation": "silu", "value_head_input_dim": np.shape(trainable["head"]["0"]["kernel"])[0],
                      "resp_repr_mode": head_config.pooling}

    shutil.copytree(processor_dir, out_dir, dirs_exist_ok=True)
    safetensors.numpy.save_file(lora_tensors, out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    safetensors.numpy.save_file(head_tensors, out_dir / HEAD_SAFETENSORS, metadata={"format": "pt"})
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=1))
    (out_dir / REWARD_MODEL_CONFIG).write_text(json.dumps(release_config, indent=1))
    return out_dir


def _export_lora(factors: dict, cfg, layout: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """PEFT tensors {key: array} and the module templates written. A fused module needs one A for all
    its parts (its B is the parts' B stacked by rows); anything else is an error that says why."""
    factors = {kernel: {k: np.asarray(v) for k, v in ab.items()} for kernel, ab in factors.items()}
    modules = {template.format(layer): (template, layer)
               for template in backbones.BACKBONES[cfg.model_type].conversion.peft_modules[layout] for layer in range(cfg.text.num_layers)}
    tensors, written_templates, exported = {}, [], set()
    for module, parts in _lora_parts(modules, cfg).items():
        template, layer = modules[module]
        present = [p.kernel for p in parts if p.kernel in factors]
        if not present:
            continue
        if len(present) < len(parts):
            raise ValueError(f"layout={layout!r} writes {module} as ONE LoRA over {[p.kernel for p in parts]}, "
                             f"but only {present} have factors; export with layout='native'")
        a_parts = [factors[p.kernel]["a"][layer] for p in parts]
        if any(not np.array_equal(a, a_parts[0]) for a in a_parts[1:]):
            raise ValueError(f"layout={layout!r} writes {module} as ONE LoRA with one lora_A, but "
                             f"{[p.kernel for p in parts]} have different A factors in layer {layer}; "
                             "export with layout='native'")
        prefix = f"base_model.model.{module}"
        tensors[prefix + ".lora_A.weight"] = np.ascontiguousarray(a_parts[0].T)
        tensors[prefix + ".lora_B.weight"] = np.ascontiguousarray(
            np.concatenate([factors[p.kernel]["b"][layer].T for p in parts]))
        exported.update(present)
        if template not in written_templates:
            written_templates.append(template)
    left_out = sorted(set(factors) - exported)
    if left_out:
        raise ValueError(f"no module of layout={layout!r} adapts {left_out}")
    return tensors, written_templates
