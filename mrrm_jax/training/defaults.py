"""Defaults every config starts from (configs/*.py): the training recipe of the paper (arXiv 2604.10966).

Every key that a run may set exists here, so `--config.<key>=...` for a key that is not here is an
error (ml_collections refuses unknown keys).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.distributed = False  # True: jax.distributed.initialize() (multi-host pods)
    c.log_every = 10

    c.model = ml_collections.ConfigDict()
    c.model.type = "molmo2"  # the backbone: "molmo2" (the table in backbones/__init__.py)
    c.model.base_dir = ""  # a converted base (tools/convert_checkpoint.py); "" = random init from `preset`/`dims`
    c.model.preset = ""  # "molmo2_4b" / "molmo2_8b": dimensions for random init and AOT checks
    c.model.dims = ml_collections.ConfigDict({"vision": {}, "adapter": {}, "text": {}})
    c.model.param_dtype = "float32"
    c.model.dtype = "float32"
    c.model.remat = "none"  # "none" | "dots" | "dots_no_batch" | "full" | "auto": the least recompute that fits
    c.model.remat_budget_gib = 0.0  # "auto"'s device memory; 0: what the device reports (TPU/GPU; CPU reports none)
    c.model.attention = "xla"
    c.model.scan_unroll = 1

    c.processor = ml_collections.ConfigDict()
    c.processor.dir = ""  # "" = the base_dir's processor, else one written from the Qwen vocab into the workdir
    c.processor.kwargs = ml_collections.ConfigDict({"crop": 378, "max_crops": 8, "num_frames": 384, "max_fps": 2.0})

    c.head = ml_collections.ConfigDict({"head_type": "mlp", "hidden_dim": 1024, "pooling": "last"})
    c.lora = ml_collections.ConfigDict({"rank": 64, "alpha": 16.0, "dropout": 0.05})

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # a JSONL file in the paper's schema, or "synthetic" (the demo corpus, made in the workdir)
    c.data.eval = ""
    # ((DIR, weight), ...): train on prepared directories (`python -m mrrm_jax.prepare`) mixed by weight,
    # with data.train empty. Pairs, not a dict: a path's dots cannot be ConfigDict keys.
    c.data.mixture = ()
    c.data.media_root = ""  # "" = the JSONL file's directory
    c.data.num_epochs = -1  # -1: repeat for as many steps as `train.num_steps`
    c.data.num_workers = 0  # grain worker processes decoding media (0: in the training process)
    c.data.num_threads = 1  # reader threads per worker, each with its own processor
    # Each response in its own sequence, with its own copy of the prompt and media, and the same N-way
    # loss over the separate scores: a conventional single-response RM trained on the same data (the
    # paper's GRPO baseline). Score it with `mode="single"`; the budget and rows hold all N copies.
    c.data.single_response = False
    c.data.synthetic = ml_collections.ConfigDict({"train_images": 0, "train_videos": 0, "eval_images": 0,
                                                  "eval_videos": 0})

    c.budget = ml_collections.ConfigDict({"max_tokens": 24576, "max_vision_tokens": 16384, "max_frames": 64,
                                          "min_frames": 2})
    c.packing = ml_collections.ConfigDict({"row_tokens": 24576, "row_crops": 64, "row_pooled": 16384,
                                           "row_examples": 16, "max_responses": 8, "pool_slots": 9,
                                           "row_patches": 0, "window": 64})  # row_patches: Qwen3-VL's ViT patches

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000
    c.train.rows_per_step = 8  # packed rows per optimizer step, all processes together
    c.train.grad_accum = 1  # micro-steps per optimizer step (rows_per_step / grad_accum rows each)
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 0
    c.train.weight_decay = 0.0
    c.train.clip_norm = 1.0
    c.train.objective = "cross_entropy"
    c.train.full_train = ()  # regexes of base parameters trained in full (random-init models)

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.checkpoint = ml_collections.ConfigDict({"every_steps": 500, "keep": 3})
    c.eval = ml_collections.ConfigDict({"every_steps": 1000, "controls": ("black", "frozen")})
    return c


def molmo2_4b(mesh: dict, grad_accum: int, remat: str = "full", rows_per_step: int = 8, row_crops: int = 96,
              max_frames: int = 64) -> ml_collections.ConfigDict:
    """The paper's recipe on Molmo2-4B for a TPU slice (configs/molmo2_4b_*.py set the mesh).

    Global batch: the paper's 64 examples at micro-batch 1 become 8 packed rows of 24,576 tokens per
    step; at the paper's ~3K tokens per example a row holds ~8 examples. Packing makes the count
    vary: the loss is the mean over the step's examples and `examples_per_step` is logged.
    Steps: 3 epochs of the paper's ~100K examples / 64 per step.
    """
    c = get_config()
    c.model.preset = "molmo2_4b"  # dimensions; weights from model.base_dir (tools/convert_checkpoint.py)
    c.model.param_dtype = "bfloat16"
    c.model.dtype = "bfloat16"
    c.model.remat = remat
    c.model.attention = "pallas"  # our segment-aware flash kernel (models/segment_flash.py)
    c.processor.kwargs = ml_collections.ConfigDict({"crop": 378, "max_crops": 8, "num_frames": 384, "max_fps": 2.0})
    c.packing = ml_collections.ConfigDict({"row_tokens": 24576, "row_crops": row_crops, "row_pooled": 16384,
                                           "row_examples": 16, "max_responses": 8, "pool_slots": 9, "window": 128})
    c.data.num_workers = 8
    c.budget.max_frames = max_frames
    c.train.rows_per_step = rows_per_step
    c.train.grad_accum = grad_accum
    c.train.num_steps = 3 * 100_000 // 64
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 0
    c.mesh = ml_collections.ConfigDict(mesh)
    c.checkpoint.every_steps = 500
    c.eval.every_steps = 1000
    c.eval.controls = ()
    return c


def qwen3vl_4b(mesh: dict, grad_accum: int, remat: str = "full", rows_per_step: int = 8,
               max_vision_tokens: int = 8192, max_frames: int = 64) -> ml_collections.ConfigDict:
    """The paper's recipe on Qwen3-VL-4B for a TPU slice (configs/qwen3vl_4b_*.py set the mesh): as
    `molmo2_4b` (LoRA r 64 on the LM's seven projections, AdamW 1e-4, bf16, rows of 24,576 tokens, 3
    epochs), with Qwen3-VL's media room: `max_vision_tokens` merged vision tokens per example and 4 ViT
    patches each per row (`packing.row_patches`); the processor is the checkpoint's own (its pixel
    budgets and 2 fps video sampling), which a record over the budget falls back from
    (`Qwen3VLProcessor.media_attempts`)."""
    c = molmo2_4b(mesh, grad_accum, remat, rows_per_step, max_frames=max_frames)
    c.model.type = "qwen3_vl"
    c.model.preset = "qwen3_vl_4b"
    c.processor.kwargs = ml_collections.ConfigDict({})  # unused: the processor comes with the base checkpoint
    c.budget.max_vision_tokens = max_vision_tokens
    c.packing = ml_collections.ConfigDict({"row_tokens": 24576, "row_crops": 0, "row_pooled": 0,
                                           "row_patches": 4 * max_vision_tokens, "row_examples": 16,
                                           "max_responses": 8, "pool_slots": 9, "window": 128})
    return c


# The paper's ten sources by release size (thousands of records): MM-RLHF 16.3, LLaVA-Critic pairwise 40.2,
# RLAIF-V 83.1, VLFeedback 80.3, POVID 17.2, WildVision battle 6.2, Tulu 3 mixture 271.4, Skywork 80K v0.2
# 77, Nectar 183, PKU-SafeRLHF (the three generators' train splits) ~73.9. The paper gives no weights:
# these sample as concatenating the ten would.
PAPER_SOURCE_WEIGHTS = {"mm_rlhf": 16.3, "llava_critic": 40.2, "rlaif_v": 83.1, "vlfeedback": 80.3, "povid": 17.2,
                        "wildvision": 6.2, "tulu": 271.4, "skywork": 77.0, "nectar": 183.0, "pku_saferlhf": 73.9}


def paper_mixture(prepared_root: str) -> tuple[tuple[str, float], ...]:
    """`data.mixture` over the ten sources prepared under `prepared_root/<name>`."""
    return tuple((f"{prepared_root}/{name}", weight) for name, weight in PAPER_SOURCE_WEIGHTS.items())
