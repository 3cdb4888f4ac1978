"""Fast batched generation for Qwen2-VL / Qwen2.5-VL on the weights of a loaded HF model.

Why not ``model.generate``: at large batches its decode step is launch-bound (60-85 ms eager,
27 ms with its compiled static cache, against ~4 ms of real work for the 2B model), it computes
multimodal rope positions in a Python loop per sample, and the vision tower loops over images.
Here:
- vision: equal-size images run as one batched attention call per chunk (no per-image loop), the
  patch embedding folds the repeated still frame into one matmul, blocks optionally compiled;
  Qwen2.5-VL's window attention runs as one batched call per window shape (at most four per size);
- prefill: rows in chunks, writing keys/values straight into a static cache; rope positions come
  precomputed from ``InferenceEngine.prepare`` (CPU side);
- decode: one step function over static buffers (tokens, step counter, cache) that advances its own
  state, so the host loop is ``graph.replay()`` per token, captured once per (rows, cache length).

Math follows transformers' Qwen2-VL / Qwen2.5-VL modules op for op (tests compare vision features
with ``model.model.visual`` and tokens with ``model.generate`` on the tiny models).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from imgpipe_dagster.gpu_server.image_prep import (
    PatchGrid,
    normalise_and_patchify,
    normalise_and_patchify_single_frame,
)

log = logging.getLogger(__name__)

_MAX_CACHED_STATES = 2  # decode states (KV cache + graph) kept per engine; each holds a full KV cache


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_VISION_ACTS = {"quick_gelu": _quick_gelu, "gelu": F.gelu, "silu": F.silu}


# ---------------------------------------------------------------- per-layer functions (compilable)


def _attn_in(x, ln_w, eps, wqkv, bqkv, cos, sin, n_q, n_kv, head_dim):
    """RMSNorm + fused qkv projection + rope. x (B, T, H) -> q (B, n_q, T, D), k, v (B, n_kv, T, D)."""
    b, t, _ = x.shape
    h = _rms_norm(x, ln_w, eps)
    qkv = F.linear(h, wqkv, bqkv)
    q, k, v = qkv.split([n_q * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    q = q.view(b, t, n_q, head_dim).transpose(1, 2)
    k = k.view(b, t, n_kv, head_dim).transpose(1, 2)
    v = v.view(b, t, n_kv, head_dim).transpose(1, 2)
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    return q, k, v


def _attn_out_mlp(x, attn, wo, ln_w, eps, wgu, wd):
    """o_proj + residual, RMSNorm + SwiGLU MLP + residual. attn (B, T, n_q*D)."""
    x = x + F.linear(attn, wo)
    h = _rms_norm(x, ln_w, eps)
    gate, up = F.linear(h, wgu).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, wd)


def _vision_qkv(h, wqkv, bqkv, cos, sin, heads):
    """Fused qkv projection + rope (applied in float32, as transformers does).
    h (n, P, E) -> q, k, v (n, P, heads, D); cos/sin (P, D) float32."""
    n, p, e = h.shape
    q, k, v = F.linear(h, wqkv, bqkv).view(n, p, 3, heads, e // heads).unbind(2)
    cos = cos.unsqueeze(-2)
    sin = sin.unsqueeze(-2)
    qf, kf = q.float(), k.float()
    q = (qf * cos + _rotate_half(qf) * sin).to(h.dtype)
    k = (kf * cos + _rotate_half(kf) * sin).to(h.dtype)
    return q, k, v


def _vision_block(x, cos, sin, n1w, n1b, wqkv, bqkv, wproj, bproj, n2w, n2b, w1, b1, w2, b2, heads, act):
    """One Qwen2-VL vision block on equal-size images. x (n, P, E); cos/sin (P, D) float32."""
    n, p, e = x.shape
    h = F.layer_norm(x, (e,), n1w, n1b, 1e-6)
    q, k, v = _vision_qkv(h, wqkv, bqkv, cos, sin, heads)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    x = x + F.linear(o.transpose(1, 2).reshape(n, p, e), wproj, bproj)
    h = F.layer_norm(x, (e,), n2w, n2b, 1e-6)
    return x + F.linear(act(F.linear(h, w1, b1)), w2, b2)


def _windowed_vision_block(x, cos, sin, segments, n1w, wqkv, bqkv, wproj, bproj, n2w, wgu, bgu, wd, bd, heads, act):
    """One Qwen2.5-VL vision block on equal-size images whose tokens are laid out window by window.

    x (n, P, E); cos/sin (P, D) float32. segments: ((windows, tokens per window), ...) covering the P
    tokens in order; attention stays inside each window. A full-attention block passes ((1, P),).
    The segments are shape constants of the image size, so the loop unrolls the same way each call.
    """
    n, p, e = x.shape
    d = e // heads
    h = _rms_norm(x, n1w, 1e-6)
    q, k, v = _vision_qkv(h, wqkv, bqkv, cos, sin, heads)
    outs = []
    start = 0
    for windows, length in segments:
        end = start + windows * length
        qw, kw, vw = (t[:, start:end].reshape(n * windows, length, heads, d).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qw, kw, vw)
        outs.append(o.transpose(1, 2).reshape(n, end - start, e))
        start = end
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    x = x + F.linear(o, wproj, bproj)
    h = _rms_norm(x, n2w, 1e-6)
    gate, up = F.linear(h, wgu, bgu).chunk(2, dim=-1)
    return x + F.linear(act(gate) * up, wd, bd)


class _CompiledOrEager:
    """torch.compile'd function that falls back to eager for good if compiling fails: compilation
    is an optimisation, and a server must keep serving on a platform where it breaks."""

    def __init__(self, fn):
        self.eager = fn
        self.compiled = torch.compile(fn, dynamic=False)
        self.failed = False

    def __call__(self, *args):
        if not self.failed:
            try:
                return self.compiled(*args)
            except Exception:
                log.exception("torch.compile of %s failed; running it eagerly", self.eager.__name__)
                self.failed = True
        return self.eager(*args)


class _StageClock:
    """Seconds per named stage; CUDA events on a GPU, so timing adds no synchronisation."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[str, object, object]] = []

    @contextmanager
    def __call__(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self.spans.append((name, start, end))

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, start, end in self.spans:
            seconds = start.elapsed_time(end) / 1000.0 if self.cuda else end - start
            out[f"{name}_s"] = round(out.get(f"{name}_s", 0.0) + seconds, 4)
        return out


@dataclass
class _DecodeState:
    """Static buffers of one (rows, cache length) shape; a CUDA graph replays over them."""

    rows: int
    slots: int
    k_cache: list[torch.Tensor]
    v_cache: list[torch.Tensor]
    tokens: torch.Tensor  # (rows,) token fed at the current step
    step: torch.Tensor  # () index of the current decode step
    prefix_len: torch.Tensor  # () padded prompt length L
    prefix_valid: torch.Tensor  # (rows, slots) real prompt tokens
    base_position: torch.Tensor  # (rows,) rope position of generated token 0
    finished: torch.Tensor  # (rows,) an end token was produced
    out: torch.Tensor  # (rows, max_new) generated tokens
    min_new: torch.Tensor  # () end tokens are suppressed before this many tokens
    slot_range: torch.Tensor  # (slots,) 0..slots-1
    graph: object | None = None


@dataclass(frozen=True)
class _WindowLayout:
    """Qwen2.5-VL window attention for one image size (see FastQwenVL._window_layout)."""

    order: torch.Tensor  # (units,) merged-unit index at each position of the window order
    restore: torch.Tensor  # (units,) inverse of order
    window_segments: tuple[tuple[int, int], ...]  # (windows, tokens per window) per window shape
    full_segments: tuple[tuple[int, int], ...]  # ((1, all tokens),)
    cos: torch.Tensor  # (tokens, head_dim) rope in window order
    sin: torch.Tensor


class FastQwenVL:
    def __init__(self, model, config, dtype: torch.dtype, settings):
        self.model = model
        self.dtype = dtype
        self.settings = settings
        self.device = next(model.parameters()).device
        self.model_type = config.model_type
        text = getattr(config, "text_config", config)
        self.n_layers = text.num_hidden_layers
        self.hidden = text.hidden_size
        self.n_q = text.num_attention_heads
        self.n_kv = text.num_key_value_heads
        self.head_dim = getattr(text, "head_dim", None) or self.hidden // self.n_q
        self.eps = text.rms_norm_eps
        rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
        theta = rope.get("rope_theta") or getattr(text, "rope_theta", 1000000.0)
        self.mrope_section = list(rope.get("mrope_section") or [16, 24, 24])
        half = self.head_dim // 2
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim))
        self.inv_freq = self.inv_freq.to(self.device)
        # rope axis (0 = time, 1 = height, 2 = width) of each of the head_dim/2 frequencies
        axis = torch.cat([torch.full((n,), i % 3) for i, n in enumerate(self.mrope_section)])
        if axis.numel() != half:
            raise ValueError(f"mrope sections {self.mrope_section} do not cover head_dim/2={half}")
        self.freq_axis = axis.to(self.device)

        inner = model.model
        lm = inner.language_model
        self.embed = lm.embed_tokens.weight
        self.final_norm = lm.norm.weight
        self.lm_head = model.lm_head.weight
        self.layers = [self._fuse_text_layer(layer) for layer in lm.layers]
        self.image_token_id = config.image_token_id

        self.visual = inner.visual
        self.patch_grid = PatchGrid.from_vision_config(config.vision_config)
        self.fast_vision = self.model_type in ("qwen2_vl", "qwen2_5_vl")
        # Qwen2.5-VL: RMSNorm + SwiGLU blocks, attention inside windows except at a few full blocks.
        self.windowed_vision = self.model_type == "qwen2_5_vl"
        if self.fast_vision:
            self._init_vision(config.vision_config)

        self._attn_in = _attn_in
        self._attn_out_mlp = _attn_out_mlp
        self._vision_block = _windowed_vision_block if self.windowed_vision else _vision_block
        if settings.compile_language:
            self._attn_in = _CompiledOrEager(_attn_in)
            self._attn_out_mlp = _CompiledOrEager(_attn_out_mlp)
        if settings.compile_vision and self.fast_vision:
            self._vision_block = _CompiledOrEager(self._vision_block)
        if settings.compile_language or settings.compile_vision:
            import torch._dynamo as dynamo

            # One compiled graph per distinct shape (chunk rows, prompt length, decode rows).
            dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
        self.use_graphs = settings.cuda_graphs and self.device.type == "cuda"
        self._states: OrderedDict[tuple[int, int], _DecodeState] = OrderedDict()
        self._graph_pool = None
        self._rope_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._window_layouts: dict[tuple[int, int], _WindowLayout] = {}
        self.last_timings: dict = {}

    # ------------------------------------------------------------ weights

    @torch.no_grad()
    def _fuse_text_layer(self, layer) -> dict:
        """Concatenate q/k/v and gate/up weights (one matmul each) and point the HF modules at
        views of the fused tensors, so the fallback path keeps working without a second copy."""
        att, mlp = layer.self_attn, layer.mlp
        wqkv = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight], dim=0).contiguous()
        bqkv = torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias], dim=0).contiguous()
        wgu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0).contiguous()
        nq, nkv = self.n_q * self.head_dim, self.n_kv * self.head_dim
        att.q_proj.weight.data = wqkv[:nq]
        att.k_proj.weight.data = wqkv[nq : nq + nkv]
        att.v_proj.weight.data = wqkv[nq + nkv :]
        att.q_proj.bias.data = bqkv[:nq]
        att.k_proj.bias.data = bqkv[nq : nq + nkv]
        att.v_proj.bias.data = bqkv[nq + nkv :]
        inter = mlp.gate_proj.weight.shape[0]
        mlp.gate_proj.weight.data = wgu[:inter]
        mlp.up_proj.weight.data = wgu[inter:]
        return dict(
            ln1=layer.input_layernorm.weight.detach(),
            wqkv=wqkv.detach(),
            bqkv=bqkv.detach(),
            wo=att.o_proj.weight.detach(),
            ln2=layer.post_attention_layernorm.weight.detach(),
            wgu=wgu.detach(),
            wd=mlp.down_proj.weight.detach(),
        )

    def _init_vision(self, vcfg) -> None:
        vis = self.visual
        self.v_heads = vcfg.num_heads
        self.v_act = _VISION_ACTS[getattr(vcfg, "hidden_act", "quick_gelu")]
        self.merge = vcfg.spatial_merge_size
        w = vis.patch_embed.proj.weight.detach()  # (E, 3, T, p, p)
        self.v_embed = w.shape[0]
        # The still frame is repeated over the temporal patch, so sum the kernel's time slices.
        self.patch_w = w.float().sum(dim=2).reshape(w.shape[0], -1).to(w.dtype)
        m = vis.merger
        if self.windowed_vision:
            self.v_blocks = [self._fuse_windowed_vision_block(blk) for blk in vis.blocks]
            self.merger = (m.ln_q.weight.detach(), m.mlp[0].weight.detach(), m.mlp[0].bias.detach(),
                           m.mlp[2].weight.detach(), m.mlp[2].bias.detach())
            # window side in merged units (window_size is in pixels)
            self.v_window = vcfg.window_size // self.merge // vcfg.patch_size
            self.v_full_blocks = frozenset(vcfg.fullatt_block_indexes)
        else:
            self.v_blocks = []
            for blk in vis.blocks:
                self.v_blocks.append(
                    tuple(
                        t.detach()
                        for t in (
                            blk.norm1.weight, blk.norm1.bias, blk.attn.qkv.weight, blk.attn.qkv.bias,
                            blk.attn.proj.weight, blk.attn.proj.bias, blk.norm2.weight, blk.norm2.bias,
                            blk.mlp.fc1.weight, blk.mlp.fc1.bias, blk.mlp.fc2.weight, blk.mlp.fc2.bias,
                        )
                    )
                )
            self.merger = (m.ln_q.weight.detach(), m.ln_q.bias.detach(), m.mlp[0].weight.detach(),
                           m.mlp[0].bias.detach(), m.mlp[2].weight.detach(), m.mlp[2].bias.detach())
        rope = getattr(vcfg, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", 10000.0) if isinstance(rope, dict) else 10000.0
        spatial = (self.v_embed // self.v_heads) // 2
        self.v_inv_freq = (1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))).to(
            self.device
        )

    @torch.no_grad()
    def _fuse_windowed_vision_block(self, blk) -> tuple:
        """Qwen2.5-VL block weights with gate/up fused into one matmul; the HF modules are pointed at
        views of the fused tensors (as for the text layers), so nothing is held twice."""
        mlp = blk.mlp
        wgu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0).contiguous()
        bgu = torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias], dim=0).contiguous()
        inter = mlp.gate_proj.weight.shape[0]
        mlp.gate_proj.weight.data, mlp.up_proj.weight.data = wgu[:inter], wgu[inter:]
        mlp.gate_proj.bias.data, mlp.up_proj.bias.data = bgu[:inter], bgu[inter:]
        return tuple(
            t.detach()
            for t in (
                blk.norm1.weight, blk.attn.qkv.weight, blk.attn.qkv.bias, blk.attn.proj.weight,
                blk.attn.proj.bias, blk.norm2.weight, wgu, bgu, mlp.down_proj.weight, mlp.down_proj.bias,
            )
        )

    # ------------------------------------------------------------ vision

    def _vision_rope(self, gh: int, gw: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (gh, gw)
        if key not in self._rope_cache:
            m = self.merge
            hpos = torch.arange(gh).unsqueeze(1).expand(gh, gw)
            wpos = torch.arange(gw).unsqueeze(0).expand(gh, gw)

            def merge_order(t):
                return t.reshape(gh // m, m, gw // m, m).permute(0, 2, 1, 3).flatten()

            hpos, wpos = merge_order(hpos).to(self.device), merge_order(wpos).to(self.device)
            angles = torch.cat([hpos[:, None] * self.v_inv_freq, wpos[:, None] * self.v_inv_freq], dim=-1)
            emb = torch.cat([angles, angles], dim=-1)
            self._rope_cache[key] = (emb.cos(), emb.sin())
        return self._rope_cache[key]

    def _vision_features(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Image tokens (sum of per-image tokens, hidden) in image order."""
        out: list[torch.Tensor | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(tuple(img.shape[:2]), []).append(i)
        for (height, width), idx in groups.items():
            batch = torch.stack([images[i] for i in idx]).to(self.device, non_blocking=True)
            feats = self._vision_group(batch, height, width)
            per = feats.shape[0] // len(idx)
            for j, i in enumerate(idx):
                out[i] = feats[j * per : (j + 1) * per]
        return torch.cat(out, dim=0)

    def _window_layout(self, gh: int, gw: int) -> _WindowLayout:
        """Token order for Qwen2.5-VL window attention on a gh x gw patch grid.

        Windows are ws x ws merged units, cut from the top-left as in transformers'
        get_vision_window_index; where the grid is not a multiple of ws the last row/column of
        windows is smaller. Windows of one shape are laid out next to each other (at most four
        shapes: full, right edge, bottom edge, corner), so each shape is one batched attention call
        with no padding or mask. Attention ignores token order and the merger works per merged unit,
        so any window order gives the same features once the merger output is put back in order.
        """
        key = (gh, gw)
        if key not in self._window_layouts:
            m, ws = self.merge, self.v_window
            rows, cols = gh // m, gw // m
            by_shape: dict[tuple[int, int], list[int]] = {}
            for top in range(0, rows, ws):
                for left in range(0, cols, ws):
                    height, width = min(ws, rows - top), min(ws, cols - left)
                    units = by_shape.setdefault((height, width), [])
                    units.extend((top + r) * cols + left + c for r in range(height) for c in range(width))
            unit = m * m
            segments = tuple((len(units) // (h * w), h * w * unit) for (h, w), units in by_shape.items())
            order = torch.tensor([u for units in by_shape.values() for u in units], device=self.device)
            cos, sin = self._vision_rope(gh, gw)
            self._window_layouts[key] = _WindowLayout(
                order=order,
                restore=torch.argsort(order),
                window_segments=segments,
                full_segments=((1, rows * cols * unit),),
                cos=cos.view(rows * cols, unit, -1)[order].reshape(rows * cols * unit, -1),
                sin=sin.view(rows * cols, unit, -1)[order].reshape(rows * cols * unit, -1),
            )
        return self._window_layouts[key]

    def _windowed_vision_group(self, batch: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        n = batch.shape[0]
        layout = self._window_layout(gh, gw)
        units, unit = layout.order.numel(), self.merge**2
        pixels = normalise_and_patchify_single_frame(batch, self.patch_grid, self.dtype)
        # Reorder before the patch embedding: pixel rows are narrower than embeddings.
        pixels = pixels.view(n, units, unit, -1)[:, layout.order].reshape(n, units * unit, -1)
        x = F.linear(pixels, self.patch_w)
        for i, weights in enumerate(self.v_blocks):
            segments = layout.full_segments if i in self.v_full_blocks else layout.window_segments
            x = self._vision_block(x, layout.cos, layout.sin, segments, *weights, self.v_heads, self.v_act)
        lnw, w1, b1, w2, b2 = self.merger
        h = _rms_norm(x, lnw, 1e-6).reshape(n, units, self.v_embed * unit)
        merged = F.linear(F.gelu(F.linear(h, w1, b1)), w2, b2)
        return merged[:, layout.restore].reshape(n * units, -1)

    def _vision_group(self, batch: torch.Tensor, height: int, width: int) -> torch.Tensor:
        n = batch.shape[0]
        gh, gw = self.patch_grid.patches(height, width)
        if self.windowed_vision:
            return self._windowed_vision_group(batch, gh, gw)
        if not self.fast_vision:
            pixels = normalise_and_patchify(batch, self.patch_grid, self.dtype)
            grid = torch.tensor([[1, gh, gw]] * n, device=self.device)
            res = self.visual(pixels, grid_thw=grid)
            return res.pooler_output if hasattr(res, "pooler_output") else res
        pixels = normalise_and_patchify_single_frame(batch, self.patch_grid, self.dtype)
        x = F.linear(pixels, self.patch_w).view(n, gh * gw, self.v_embed)
        cos, sin = self._vision_rope(gh, gw)
        for weights in self.v_blocks:
            x = self._vision_block(x, cos, sin, *weights, self.v_heads, self.v_act)
        lnw, lnb, w1, b1, w2, b2 = self.merger
        h = F.layer_norm(x, (self.v_embed,), lnw, lnb, 1e-6).reshape(-1, self.v_embed * self.merge**2)
        return F.linear(F.gelu(F.linear(h, w1, b1)), w2, b2)

    # ------------------------------------------------------------ language model

    def _rope_cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (3, B, T) -> cos, sin (B, T, head_dim) in the model dtype (mrope sections)."""
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq  # (3, B, T, D/2)
        picked = torch.gather(
            angles, 0, self.freq_axis.view(1, 1, 1, -1).expand(1, *angles.shape[1:])
        ).squeeze(0)
        emb = torch.cat([picked, picked], dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _prefill_chunk(self, state: _DecodeState, r0: int, ids, mask, positions, feats) -> torch.Tensor:
        """Run rows r0.. of the prompt through the LM, filling the cache; returns last-position hidden."""
        c, length = ids.shape
        x = F.embedding(ids, self.embed)
        image_positions = ids == self.image_token_id
        x[image_positions] = feats.to(x.dtype)
        cos, sin = self._rope_cos_sin(positions)
        padded = not bool(mask.all())
        attn_mask = None
        if padded:
            causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
            attn_mask = causal & mask.bool()[:, None, None, :]
            # A padding query attends only to itself: finite values, never read by real tokens.
            attn_mask = attn_mask | torch.eye(length, dtype=torch.bool, device=ids.device)
        groups = self.n_q // self.n_kv
        for i, w in enumerate(self.layers):
            q, k, v = self._attn_in(x, w["ln1"], self.eps, w["wqkv"], w["bqkv"], cos, sin,
                                    self.n_q, self.n_kv, self.head_dim)
            state.k_cache[i][r0 : r0 + c, :, :length] = k
            state.v_cache[i][r0 : r0 + c, :, :length] = v
            if groups > 1:
                k = k.repeat_interleave(groups, dim=1)
                v = v.repeat_interleave(groups, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=not padded)
            o = o.transpose(1, 2).reshape(c, length, -1)
            x = self._attn_out_mlp(x, o, w["wo"], w["ln2"], self.eps, w["wgu"], w["wd"])
        return x[:, -1]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(_rms_norm(hidden, self.final_norm, self.eps), self.lm_head)

    def _pick(self, logits: torch.Tensor, finished: torch.Tensor, min_new: torch.Tensor, produced) -> torch.Tensor:
        """Greedy token; end tokens suppressed while fewer than min_new tokens exist; pad after the end."""
        logits = logits.masked_fill(self._end_mask & (produced < min_new), float("-inf"))
        nxt = logits.argmax(dim=-1)
        return torch.where(finished, torch.full_like(nxt, self._pad_id), nxt)

    def _decode_step(self, state: _DecodeState) -> None:
        """Feed state.tokens at slot L+step; write the next token; advance. Static shapes only."""
        rows = state.rows
        slot = state.prefix_len + state.step
        x = F.embedding(state.tokens, self.embed).unsqueeze(1)  # (rows, 1, H)
        pos = (state.base_position + state.step).view(1, rows, 1).expand(3, rows, 1)
        cos, sin = self._rope_cos_sin(pos)
        valid = state.prefix_valid | ((state.slot_range >= state.prefix_len) & (state.slot_range <= slot))
        zero = torch.zeros((), dtype=self.dtype, device=valid.device)
        attn_mask = torch.where(valid, zero, float("-inf")).view(rows, 1, 1, state.slots)
        slot_index = slot.view(1)
        groups = self.n_q // self.n_kv
        for i, w in enumerate(self.layers):
            q, k, v = self._attn_in(x, w["ln1"], self.eps, w["wqkv"], w["bqkv"], cos, sin,
                                    self.n_q, self.n_kv, self.head_dim)
            state.k_cache[i].index_copy_(2, slot_index, k)
            state.v_cache[i].index_copy_(2, slot_index, v)
            # Grouped-query attention as plain attention: the query heads of one kv head form its
            # "query length", so no repeated keys/values are materialised.
            qg = q.reshape(rows, self.n_kv, groups, self.head_dim)
            o = F.scaled_dot_product_attention(qg, state.k_cache[i], state.v_cache[i], attn_mask=attn_mask)
            x = self._attn_out_mlp(x, o.reshape(rows, 1, -1), w["wo"], w["ln2"], self.eps, w["wgu"], w["wd"])
        logits = self._logits(x[:, 0])
        nxt = self._pick(logits, state.finished, state.min_new, state.step + 1)
        state.out.index_copy_(1, (state.step + 1).view(1), nxt.unsqueeze(1))
        state.finished |= self._end_mask[nxt]
        state.tokens.copy_(nxt)
        state.step += 1

    # ------------------------------------------------------------ driver

    def _state(self, rows: int, slots: int, max_new: int) -> _DecodeState:
        key = (rows, slots)
        state = self._states.get(key)
        if state is not None and state.out.shape[1] == max_new:
            self._states.move_to_end(key)
            return state
        while len(self._states) >= _MAX_CACHED_STATES:
            self._states.popitem(last=False)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        dev = self.device
        shape = (rows, self.n_kv, slots, self.head_dim)
        state = _DecodeState(
            rows=rows,
            slots=slots,
            k_cache=[torch.zeros(shape, dtype=self.dtype, device=dev) for _ in range(self.n_layers)],
            v_cache=[torch.zeros(shape, dtype=self.dtype, device=dev) for _ in range(self.n_layers)],
            tokens=torch.zeros(rows, dtype=torch.long, device=dev),
            step=torch.zeros((), dtype=torch.long, device=dev),
            prefix_len=torch.zeros((), dtype=torch.long, device=dev),
            prefix_valid=torch.ones(rows, slots, dtype=torch.bool, device=dev),
            base_position=torch.zeros(rows, dtype=torch.long, device=dev),
            finished=torch.zeros(rows, dtype=torch.bool, device=dev),
            out=torch.zeros(rows, max_new, dtype=torch.long, device=dev),
            min_new=torch.zeros((), dtype=torch.long, device=dev),
            slot_range=torch.arange(slots, device=dev),
        )
        self._states[key] = state
        return state

    @staticmethod
    def _bucket_rows(rows: int) -> int:
        """Decode rows rounded up, so a few graph shapes serve every batch size."""
        if rows <= 64:
            return 1 << max(0, math.ceil(math.log2(rows)))
        return (rows + 63) // 64 * 64

    @torch.inference_mode()
    def generate(self, batch, max_new: int, min_new: int, end_ids: list[int], pad_id: int) -> torch.Tensor:
        dev = self.device
        end_mask = torch.zeros(self.lm_head.shape[0], dtype=torch.bool, device=dev)
        end_mask[[i for i in end_ids if i < end_mask.numel()]] = True
        if not hasattr(self, "_end_mask") or not torch.equal(self._end_mask, end_mask):
            self._end_mask = end_mask  # read by captured graphs: replaced only when the end tokens change
            for old in self._states.values():
                old.graph = None
        self._pad_id = pad_id
        rows, length = batch.input_ids.shape
        decode_rows = self._bucket_rows(rows) if self.use_graphs else rows
        slots = (length + max_new + 63) // 64 * 64
        state = self._state(decode_rows, slots, max_new)

        ids_all = batch.input_ids.to(dev, non_blocking=True)
        mask_all = batch.attention_mask.to(dev, non_blocking=True)
        pos_all = batch.position_ids.to(dev, non_blocking=True)
        state.prefix_len.fill_(length)
        state.prefix_valid.fill_(True)  # padding rows of the bucket attend to anything finite
        state.prefix_valid[:rows].fill_(False)
        state.prefix_valid[:rows, :length] = mask_all.bool()
        state.base_position.zero_()
        state.base_position[:rows] = batch.next_position.to(dev)
        state.finished.zero_()
        state.min_new.fill_(min_new)
        state.step.zero_()
        state.out.fill_(pad_id)

        chunk = max(1, self.settings.chunk_size)
        first = torch.empty(rows, dtype=torch.long, device=dev)
        clock = _StageClock(dev)
        for r0 in range(0, rows, chunk):
            r1 = min(rows, r0 + chunk)
            with clock("vision"):
                feats = self._vision_features(batch.images[r0:r1])
            with clock("prefill"):
                hidden = self._prefill_chunk(state, r0, ids_all[r0:r1], mask_all[r0:r1], pos_all[:, r0:r1], feats)
            not_done = torch.zeros(r1 - r0, dtype=torch.bool, device=dev)
            first[r0:r1] = self._pick(self._logits(hidden), not_done, state.min_new, 0)
        state.tokens.zero_()
        state.tokens[:rows] = first
        state.out[:, 0] = state.tokens
        state.finished[:rows] = self._end_mask[first]

        steps = max_new - 1
        with clock("decode"):
            if steps > 0:
                if self.use_graphs:
                    self._run_graph(state, steps, min_new, rows)
                else:
                    for k in range(steps):
                        self._decode_step(state)
                        if k >= min_new and k % 16 == 15 and bool(state.finished[:rows].all()):
                            break
        tokens = state.out[:rows].cpu()
        self.last_timings = dict(clock.totals(), rows=rows, decode_rows=decode_rows, slots=slots)
        return tokens

    def _run_graph(self, state: _DecodeState, steps: int, min_new: int, rows: int) -> None:
        if state.graph is None:
            saved = (state.tokens.clone(), state.out.clone(), state.finished.clone())
            try:
                state.graph = self._capture(state)
            except Exception:
                # A step that cannot be captured still runs eagerly (slower, launch-bound).
                log.exception("CUDA graph capture of the decode step failed; decoding eagerly")
                self.use_graphs = False
            state.step.zero_()
            state.tokens.copy_(saved[0])
            state.out.copy_(saved[1])
            state.finished.copy_(saved[2])
        rows_done = state.finished[:rows]
        for k in range(steps):
            if state.graph is not None:
                state.graph.replay()
            else:
                self._decode_step(state)
            if k >= min_new and k % 16 == 15 and bool(rows_done.all()):
                break

    def _capture(self, state: _DecodeState):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: compiles, and lets cuBLAS pick its kernels outside capture
                self._decode_step(state)
        torch.cuda.current_stream().wait_stream(side)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: /health may query CUDA memory from another thread while we capture
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
            self._decode_step(state)
        return graph
