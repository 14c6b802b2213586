"""Portrait framing: the face finder, the training framing, paste-back, the out-of-domain report."""
import math

import pytest
import torch

from rest_model import framing, media
from rest_model.cli import DEMO_PORTRAIT
from rest_model.framing import find_face, frame_portrait, paste_back


@pytest.fixture(scope="module")
def portrait():
    return media.load_image(DEMO_PORTRAIT)  # [3, 256, 256], a drawn face at the training framing


def half_body(portrait, scale=3, at=(40, 420), color=(0.35, 0.45, 0.55)):
    """The bundled portrait placed off-centre, in the upper third, of a canvas `scale` times its size."""
    s = portrait.shape[1]
    canvas = torch.tensor(color).view(3, 1, 1).expand(3, scale * s, scale * s).clone()
    top, left = at
    canvas[:, top:top + s, left:left + s] = portrait
    return canvas, (left, top, left + s, top + s)


def iou(a, b):  # boxes (left, top, right, bottom)
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return iw * ih / (area(a) + area(b) - iw * ih)


def psnr(a, b):  # images in [-1, 1]
    return 10 * math.log10(4 / ((a - b) ** 2).mean().item())


@pytest.mark.parametrize("at,color", [((40, 420), (0.35, 0.45, 0.55)), ((10, 60), (0.9, 0.9, 0.9)),
                                      ((200, 250), (0.1, 0.1, 0.1))])
def test_face_mode_finds_the_portrait_in_a_half_body_canvas(portrait, at, color):
    canvas, placed = half_body(portrait, at=at, color=color)
    out, f = frame_portrait(canvas, 128, "face")
    assert f.mode == "face" and f.size == (768, 768) and "face found" in f.message
    assert iou(f.box, placed) > 0.7
    assert f.box[2] - f.box[0] == f.box[3] - f.box[1]
    original = media.fit_portrait(portrait, 128, "center")
    centre = media.fit_portrait(canvas, 128, "center")
    assert psnr(out, original) > 18 > psnr(centre, original) + 5  # the framed face, not the canvas centre


def test_a_portrait_already_framed_like_training_keeps_the_centre_crop_bit_identical(portrait):
    out, f = frame_portrait(portrait, 128, "face")
    assert f.mode == "face" and f.box == (0, 0, 256, 256) and "already framed" in f.message
    assert torch.equal(out, media.fit_portrait(portrait, 128, "center"))


def test_no_face_falls_back_to_centre_and_says_so():
    for blank in (torch.full((3, 90, 160), 0.8), torch.rand(3, 120, 100, generator=torch.Generator().manual_seed(0)),
                  torch.linspace(0, 1, 200).view(1, 1, 200).expand(3, 100, 200)):
        assert find_face(blank) is None
        out, f = frame_portrait(blank, 32, "face")
        assert f.mode == "center" and f.message.startswith("no face found")
        assert torch.equal(out, media.fit_portrait(blank, 32, "center"))
        assert f.box == framing.fit_box("center", blank.shape[2], blank.shape[1])


def test_fit_modes_report_their_box_and_match_fit_portrait():
    img = torch.rand(3, 40, 70, generator=torch.Generator().manual_seed(1))
    for mode, box in (("center", (15, 0, 55, 40)), ("pad", (0, -15, 70, 55)), ("stretch", (0, 0, 70, 40))):
        out, f = frame_portrait(img, 16, mode)
        assert torch.equal(out, media.fit_portrait(img, 16, mode)) and f.box == box and f.mode == mode
    with pytest.raises(ValueError, match="crop mode"):
        frame_portrait(img, 16, "zoom")
    with pytest.raises(ValueError, match="too small"):
        frame_portrait(torch.rand(3, 4, 40), 16)


def test_face_square_is_the_training_framing():
    # synth draws the face centred at 0.44 of the frame; a face box of half the side there frames the whole clip
    assert framing.face_square((64, 48.64, 128, 128), 256, 256) == (0, 0, 256)
    # a clip (shrink) keeps the square inside; a portrait keeps the face's scale and passes the edge
    assert framing.face_square((10, 10, 100, 100), 150, 150) == (0, 0, 150)
    left, top, side = framing.face_square((10, 10, 100, 100), 150, 150, shrink=False)
    assert side == 200 and left < 0 and top < 0


