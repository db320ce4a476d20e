"""GPU benchmark: jina-embeddings-v4 / Qwen2.5-VL-3B token_embed, tokenpool vs transformers, same run.

    python bench/gpu_qwen2_5_vl.py                  # text passages + 896x896 images
    python bench/gpu_qwen2_5_vl.py --passages 2000 --images 32

Needs torch, transformers, safetensors, numpy, Pillow. A random-weight Qwen2.5-VL with the real 3B
configuration (text: hidden 2048, 36 layers, 16 heads / 2 KV heads, MLP 11008; vision: 32 blocks of width
1280, windows of 112 px, full attention in blocks 7/15/23/31) is saved in Hugging Face layout and loaded by
both systems in bf16. Outputs: every token's last hidden state, L2-normalized, as float32 on the host.

(a) text: pre-tokenized passages, lognormal lengths (median 200, clipped to 16..512, seed 0). transformers
    runs length-sorted padded batches (sdpa).
(b) images: 896x896 random images (64x64 patches -> 1024 image tokens each) in the prompt
    "<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\\n".
    Both systems include the image preprocessing (the same transformers image processor).

MFU = achieved FLOP/s / measured bf16 matmul rate (8192^3 torch.mm). FLOPs: 2 x parameters touched per token
(text: per layer 2H(H + 2 KV) + 2H^2 + 6 H I; vision per patch: 2(3D^2 + D^2 + 3 D I_v), merger per image token
2(16 D^2 + 4 D H)) plus attention 4 x width x (keys attended) per query token per layer (causal text: (n+1)/2
keys on average; vision: its window or the whole image).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_token_embed import corpus, matmul_tflops, min_row_cosine, timed  # noqa: E402

TEXT = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
            num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            tie_word_embeddings=True)
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
              fullatt_block_indexes=[7, 15, 23, 31], window_size=112, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, tokens_per_second=2, hidden_act="silu")
TINY_TEXT = dict(TEXT, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]})
TINY_VISION = dict(VISION, depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                   fullatt_block_indexes=[1, 3])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMAGE_PAD, VISION_START, VISION_END = 151655, 151652, 151653
PREPROCESSOR = {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 14, "merge_size": 2,
                "temporal_patch_size": 2, "min_pixels": 3136, "max_pixels": 12845056,
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
# "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" ... "<|im_end|>\n" (text ids: stand-ins)
PREFIX = [151644, 872, 198, VISION_START, IMAGE_PAD, VISION_END]
SUFFIX = [74785, 279, 2168, 13, 151645, 198]


TINY = False


def build_checkpoint(folder: Path) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(text_config=TINY_TEXT if TINY else TEXT, vision_config=TINY_VISION if TINY else VISION, image_token_id=IMAGE_PAD,
                              video_token_id=151656, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
                              architectures=["Qwen2_5_VLForConditionalGeneration"])
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache() if DEVICE == "cuda" else None


def text_flops(passages: list[list[int]]) -> float:
    h, kv, inter, layers = 2048, 256, 11008, 36
    lengths = np.array([len(p) for p in passages], dtype=np.float64)
    per_token = layers * (2 * (h * (h + 2 * kv) + h * h + 3 * h * inter))
    attention = layers * 4 * h * float((lengths * (lengths + 1) / 2).sum())
    return per_token * lengths.sum() + attention


def image_flops(grid_h: int, grid_w: int, text_tokens: int) -> float:
    d, iv, depth, h = 1280, 3420, 32, 2048
    patches = grid_h * grid_w
    window = (112 // 14) ** 2  # patches per full window
    per_patch = depth * 2 * (4 * d * d + 3 * d * iv)
    attention = 4 * d * patches * (4 * patches + (depth - 4) * min(window, patches))
    merger = (patches // 4) * 2 * (16 * d * d + 4 * d * h)
    return per_patch * patches + attention + merger + text_flops([[0] * text_tokens])


class Baseline:
    """transformers' Qwen2.5-VL as users run it: padded batches, sdpa attention."""

    def __init__(self, folder: Path, dtype: torch.dtype):
        from transformers import AutoImageProcessor, Qwen2_5_VLForConditionalGeneration

        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            folder, dtype=dtype, attn_implementation="sdpa").to(DEVICE).eval().model
        self.processor = AutoImageProcessor.from_pretrained(folder)
        self.staging = None

    def host(self, out: torch.Tensor) -> torch.Tensor:
        if self.staging is None or self.staging.numel() < out.numel():
            self.staging = torch.empty(int(out.numel() * 1.25), dtype=torch.float32, pin_memory=DEVICE == "cuda")
        s = self.staging[: out.numel()]
        s.copy_(out.reshape(-1), non_blocking=True)
        torch.cuda.current_stream().synchronize() if DEVICE == "cuda" else None
        return s.clone().view(out.shape)

    @torch.inference_mode()
    def text(self, passages: list[list[int]], batch_tokens: int) -> list[torch.Tensor]:
        order = sorted(range(len(passages)), key=lambda i: len(passages[i]))
        results: list = [None] * len(passages)
        i = 0
        while i < len(order):
            j = i
            while j < len(order) and (j - i + 1) * len(passages[order[j]]) <= batch_tokens:
                j += 1
            idx = order[i:max(j, i + 1)]
            width = len(passages[idx[-1]])
            ids = torch.zeros((len(idx), width), dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, k in enumerate(idx):
                ids[row, : len(passages[k])] = torch.tensor(passages[k])
                mask[row, : len(passages[k])] = 1
            hidden = self.model(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE)).last_hidden_state
            out = self.host(F.normalize(hidden.float(), dim=-1))
            for row, k in enumerate(idx):
                results[k] = out[row, : len(passages[k])]
            i = max(j, i + 1)
        return results

    @torch.inference_mode()
    def images(self, images: list, batch: int) -> list[torch.Tensor]:
        from tokenpool.multimodal.types import mrope_positions

        results = []
        for i in range(0, len(images), batch):
            chunk = images[i:i + batch]
            processed = self.processor(images=chunk, return_tensors="pt")
            grids = processed["image_grid_thw"].tolist()
            seqs, positions = [], []
            for t, h, w in grids:
                ids = PREFIX[:4] + [IMAGE_PAD] * (t * h * w // 4) + PREFIX[5:] + SUFFIX
                seqs.append(ids)
                positions.append(mrope_positions(ids, IMAGE_PAD, [(t, h, w)], 2))
            ids = torch.tensor(seqs).to(DEVICE)  # same-size images: no padding
            pos = torch.from_numpy(np.stack(positions, 1)).to(DEVICE)  # [3, B, L]
            hidden = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=pos,
                                pixel_values=processed["pixel_values"].to(DEVICE),
                                image_grid_thw=processed["image_grid_thw"].to(DEVICE)).last_hidden_state
            out = self.host(F.normalize(hidden.float(), dim=-1))
            results.extend(out.unbind(0))
        return results


