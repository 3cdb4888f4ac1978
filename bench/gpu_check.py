"""On a GPU: does the fast backend compute what transformers computes, at the real architecture?

Builds one random-weights architecture, runs the same prepared images through ``model.forward``
(reference prefill logits) and the fast backend's prefill, and through both backends' greedy
generation; prints one JSON line with the relative logit error and the share of equal tokens
(bf16 rounding can flip a near-tie argmax, after which sequences diverge, so this is a share).

    python bench/gpu_check.py --arch qwen2-vl-2b --device cuda:0
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_server import synthetic_images  # noqa: E402
from imgpipe_dagster.gpu_server.image_prep import normalise_and_patchify  # noqa: E402
from imgpipe_dagster.gpu_server.inference import InferenceEngine  # noqa: E402
from imgpipe_dagster.gpu_server.tiny_model import build_tiny_model, write_random_weights_dir  # noqa: E402
from imgpipe_dagster.settings_map import medium_model_settings  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="qwen2-vl-2b")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.arch == "tiny":
            folder, random_weights = build_tiny_model(Path(tmp) / "tiny"), False
        else:
            folder, random_weights = write_random_weights_dir(Path(tmp) / args.arch, args.arch), True
        settings = medium_model_settings(str(folder), device=args.device, random_weights=random_weights,
                                         max_new_tokens=args.new_tokens, backend="fast")
        engine = InferenceEngine(settings)
        side = 448 if args.device.startswith("cuda") else 112
        batch = engine.prepare(synthetic_images(args.images, side, seed=3), "caption_short_v1")
        dev = torch.device(args.device)
        fast = engine._fast
        with torch.inference_mode():
            pixels = torch.cat([normalise_and_patchify(img.unsqueeze(0), engine.patch_grid) for img in batch.images]).to(
                dev, engine._dtype)  # fmt: skip
            grid = torch.tensor([[1, *engine.patch_grid.patches(h, w)] for h, w in batch.grids], device=dev)
            kwargs = dict(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                          pixel_values=pixels, image_grid_thw=grid)
            if engine._wants_token_types:
                kwargs["mm_token_type_ids"] = (batch.input_ids == engine._image_token_id).int().to(dev)
            reference = engine.model(**kwargs).logits[:, -1].float()
            state = fast._state(batch.rows, 512, args.new_tokens)
            feats = fast._vision_features(batch.images)
            hidden = fast._prefill_chunk(state, 0, kwargs["input_ids"], kwargs["attention_mask"],
                                         batch.position_ids.to(dev), feats)
            ours = fast._logits(hidden).float()
        rel = float((ours - reference).norm() / reference.norm())
        fast_tokens = fast.generate(batch, args.new_tokens, 0, engine._end_token_ids, engine._pad_token_id)
        engine.backend, engine._fast = "hf", None
        hf_tokens = engine._hf_generate(batch, args.new_tokens, 0)
        n = min(fast_tokens.shape[1], hf_tokens.shape[1])
        equal = float((fast_tokens[:, :n] == hf_tokens[:, :n]).float().mean())
        first_equal = float((fast_tokens[:, 0] == hf_tokens[:, 0]).float().mean())
    print(json.dumps(dict(event="gpu_check", arch=args.arch, device=args.device, dtype=engine.dtype,
                          prefill_logits_rel_err=round(rel, 5), first_token_equal=first_equal,
                          tokens_equal_share=round(equal, 3), seconds=round(time.perf_counter() - started, 1))),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