def test_paste_back_round_trip_and_untouched_outside(portrait):
    canvas, placed = half_body(portrait)
    canvas = canvas[:, :700, :701]  # odd width
    out, f = frame_portrait(canvas, 128, "face")
    pasted = paste_back(out[None].repeat(2, 1, 1, 1), canvas, f)
    assert f.mode == "face" and pasted.shape == (2, 3, 700, 701)
    base = canvas * 2 - 1
    left, top, right, bottom = f.box
    inside = torch.zeros(700, 701, dtype=torch.bool)
    inside[max(0, top):bottom, max(0, left):right] = True
    assert torch.equal(pasted[:, :, ~inside], base[None, :, ~inside].expand(2, -1, -1))
    assert psnr(pasted[0, :, inside], base[:, inside]) > 28  # only the down- and upsampling blur
    # generated content shows inside the box, fading in over the feather at its edges
    gray = paste_back(torch.zeros(1, 3, 128, 128), canvas, f)[0]
    cy, cx = (top + bottom) // 2, (left + right) // 2
    assert gray[:, cy, cx].abs().max() < 1e-6
    ramp = gray[0, cy, left:cx] - base[0, cy, left:cx]
    assert ramp[0].abs() < 0.1 * ramp[len(ramp) // 2].abs()


def test_paste_back_of_a_box_past_the_edges_and_bad_input():
    img = torch.rand(4, 33, 47, generator=torch.Generator().manual_seed(2))  # RGBA, odd sizes
    out, f = frame_portrait(img, 16, "pad")
    assert f.box == (0, -7, 47, 40)
    frames = torch.rand(3, 3, 16, 16) * 2 - 1
    pasted = paste_back(frames, img, f)
    assert pasted.shape == (3, 3, 33, 47) and pasted.min() >= -1 and pasted.max() <= 1
    # the box covers the whole picture and its edges lie past it: nothing of the original shows through
    big = torch.nn.functional.interpolate(frames, size=(47, 47), mode="bilinear", antialias=True)[:, :, 7:40]
    assert (pasted - big.clamp(-1, 1)).abs().max() < 1e-5
    with pytest.raises(ValueError, match="framing is of"):
        paste_back(frames, img[:, :30], f)
    with pytest.raises(ValueError, match="frames"):
        paste_back(frames[0], img, f)


def test_gray_and_rgba_portraits_are_framed_like_rgb(portrait):
    canvas, placed = half_body(portrait, color=(0.5, 0.5, 0.5))
    rgba = torch.cat([canvas, torch.ones(1, *canvas.shape[1:])])
    out_rgb, f_rgb = frame_portrait(canvas, 64)
    out_rgba, f_rgba = frame_portrait(rgba, 64)
    assert f_rgba == f_rgb and torch.equal(out_rgba, out_rgb)
    gray = canvas.mean(0, keepdim=True)
    out, f = frame_portrait(gray, 64)  # no colour, no skin: the centre, said plainly
    assert out.shape == (3, 64, 64) and f.mode == "center" and "no face" in f.message


def test_domain_report_warns_below_the_threshold(tiny):
    vae, _ = tiny
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    db, warning = framing.domain_report(vae, x)
    assert math.isfinite(db) and db < framing.DOMAIN_PSNR_DB  # a random VAE reconstructs nothing
    assert "far from what the model was trained on" in warning and f"{db:.1f} dB" in warning

    class Identity(torch.nn.Module):  # a perfect autoencoder: every portrait is in its domain
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def encode_image(self, image):
            return image[:, :, None]

        def decode(self, latent):
            return latent

    db, warning = framing.domain_report(Identity(), x)
    assert db > 90 and warning is None


@pytest.mark.parametrize("crop", [(40, 236, 40, 216), (30, 256, 0, 256)])
def test_a_tight_close_up_is_framed_at_the_training_scale_past_its_edges(portrait, crop):
    top, bottom, left, right = crop
    close_up = portrait[:, top:bottom, left:right]  # the bundled portrait with its margins cut away
    out, f = frame_portrait(close_up, 128, "face")
    assert f.mode == "face" and "past the picture's edge" in f.message
    # the square the training framing asks for is the whole original portrait, most of it off this picture
    assert iou(f.box, (-left, -top, 256 - left, 256 - top)) > 0.75
    assert f.box[1] < 0  # past the top: the face is not enlarged to fill the picture
