"""The measured constants of rest_model/framing.py, re-measured: prints figures, changes nothing.

1. FACE_PER_WIDTH: on drawn faces (synth portraits, whose framing is the training framing by
   construction: a face box of half the frame, centred on the face), the face box side over the width
   the finder measures; and how far the finder's face centre is from the drawn one.
2. DOMAIN_PSNR_DB: the PSNR of the demo VAE's reconstruction of drawn faces (seen and unseen identities)
   and of pictures unlike them (a smooth gradient, natural-looking 1/f textures, noise, a drawn face
   framed too wide), so the threshold can sit between them.

    .venv/bin/python scripts/calibrate_framing.py [--faces 200]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rest_model import checkpoint, framing, media  # noqa: E402
from rest_model.cli import DEMO_PORTRAIT, DEMO_VAE  # noqa: E402
from rest_model.config import preset  # noqa: E402
from rest_model.data import synth  # noqa: E402


def drawn(seed: int, index: int, size: int = 256) -> torch.Tensor:
    return torch.from_numpy(synth.portrait(seed, index, size, "babble")).permute(2, 0, 1).float() / 255


def face_geometry(n: int):
    ratios, dx, dy, missed = [], [], [], 0
    for i in range(n):
        ident = synth.make_identity(1, i, "babble")
        img = drawn(1, i)
        s = img.shape[1]
        found = framing._find_once(img)
        if found is None:
            missed += 1
            continue
        cx, cy, width = found
        ratios.append(s / 2 / width)
        dx.append(cx / s - ident.centre[0])
        dy.append(cy / s - ident.centre[1])
    q = lambda v: "median %.3f, quartiles %.3f-%.3f" % (np.median(v), *np.percentile(v, [25, 75]))  # noqa: E731
    print(f"face finder on {n} drawn faces (256 px): {n - missed} found, {missed} missed")
    print(f"  face box side / widest width: {q(ratios)}   -> FACE_PER_WIDTH")
    print(f"  centre error (fraction of the frame): x {q(dx)}; y {q(dy)}")


def pink(shape, g, alpha=1.0):
    """Random texture with a 1/f^alpha spectrum per channel (the power law of natural images)."""
    c, h, w = shape
    fy, fx = torch.meshgrid(torch.fft.fftfreq(h), torch.fft.rfftfreq(w), indexing="ij")
    amp = 1 / (fy ** 2 + fx ** 2).clamp_min(1 / (h * w)) ** (alpha / 2)
    spec = amp * torch.exp(2j * torch.pi * torch.rand(c, *amp.shape, generator=g))
    x = torch.fft.irfft2(spec, s=(h, w))
    x = (x - x.mean()) / x.std()
    return (0.5 + 0.18 * x).clamp(0, 1)


def domain(vae, res: int):
    g = torch.Generator().manual_seed(0)
    fit = lambda img, mode="center": media.fit_portrait(img, res, mode)  # noqa: E731
    rows = [("bundled portrait", [fit(media.load_image(DEMO_PORTRAIT))])]
    rows.append(("drawn faces, training identities (seed 0)", [fit(drawn(0, i)) for i in range(12)]))
    rows.append(("drawn faces, unseen identities (seed 5)", [fit(drawn(5, i)) for i in range(12)]))
    big = [F.pad(drawn(5, i), (256, 256, 0, 512), mode="replicate") for i in range(6)]
    rows.append(("drawn face centre-cropped from a 3x canvas", [fit(b) for b in big]))
    rows.append(("drawn face, grayscale", [fit(drawn(5, i).mean(0, keepdim=True)) for i in range(6)]))
    ramp = torch.linspace(0, 1, res)
    rows.append(("smooth colour gradient", [torch.stack([ramp[None].expand(res, res), ramp[:, None].expand(res, res),
                                                         1 - ramp[None].expand(res, res)]) * 2 - 1]))
    rows.append(("natural-looking 1/f texture", [pink((3, res, res), g) * 2 - 1 for _ in range(6)]))
    rows.append(("rougher 1/f^0.5 texture", [pink((3, res, res), g, 0.5) * 2 - 1 for _ in range(6)]))
    rows.append(("uniform noise", [torch.rand(3, res, res, generator=g) * 2 - 1 for _ in range(3)]))
    print(f"\nreconstruction PSNR through the demo VAE ({DEMO_VAE.name}), threshold {framing.DOMAIN_PSNR_DB} dB:")
    for name, images in rows:
        db = [framing.reconstruction_psnr(vae, x) for x in images]
        print(f"  {name:<46} {np.median(db):5.1f} dB (min {min(db):.1f}, max {max(db):.1f}, n={len(db)})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(2)
    face_geometry(args.faces)
    vae = checkpoint.load_vae(DEMO_VAE)
    domain(vae, preset("demo").dit.resolution)
    return 0


if __name__ == "__main__":
    sys.exit(main())
