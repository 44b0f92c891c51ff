"""Answer a test problem with an exported model, through transformers alone (no geo3k code):

    python examples/generate.py runs/demo-hf demo_data/test.parquet --row 0

`geo3k export` writes a Hugging Face folder (safetensors, config.json, tokenizer, processor config, chat
template); this loads it with AutoModelForImageTextToText and AutoProcessor, builds the prompt the way the
shards were built (each image at its `<image>` placeholder in the user turn, then the assistant header) and
generates greedily. It prints the question, the gold answer and the generated text.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow.parquet as pq
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import logging as hf_logging


def open_image(ref: str, base: Path) -> Image.Image:
    """A `file://` URL or a path (relative to the parquet file's folder), as the demo data writes them."""
    path = Path(unquote(urlparse(ref).path)) if ref.startswith("file://") else Path(ref)
    return Image.open(path if path.is_absolute() else base / path).convert("RGB")


def user_turn(problem: str, images: list[Image.Image]) -> list[dict]:
    parts = problem.split("<image>")
    if len(parts) - 1 != len(images):
        raise SystemExit(f"the problem has {len(parts) - 1} <image> placeholder(s) but {len(images)} image(s)")
    content: list[dict] = []
    for i, text in enumerate(parts):
        if text:
            content.append({"type": "text", "text": text})
        if i < len(images):
            content.append({"type": "image"})
    return [{"role": "user", "content": content}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="an exported model folder (geo3k export ... --out DIR)")
    ap.add_argument("problems", type=Path, help="a parquet file with problem, answer and images columns")
    ap.add_argument("--row", type=int, default=0, help="which problem to answer")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()

    hf_logging.disable_progress_bar()  # one line per step of the demo, not a weight-loading bar
    t0 = time.perf_counter()
    processor = AutoProcessor.from_pretrained(str(args.model))
    model = AutoModelForImageTextToText.from_pretrained(str(args.model), dtype=torch.float32).eval()
    num_params = sum(p.numel() for p in model.parameters())
    print(f"loaded {args.model}: {type(model).__name__}, {num_params / 1e6:.1f}M parameters, {type(processor).__name__} "
          f"({time.perf_counter() - t0:.1f}s)")

    row = pq.read_table(args.problems).slice(args.row, 1).to_pylist()[0]
    images = [open_image(ref, args.problems.parent) for ref in row["images"]]
    text = processor.apply_chat_template(user_turn(row["problem"], images), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=images, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=args.max_new_tokens)
    new_ids = out[0, inputs["input_ids"].shape[1] :]
    generated = processor.tokenizer.decode(new_ids, skip_special_tokens=True)

    print(f"question   {row['problem']!r} (row {args.row} of {args.problems}, image {images[0].width}x{images[0].height} px)")
    print(f"gold       {row['answer']!r}")
    print(f"generated  {generated!r} (greedy: {len(new_ids)} new tokens of at most {args.max_new_tokens}, after {inputs['input_ids'].shape[1]} prompt tokens)")


if __name__ == "__main__":
    main()
