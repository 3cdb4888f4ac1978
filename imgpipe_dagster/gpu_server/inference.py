"""The GPU inference engine: Qwen2-VL / Qwen2.5-VL over batches of already-resized images.

Knows nothing of HTTP. The server calls ``prepare`` on CPU threads (decode, tokenise, positions)
while ``generate`` runs the previous batch, one batch at a time per model.

Two generation backends share one ``prepare``:
- "fast" (default on CUDA for Qwen2-VL/Qwen2.5-VL): our own batched vision tower, prefill into a
  static KV cache and a decode step replayed as a CUDA graph (imgpipe_dagster/gpu_server/qwen_fast.py);
- "hf": plain ``model.generate`` (the reference; used on the CPU by default and as the fallback).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgpipe_dagster.gpu_server.analysis_parse import parse_analysis
from imgpipe_dagster.gpu_server.image_prep import (
    ImageDecodeError,
    PatchGrid,
    decode_image,
    normalise_and_patchify,
)
from imgpipe_dagster.gpu_server.prompts import DEFAULT_PROMPT, Prompt, load_prompt
from imgpipe_dagster.gpu_server.settings import ModelSettings
from imgpipe_dagster.host_memory import release_free_memory

log = logging.getLogger(__name__)

IMAGE_PAD_TOKEN = "<|image_pad|>"
END_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclass
class ImageResult:
    text: str
    analysis: dict | None
    parse_ok: bool
    prompt_tokens: int
    generated_tokens: int
    error: str | None = None  # set when only this image failed (undecodable, out of memory alone, ...)


@dataclass
class PreparedBatch:
    """CPU-side inputs of one generate call. Opaque to callers except ``size`` and ``errors``."""

    prompt: Prompt
    size: int  # images asked for, valid or not
    errors: dict[int, str]  # request index -> why that image cannot run
    valid: list[int]  # request index of each prepared row
    images: list[torch.Tensor]  # uint8 (H, W, 3) per row
    input_ids: torch.Tensor  # (rows, L) left-padded
    attention_mask: torch.Tensor  # (rows, L) 1 for real tokens
    position_ids: torch.Tensor  # (3, rows, L) multimodal rope positions (0 on padding)
    next_position: torch.Tensor  # (rows,) rope position of the first generated token
    prompt_tokens: list[int]  # real prompt tokens per row
    grids: list[tuple[int, int]] = field(default_factory=list)  # (height, width) in pixels per row
    prepare_s: float = 0.0

    @property
    def rows(self) -> int:
        return len(self.valid)

    def subset(self, rows: list[int]) -> PreparedBatch:
        """The same batch restricted to some rows (used when a batch is split after running out of memory)."""
        lengths = self.attention_mask[rows].sum(dim=1)
        width = int(lengths.max()) if rows else 0
        return PreparedBatch(
            prompt=self.prompt,
            size=len(rows),
            errors={},
            valid=[self.valid[r] for r in rows],
            images=[self.images[r] for r in rows],
            input_ids=self.input_ids[rows][:, -width:],
            attention_mask=self.attention_mask[rows][:, -width:],
            position_ids=self.position_ids[:, rows][:, :, -width:],
            next_position=self.next_position[rows],
            prompt_tokens=[self.prompt_tokens[r] for r in rows],
            grids=[self.grids[r] for r in rows],
        )


def _pick_dtype(settings: ModelSettings, device: torch.device) -> torch.dtype:
    if device.type != "cuda" or not settings.use_fp16:
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _attn_implementation(settings: ModelSettings, device: torch.device) -> str:
    if settings.use_flash_attention and device.type == "cuda" and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "sdpa"


def _model_class(model_type: str):
    import transformers

    classes = {
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    }
    if model_type not in classes:
        raise ValueError(f"unsupported model type {model_type!r} (supported: {sorted(classes)})")
    return getattr(transformers, classes[model_type])


class InferenceEngine:
    """Loads one model on one device and runs batches of images through it."""

    def __init__(self, settings: ModelSettings):
        self.settings = settings
        if settings.enable_memory_defrag and settings.device.startswith("cuda"):
            # Only effective before CUDA initialises; the server sets it at process start too.
            os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        from transformers import AutoConfig, AutoTokenizer

        self._torch_device = torch.device(settings.device)
        if self._torch_device.type == "cpu" and settings.cpu_threads > 0:
            torch.set_num_threads(settings.cpu_threads)
        if self._torch_device.type == "cuda":
            torch.cuda.set_device(self._torch_device)
            torch.backends.cuda.matmul.allow_tf32 = settings.enable_tf32
            torch.backends.cudnn.allow_tf32 = settings.enable_tf32
        self._dtype = _pick_dtype(settings, self._torch_device)
        self.device = str(self._torch_device)
        self.dtype = str(self._dtype).replace("torch.", "")
        self.model_name = Path(settings.model_path.rstrip("/")).name or settings.model_path

        started = time.perf_counter()
        self.config = AutoConfig.from_pretrained(settings.model_path, local_files_only=True)
        self.patch_grid = PatchGrid.from_vision_config(self.config.vision_config)
        self.tokenizer = AutoTokenizer.from_pretrained(settings.model_path, local_files_only=True)
        self.attn_implementation = _attn_implementation(settings, self._torch_device)
        model_cls = _model_class(self.config.model_type)
        if settings.random_weights:
            torch.manual_seed(settings.seed)
            with torch.device(self._torch_device):
                self.model = model_cls._from_config(
                    self.config, dtype=self._dtype, attn_implementation=self.attn_implementation
                )
        else:
            self.model = model_cls.from_pretrained(
                settings.model_path,
                dtype=self._dtype,
                attn_implementation=self.attn_implementation,
                local_files_only=True,
            ).to(self._torch_device)
        self.model.eval()
        self.load_s = time.perf_counter() - started

        self._image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD_TOKEN)
        self._end_token_ids = [
            i for i in (self.tokenizer.convert_tokens_to_ids(t) for t in END_TOKENS) if i is not None
        ]
        self._pad_token_id = self.tokenizer.pad_token_id
        if self._pad_token_id is None:
            self._pad_token_id = self._end_token_ids[-1]
        self._wants_token_types = "mm_token_type_ids" in inspect.signature(self.model.forward).parameters
        self._prompt_ids: dict[str, tuple[list[int], list[int]]] = {}
        self._layouts: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._prompt_lock = threading.Lock()
        self._generate_calls = 0
        self.last_batch: dict[str, Any] = {}
        self._decode_pool = ThreadPoolExecutor(max_workers=max(1, min(8, (os.cpu_count() or 2) // 2)))

        self.backend = self._choose_backend()
        self._fast = None
        if self.backend == "fast":
            from imgpipe_dagster.gpu_server.qwen_fast import FastQwenVL

            self._fast = FastQwenVL(self.model, self.config, self._dtype, settings)
        log.info(
            "loaded %s on %s (%s, %s, backend %s) in %.1fs",
            self.model_name, self.device, self.dtype, self.attn_implementation, self.backend, self.load_s,
        )

    # ------------------------------------------------------------------ public API

    def take_live_settings(self, settings: ModelSettings) -> None:
        """Take over the settings read per batch (max_new_tokens, clear_cache_every_n_requests).
        The server checks that nothing else changed: those need a new process."""
        self.settings = settings


    def prompt_version(self, prompt_name: str = DEFAULT_PROMPT) -> str:
        return load_prompt(prompt_name).version

    def prepare(self, images: list[bytes], prompt_name: str = DEFAULT_PROMPT) -> PreparedBatch:
        """Decode images and build token ids and rope positions. CPU only; thread-safe."""
        started = time.perf_counter()
        prompt = load_prompt(prompt_name)
        before_ids, after_ids = self._prompt_token_ids(prompt)
        errors: dict[int, str] = {}
        decoded: list[tuple[int, np.ndarray]] = []
        if len(images) > 8:
            arrays = list(self._decode_pool.map(self._decode_or_error, images))
        else:
            arrays = [self._decode_or_error(b) for b in images]
        for index, result in enumerate(arrays):
            if isinstance(result, str):
                errors[index] = result
            else:
                decoded.append((index, result))

        rows = len(decoded)
        # Row layouts depend only on (prompt, image size): cached, so preparing a batch holds the
        # GIL briefly and the generate thread keeps the GPU fed.
        layouts = [self._row_layout(prompt, before_ids, after_ids, a.shape[0], a.shape[1]) for _, a in decoded]
        grids = [(a.shape[0], a.shape[1]) for _, a in decoded]
        width = max((ids.numel() for ids, _, _ in layouts), default=0)
        input_ids = torch.full((rows, width), self._pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((rows, width), dtype=torch.long)
        position_ids = torch.zeros((3, rows, width), dtype=torch.long)
        if rows and all(ids.numel() == width for ids, _, _ in layouts) and len(set(grids)) == 1:
            input_ids[:] = layouts[0][0]
            attention_mask[:] = 1
            position_ids[:] = layouts[0][1].unsqueeze(1)
        else:
            for row, (ids, pos, _) in enumerate(layouts):
                n = ids.numel()
                input_ids[row, width - n :] = ids
                attention_mask[row, width - n :] = 1
                position_ids[:, row, width - n :] = pos
        seqs = [ids for ids, _, _ in layouts]
        next_pos = [nxt for _, _, nxt in layouts]
        image_tensors = [torch.from_numpy(a) for _, a in decoded]
        return PreparedBatch(
            prompt=prompt,
            size=len(images),
            errors=errors,
            valid=[i for i, _ in decoded],
            images=image_tensors,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            next_position=torch.tensor(next_pos, dtype=torch.long),
            prompt_tokens=[ids.numel() for ids in seqs],
            grids=grids,
            prepare_s=time.perf_counter() - started,
        )

    def generate(self, batch: PreparedBatch) -> list[ImageResult]:
        """Run one prepared batch; one result per requested image, in request order. One call at a time."""
        results: list[ImageResult | None] = [None] * batch.size
        for index, why in batch.errors.items():
            results[index] = ImageResult("", None, False, 0, 0, error=why)
        started = time.perf_counter()
        if batch.rows:
            for row, result in enumerate(self._generate_rows(batch)):
                results[batch.valid[row]] = result
        self._generate_calls += 1
        elapsed = time.perf_counter() - started
        self.last_batch = {"rows": batch.rows, "generate_s": round(elapsed, 4), "prepare_s": round(batch.prepare_s, 4)}
        if self._fast is not None:
            self.last_batch.update(self._fast.last_timings)
        log.info("batch %s", self.last_batch)
        every = self.settings.clear_cache_every_n_requests
        if every and self._generate_calls % every == 0:
            if self._torch_device.type == "cuda":
                torch.cuda.empty_cache()
            release_free_memory()  # host memory too: decoded images and pixel tensors of past batches
        return [r if r is not None else ImageResult("", None, False, 0, 0, error="not run") for r in results]

    def memory_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {"device": self.device, "dtype": self.dtype, "backend": self.backend,
                                 "last_batch": dict(self.last_batch)}
        if self._torch_device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self._torch_device)
            stats.update(
                allocated_bytes=torch.cuda.memory_allocated(self._torch_device),
                reserved_bytes=torch.cuda.memory_reserved(self._torch_device),
                max_allocated_bytes=torch.cuda.max_memory_allocated(self._torch_device),
                free_bytes=free,
                total_bytes=total,
            )
        return stats

    def close(self) -> None:
        self._decode_pool.shutdown(wait=False)

    # ------------------------------------------------------------------ internals

    def _choose_backend(self) -> str:
        wanted = self.settings.backend
        if wanted == "auto":
            return "fast" if self._torch_device.type == "cuda" else "hf"
        if wanted not in ("fast", "hf"):
            raise ValueError(f"backend must be auto, fast or hf, not {wanted!r}")
        return wanted

    def _decode_or_error(self, data: bytes) -> np.ndarray | str:
        try:
            return decode_image(data, self.settings.min_pixels, self.settings.max_pixels, self.patch_grid.factor,
                                max_source_pixels=self.settings.max_source_pixels)  # fmt: skip
        except ImageDecodeError as exc:
            return str(exc)
        except Exception as exc:  # never let one image break the batch
            return f"cannot prepare image: {type(exc).__name__}: {exc}"

    def _prompt_token_ids(self, prompt: Prompt) -> tuple[list[int], list[int]]:
        with self._prompt_lock:
            cached = self._prompt_ids.get(prompt.version)
            if cached is None:
                before, after = prompt.chat_parts()
                cached = (
                    self.tokenizer.encode(before, add_special_tokens=False),
                    self.tokenizer.encode(after, add_special_tokens=False),
                )
                self._prompt_ids[prompt.version] = cached
            return cached

    def _row_layout(self, prompt: Prompt, before_ids: list[int], after_ids: list[int], height: int, width: int):
        """(token ids, rope positions (3, n), next position) of one prompt + image size; cached."""
        key = (prompt.version, height, width)
        layout = self._layouts.get(key)
        if layout is None:
            n_image = self.patch_grid.image_tokens(height, width)
            ids = torch.tensor(before_ids + [self._image_token_id] * n_image + after_ids, dtype=torch.long)
            pos, nxt = _mrope_positions(len(before_ids), height, width, len(after_ids), self.patch_grid.factor)
            layout = (ids, torch.from_numpy(pos), nxt)
            with self._prompt_lock:
                if len(self._layouts) > 4096:
                    self._layouts.clear()
                self._layouts[key] = layout
        return layout

    def _generate_rows(self, batch: PreparedBatch) -> list[ImageResult]:
        try:
            tokens = self._run_backend(batch)
        except torch.OutOfMemoryError:
            if self._torch_device.type == "cuda":
                torch.cuda.empty_cache()
            if batch.rows == 1:
                return [ImageResult("", None, False, batch.prompt_tokens[0], 0, error="out of GPU memory")]
            half = batch.rows // 2
            log.warning("out of GPU memory on %d images; retrying as %d + %d", batch.rows, half, batch.rows - half)
            first = self._generate_rows(batch.subset(list(range(half))))
            return first + self._generate_rows(batch.subset(list(range(half, batch.rows))))
        except Exception as exc:
            if self.backend == "fast":
                # The fast path is an optimisation: keep serving on the reference path.
                log.error("fast backend failed, switching to hf: %s", traceback.format_exc())
                self.backend = "hf"
                self._fast = None
                return self._generate_rows(batch)
            log.error("generate failed: %s", traceback.format_exc())
            why = f"generate failed: {type(exc).__name__}: {exc}"
            return [ImageResult("", None, False, n, 0, error=why) for n in batch.prompt_tokens]
        return self._finish(batch, tokens)

    def _run_backend(self, batch: PreparedBatch) -> torch.Tensor:
        """(rows, new_tokens) generated token ids on the CPU."""
        max_new = self.settings.max_new_tokens
        min_new = min(self.settings.min_new_tokens, max_new)
        if self._fast is not None:
            return self._fast.generate(batch, max_new, min_new, self._end_token_ids, self._pad_token_id)
        return self._hf_generate(batch, max_new, min_new)

    def _hf_generate(self, batch: PreparedBatch, max_new: int, min_new: int) -> torch.Tensor:
        dev = self._torch_device
        pixel_values = torch.cat(
            [normalise_and_patchify(img.unsqueeze(0), self.patch_grid) for img in batch.images], dim=0
        ).to(dev, self._dtype)
        grid_thw = torch.tensor([[1, *self.patch_grid.patches(h, w)] for h, w in batch.grids], dtype=torch.long,
                                device=dev)  # fmt: skip
        kwargs: dict[str, Any] = dict(
            input_ids=batch.input_ids.to(dev),
            attention_mask=batch.attention_mask.to(dev),
            pixel_values=pixel_values,
            image_grid_thw=grid_thw,
            max_new_tokens=max_new,
            min_new_tokens=min_new,
            do_sample=False,
            eos_token_id=self._end_token_ids,
            pad_token_id=self._pad_token_id,
        )
        if self._wants_token_types:
            # newer transformers compute multimodal rope positions from explicit token types
            kwargs["mm_token_type_ids"] = (batch.input_ids == self._image_token_id).to(torch.int32).to(dev)
        if self.settings.static_cache:
            kwargs["cache_implementation"] = "static"
        with torch.inference_mode():
            out = self.model.generate(**kwargs)
        return out[:, batch.input_ids.shape[1] :].cpu()

    def _finish(self, batch: PreparedBatch, tokens: torch.Tensor) -> list[ImageResult]:
        ends = set(self._end_token_ids)
        token_lists = []
        for row in tokens.tolist():
            kept = []
            for tok in row:
                if tok in ends:
                    break
                kept.append(tok)
            token_lists.append(kept)
        texts = self.tokenizer.batch_decode(token_lists, skip_special_tokens=True)
        results = []
        for row, text in enumerate(texts):
            analysis, ok = parse_analysis(text)
            generated = min(len(token_lists[row]) + 1, tokens.shape[1])  # the end token counts as generated
            results.append(ImageResult(text, analysis, ok, batch.prompt_tokens[row], generated))
        return results


def _mrope_positions(n_before: int, height: int, width: int, n_after: int, factor: int) -> tuple[np.ndarray, int]:
    """Qwen2-VL multimodal rope positions (3, n) for text + one image + text, and the next position.
    Text advances all three axes together; image tokens take (start, start+row, start+col)."""
    gh, gw = height // factor, width // factor
    before = np.broadcast_to(np.arange(n_before), (3, n_before))
    start = n_before
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    image = np.stack([np.zeros(gh * gw, dtype=np.int64), rows.ravel(), cols.ravel()]) + start
    after_start = start + max(gh, gw)
    after = np.broadcast_to(np.arange(n_after) + after_start, (3, n_after))
    pos = np.concatenate([before, image, after], axis=1).astype(np.int64)
    return pos, after_start + n_after
