#!/usr/bin/env python
"""CPU smoke run of what exists today: tiny open_clip model + BiPathCLIP + AlipLoss on real photos.

This is what `make demo` runs until the full demo (generated data -> shards -> DALI -> trainer ->
eval, three objectives compared) lands. It trains the ALIP-Tiny model for a few dozen AdamW steps
on the scikit-image sample photos, each with a clean caption and a raw text of which some are
web-style noise, and prints the losses and the gate weights of clean vs noisy pairs. It shows the
pieces run together; it is not evidence that ALIP beats CLIP (that is the demo's job).
"""

import argparse
import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from skimage import data as skdata

import alip

# (skimage photo, synthetic caption, raw web text, raw text is noise)
SAMPLES = [
    (
        "astronaut",
        "a woman in a space suit in front of a flag",
        "NASA astronaut official portrait #space",
        False,
    ),
    ("chelsea", "a close up of a tabby cat", "IMG_2093.JPG", True),
    ("coffee", "a cup of coffee on a saucer", "morning coffee in a white cup", False),
    ("rocket", "a rocket on a launch pad", "#photooftheday #love", True),
    ("horse", "a silhouette of a horse", "black horse silhouette drawing", False),
    ("hubble_deep_field", "a field of stars and galaxies", "my cat sleeping on the sofa", True),
    ("camera", "a man with a camera on a tripod", "photographer with an old camera", False),
    ("immunohistochemistry", "a microscope image of stained cells", "DSC_0042", True),
]


def load_images(size: int) -> torch.Tensor:
    images = []
    for name, *_ in SAMPLES:
        img = getattr(skdata, name)()
        if img.ndim == 2:  # grayscale photos -> 3 channels
            img = np.stack([img] * 3, axis=-1)
        x = torch.from_numpy(np.ascontiguousarray(img[..., :3])).permute(2, 0, 1).float() / 255.0
        images.append(F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True)[0])
    return torch.stack(images)  # [8, 3, size, size]


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # random crop of 70-100% of the side, resized back, random flip: a small stand-in for the DALI pipeline
    n, _, h, w = images.shape
    out = []
    for i in range(n):
        side = int(h * (0.7 + 0.3 * torch.rand(1, generator=gen).item()))
        top, left = (torch.randint(0, h - side + 1, (2,), generator=gen)).tolist()
        crop = images[i : i + 1, :, top : top + side, left : left + side]
        crop = F.interpolate(crop, size=(h, w), mode="bilinear", antialias=True)
        out.append(crop.flip(-1) if torch.rand(1, generator=gen).item() < 0.5 else crop)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)  # CLIP normalisation
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    return (torch.cat(out) - mean) / std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="ALIP-Tiny", help="open_clip architecture (default ALIP-Tiny)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    model, _, _ = alip.create_model(args.model)
    tokenizer = alip.get_tokenizer(args.model)
    net = alip.BiPathCLIP(model)
    loss_fn = alip.AlipLoss(local_loss=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    images = load_images(model.visual.image_size[0])
    captions = tokenizer([s[1] for s in SAMPLES])
    raws = tokenizer([s[2] for s in SAMPLES])
    noisy = torch.tensor([s[3] for s in SAMPLES])

    print(
        f"smoke run: {args.model}, {len(SAMPLES)} photos ({int(noisy.sum())} with noisy raw text), {args.steps} steps"
    )
    print(f"{'step':>5} {'loss':>7} {'raw':>7} {'caption':>7} {'w_s clean':>9} {'w_s noisy':>9}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        out = net(augment(images, gen), raws, captions)
        res = loss_fn(out["image_features"], out["raw_features"], out["caption_features"], out["logit_scale"])
        opt.zero_grad(set_to_none=True)
        res["loss"].backward()
        opt.step()
        with torch.no_grad():  # CLIP's clamp of the temperature: scale <= 100
            model.logit_scale.clamp_(0, 4.6052)
        if step == 1 or step % 10 == 0 or step == args.steps:
            ws = res["weight_sample"]
            print(
                f"{step:5d} {res['loss'].item():7.3f} {res['loss_raw'].item():7.3f}"
                f" {res['loss_caption'].item():7.3f}"
                f" {ws[~noisy].mean().item():9.3f} {ws[noisy].mean().item():9.3f}"
            )
    model.eval()
    with torch.no_grad():
        out = net(augment(images, gen), raws, captions)
        hits = (out["image_features"] @ out["caption_features"].T).argmax(1) == torch.arange(len(SAMPLES))
    print(f"image->caption R@1 on the {len(SAMPLES)} training photos: {hits.float().mean().item():.2f}")
    print(f"done in {time.perf_counter() - start:.1f} s (the full demo comes with the demo issue)")


if __name__ == "__main__":
    main()
