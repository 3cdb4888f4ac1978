"""Loadable Qwen-VL model folders built locally, without downloads.

- ``build_tiny_model(dir)``: a tiny random Qwen2-VL checkpoint (config, safetensors, tokenizer,
  preprocessor config) so tests run the real ``from_pretrained`` + ``generate`` path on a CPU in seconds.
- ``write_random_weights_dir(dir, arch)``: a real architecture's config (resources/model_configs/)
  plus tokenizer, without weights, for ``--random-weights`` benchmarks on a GPU.

The tokenizer is a byte-level BPE trained here on a few sentences: every text encodes (bytes are
the base alphabet), the prompts' words are single tokens as in Qwen's vocabulary (so prompt lengths
are realistic), and the Qwen special tokens sit at Qwen's ids (151643...) or, for the tiny model,
right after the trained vocabulary.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN_SPECIAL_BASE_ID = 151643  # id of <|endoftext|> in Qwen2 / Qwen2-VL / Qwen2.5-VL vocabularies

# The Qwen2-VL chat template (one or more images per user turn, default system prompt).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_TRAINING_TEXT = """You are a helpful assistant.
Describe this image in one sentence and list objects.
Analyze this image and answer with one JSON object only, no other text, using exactly these keys:
{"caption": "one sentence describing the image", "tags": ["up to 10 short lowercase keywords"],
"objects": ["main objects visible"], "text": "any text written in the image, or an empty string",
"safety": {"nsfw": false, "violence": false, "rating": "safe|questionable|unsafe"}}
A photo of a cat sitting on a wooden table next to a cup of coffee and a laptop.
A red car parked on a street in front of a building with trees, people walking on the sidewalk.
The image shows a mountain landscape with snow, a lake, blue sky and clouds at sunset.
true false null 0 1 2 3 4 5 6 7 8 9 dog person food sign logo screenshot document chart
"""


def build_tokenizer(special_base_id: int | None = None, vocab_size: int = 1024):
    """Byte-level BPE tokenizer with the Qwen special tokens.

    special_base_id: id of <|endoftext|> (the rest follow); None places them after the trained vocab.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    trainee = Tokenizer(models.BPE())
    trainee.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    lines = _TRAINING_TEXT.splitlines()
    trainee.train_from_iterator(lines * 4, trainer)
    trained = json.loads(trainee.to_str())["model"]
    vocab = dict(trained["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    base = len(vocab) if special_base_id is None else special_base_id
    for offset, token in enumerate(QWEN_SPECIAL_TOKENS):
        vocab[token] = base + offset  # added tokens found in the model vocab keep these ids
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    return tokenizer


def write_tokenizer(out_dir: Path, special_base_id: int | None = None) -> int:
    """Write tokenizer.json + tokenizer_config.json; returns the id after the last special token."""
    tokenizer = build_tokenizer(special_base_id)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 32768,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tokenizer.token_to_id(QWEN_SPECIAL_TOKENS[-1]) + 1


def write_preprocessor_config(out_dir: Path, min_pixels: int = 28 * 28 * 4, max_pixels: int = 448 * 448) -> None:
    # imported here: image_prep loads torch, which is_tiny_model's callers (the Dagster step) do not need
    from imgpipe_dagster.gpu_server.image_prep import CLIP_MEAN, CLIP_STD

    config = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }
    (out_dir / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


def _special_ids(base: int) -> dict[str, int]:
    ids = {t: base + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)}
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
    }


def tiny_config_dict(vocab_size: int, special_base_id: int, arch: str = "qwen2_vl") -> dict:
    """A two-layer Qwen2-VL (or Qwen2.5-VL) config in the published checkpoints' layout."""
    text = dict(
        hidden_act="silu",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=4096,
        max_window_layers=2,
        attention_dropout=0.0,
        initializer_range=0.5,  # large random weights: varied tokens, so tests can compare sequences
        vocab_size=vocab_size,
    )
    if arch == "qwen2_vl":
        vision = dict(
            depth=2, embed_dim=32, mlp_ratio=2, num_heads=2, in_chans=3, hidden_size=64,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu",
        )
        arch_name = "Qwen2VLForConditionalGeneration"
    elif arch == "qwen2_5_vl":
        vision = dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_chans=3, out_hidden_size=64,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
            fullatt_block_indexes=[1], tokens_per_second=2, hidden_act="silu",
        )
        arch_name = "Qwen2_5_VLForConditionalGeneration"
    else:
        raise ValueError(f"unknown tiny arch {arch!r} (qwen2_vl or qwen2_5_vl)")
    return dict(
        architectures=[arch_name],
        model_type=arch,
        torch_dtype="float32",
        vision_config=vision,
        **text,
        **_special_ids(special_base_id),
    )


def randomise_biases_and_norms(model) -> None:
    """Default init leaves biases and norm weights at 0/1; random values make every weight matter to tests."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.02)
            elif "norm" in name or "ln_q" in name:
                param.uniform_(0.8, 1.2)


# A file in the checkpoint folder that marks it as the tiny random test model.
TINY_MODEL_MARKER = "IMGPIPE_TINY_RANDOM_MODEL"


def build_tiny_model(out_dir: str | Path, arch: str = "qwen2_vl", seed: int = 0) -> Path:
    """Write a tiny random Qwen2-VL (or Qwen2.5-VL) checkpoint into out_dir and return its path."""
    import torch
    from transformers import AutoConfig

    from imgpipe_dagster.gpu_server.inference import _model_class

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special_base = build_tokenizer().get_vocab_size() - len(QWEN_SPECIAL_TOKENS)
    vocab_size = write_tokenizer(out, special_base_id=special_base)
    vocab_size = (vocab_size + 63) // 64 * 64  # padded like the real vocabularies
    (out / "config.json").write_text(json.dumps(tiny_config_dict(vocab_size, special_base, arch), indent=2))
    write_preprocessor_config(out)
    config = AutoConfig.from_pretrained(out, local_files_only=True)
    torch.manual_seed(seed)
    model = _model_class(config.model_type)._from_config(config, dtype=torch.float32)
    randomise_biases_and_norms(model)
    model.save_pretrained(out, safe_serialization=True)
    # save_pretrained rewrites config.json in the installed transformers' own layout; that is fine.
    (out / TINY_MODEL_MARKER).write_text("random weights built by imgpipe make-tiny-model: its text is noise\n")
    return out


def is_tiny_model(path: str | Path) -> bool:
    """True for a checkpoint written by build_tiny_model (whose output is noise)."""
    return (Path(path) / TINY_MODEL_MARKER).is_file()


def model_config_path(arch: str) -> Path:
    """resources/model_configs/<arch>.json, e.g. arch = "qwen2-vl-2b"."""
    try:
        from imgpipe_dagster.paths import resource_path

        return resource_path(f"model_configs/{arch}.json")
    except (ImportError, FileNotFoundError):
        path = Path(__file__).resolve().parents[2] / "resources" / "model_configs" / f"{arch}.json"
        if not path.is_file():
            raise FileNotFoundError(f"no architecture config {path}") from None
        return path


def write_random_weights_dir(out_dir: str | Path, arch: str = "qwen2-vl-2b") -> Path:
    """A model folder without weights (config, tokenizer at Qwen's ids, preprocessor config) for
    ``InferenceEngine(ModelSettings(..., random_weights=True))``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_config_path(arch), out / "config.json")
    write_tokenizer(out, special_base_id=QWEN_SPECIAL_BASE_ID)
    write_preprocessor_config(out)
    return out