def _baseline(args, folder, dtype, passages, images, check_text, check_images, ref_text, ref_images, per_image,
              rows) -> None:
    """transformers' rates, the best of the probed batch sizes, appended to `rows`."""
    total_tokens = sum(len(p) for p in passages)
    base = Baseline(folder, getattr(torch, dtype))
    cos_b_text = min_row_cosine(base.text(check_text, 1 << 30), ref_text)
    cos_b_img = min_row_cosine(base.images(check_images, 1), ref_images)
    best = None
    for bt in args.hf_batch_tokens:
        try:
            base.text(passages[:100], bt)
            _, s = timed(lambda: base.text(passages[:1000], bt), DEVICE)
        except torch.OutOfMemoryError:
            print(f"transformers text batch_tokens={bt}: out of memory")
            torch.cuda.empty_cache() if DEVICE == "cuda" else None
            continue
        rate = sum(len(p) for p in passages[:1000]) / s
        print(f"probe transformers text batch_tokens={bt}: {rate:,.0f} tok/s", flush=True)
        best = max(best or (0, bt), (rate, bt))
    outs, seconds = timed(lambda: base.text(passages, best[1]), DEVICE)
    rows.append(("text", f"transformers (sdpa, {best[1]} padded tok/batch)", total_tokens / seconds,
                 text_flops(passages) / seconds, cos_b_text))
    del outs
    best = None
    for b in args.hf_image_batch:
        try:
            base.images(images[:b], b)
            _, s = timed(lambda: base.images(images[: 2 * b], b), DEVICE)
        except torch.OutOfMemoryError:
            print(f"transformers images batch={b}: out of memory")
            torch.cuda.empty_cache() if DEVICE == "cuda" else None
            continue
        rate = 2 * b / s
        print(f"probe transformers images batch={b}: {rate:.2f} images/s", flush=True)
        best = max(best or (0, b), (rate, b))
    outs, seconds = timed(lambda: base.images(images, best[1]), DEVICE)
    rows.append(("images", f"transformers (sdpa, {best[1]} images/batch)", len(images) / seconds,
                 per_image * len(images) / seconds, cos_b_img))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=5000)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=896)
    parser.add_argument("--budget", type=int, default=65536)
    parser.add_argument("--hf-batch-tokens", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--hf-image-batch", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--json", default=None)
    parser.add_argument("--skip-hf", action="store_true", help="tokenpool only (no transformers baseline)")
    parser.add_argument("--tiny", action="store_true", help="smoke test: a tiny config (runs on the CPU)")
    args = parser.parse_args()
    global TINY
    TINY = args.tiny
    dtype = "bfloat16" if DEVICE == "cuda" else "float32"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from PIL import Image

    from tokenpool import LLM, TokensPrompt

    peak = matmul_tflops(DEVICE)
    passages = [p[:-1] + [151643] for p in corpus(args.passages, 151000, 512)]
    total_tokens = sum(len(p) for p in passages)
    rng = np.random.default_rng(0)
    size = args.image_size
    images = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(args.images)]
    image_prompt = PREFIX + SUFFIX
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        build_checkpoint(folder)
        print(f"checkpoint built in {time.perf_counter() - t0:.1f}s", flush=True)

        # Correctness: tokenpool bf16 vs transformers fp32 on the same weights (GPU), text and image prompts.
        check_text = [p[:120] for p in passages[:3]]
        check_images = images[:2]
        reference = Baseline(folder, torch.float32)
        ref_text = reference.text(check_text, 1 << 30)
        ref_images = reference.images(check_images, 1)
        del reference
        torch.cuda.empty_cache() if DEVICE == "cuda" else None

        llm = LLM(str(folder), dtype=dtype, device=DEVICE, skip_tokenizer_init=True, max_num_batched_tokens=args.budget,
                  max_num_seqs=4096)
        text_prompts = [TokensPrompt(prompt_token_ids=p) for p in passages]
        img_prompts = [TokensPrompt(prompt_token_ids=image_prompt, multi_modal_data={"image": im}) for im in images]
        ours_text = [o.outputs.data for o in llm.encode([TokensPrompt(prompt_token_ids=p) for p in check_text],
                                                        pooling_task="token_embed", use_tqdm=False)]
        ours_img = [o.outputs.data for o in llm.encode(img_prompts[:2], pooling_task="token_embed", use_tqdm=False)]
        cos_text = min_row_cosine(ours_text, ref_text)
        cos_img = min_row_cosine(ours_img, ref_images)
        print(f"tokenpool bf16 vs transformers fp32: text min cos {cos_text:.5f}, image prompts min cos {cos_img:.5f}",
              flush=True)

        llm.encode(text_prompts[:500], pooling_task="token_embed", use_tqdm=False)  # warm-up (and compile)
        outs, seconds = timed(lambda: llm.encode(text_prompts, pooling_task="token_embed", use_tqdm=False), DEVICE)
        rows.append(("text", "tokenpool", total_tokens / seconds, text_flops(passages) / seconds, cos_text))
        del outs
        llm.encode(img_prompts[:4], pooling_task="token_embed", use_tqdm=False)
        t0 = time.perf_counter()
        for im in images:
            llm.llm_engine.processor.image_processor.image_processor(images=[im], return_tensors="pt")
        prep = (time.perf_counter() - t0) / len(images)
        outs, seconds = timed(lambda: llm.encode(img_prompts, pooling_task="token_embed", use_tqdm=False), DEVICE)
        n_tok = outs[0].outputs.data.shape[0]
        grid = int(math.sqrt((n_tok - len(image_prompt) + 1) * 4))
        per_image = image_flops(grid, grid, n_tok)
        rows.append(("images", "tokenpool", len(images) / seconds, per_image * len(images) / seconds, cos_img))
        print(f"image preprocessing (transformers processor, host): {prep * 1e3:.1f} ms/image; "
              f"{n_tok} tokens per image prompt", flush=True)
        del outs, llm
        torch.cuda.empty_cache() if DEVICE == "cuda" else None

        if not args.skip_hf:
            _baseline(args, folder, dtype, passages, images, check_text, check_images, ref_text, ref_images,
                      per_image, rows)

    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"\nQwen2.5-VL-3B shape, {name}, torch {torch.__version__}, bf16 matmul {peak:.0f} TFLOP/s; "
          f"text: {len(passages)} passages, {total_tokens:,} tokens; images: {len(images)} x {size}x{size}")
    print("| workload | system | rate | MFU | vs transformers | min cos vs fp32 transformers |")
    print("|---|---|---|---|---|---|")
    for workload, system, rate, flops, cos in rows:
        hf = next((r[2] for r in rows if r[0] == workload and r[1].startswith("transformers")), None)
        unit = "tok/s" if workload == "text" else "images/s"
        ratio = f"{rate / hf:.2f}x" if hf else "-"
        print(f"| {workload} | {system} | {rate:,.1f} {unit} | {flops / (peak * 1e12):.1%} | {ratio} | {cos:.5f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "peak_tflops": peak, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
