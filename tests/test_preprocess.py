import io
import logging
import struct
import zlib

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torchvision import transforms

from turbo.preprocess import (
    IMAGE_PREPS,
    MAX_PIXELS,
    ImageError,
    ThresholdError,
    build_transform,
    canny_edges,
    check_canny_thresholds,
    invert,
    limit_size,
    load_image,
    load_image_limited,
    resize_to_multiple_of_8,
    restore_size,
    to_model_input,
    to_pil,
    to_pil_batch,
)

RED = (255, 0, 0)


def _png_bytes(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


def _png_claiming_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header is rewritten to claim width x height (CRC fixed)."""
    data = bytearray(_png_bytes(Image.new("L", (8, 8))))
    # IHDR starts right after the 8-byte signature: length(4) type(4) data(13) crc(4).
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr[4:]
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    return bytes(data)


def _scene(size=(64, 48)) -> Image.Image:
    image = Image.new("RGB", size, (30, 60, 90))
    draw = ImageDraw.Draw(image)
    draw.rectangle((8, 8, 30, 30), fill=(240, 200, 10))
    draw.ellipse((34, 10, 60, 40), fill=(10, 220, 120))
    return image


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (16, 8), (0, 0, 255))
    image.paste(RED, (0, 0, 4, 4))
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was rotated: display rotated 90 degrees clockwise
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif)

    loaded = load_image(path)

    assert loaded.size == (8, 16)
    assert loaded.getpixel((7, 0)) == RED  # top-left corner moved to the top-right
    assert loaded.getpixel((0, 0)) == (0, 0, 255)


def test_transparency_is_composited_over_white():
    rgba = Image.new("RGBA", (8, 4), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (4, 0, 8, 4))
    rgba.putpixel((0, 0), (0, 0, 0, 128))
    loaded = load_image(rgba)
    assert loaded.mode == "RGB"
    assert loaded.getpixel((1, 1)) == (255, 255, 255)
    assert loaded.getpixel((5, 1)) == RED
    assert all(abs(v - 127) <= 1 for v in loaded.getpixel((0, 0)))

    la = Image.new("LA", (4, 4), (0, 0))
    la.putpixel((1, 1), (0, 255))
    loaded = load_image(io.BytesIO(_png_bytes(la)))
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((1, 1)) == (0, 0, 0)

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.putpixel((2, 2), 1)
    loaded = load_image(io.BytesIO(_png_bytes(palette, transparency=0)))
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((2, 2)) == (10, 20, 30)


def test_16_bit_and_float_images_scale_to_8_bit(tmp_path):
    levels = np.arange(256, dtype=np.uint16).reshape(16, 16)
    path = tmp_path / "gradient16.png"
    Image.fromarray(levels * 257).save(path)
    assert Image.open(path).mode.startswith("I")
    loaded = np.asarray(load_image(path))
    for channel in range(3):
        np.testing.assert_array_equal(loaded[:, :, channel], levels)

    big_endian = Image.fromarray((levels * 257).astype(">u2"))
    assert big_endian.mode == "I;16B"
    np.testing.assert_array_equal(np.asarray(load_image(big_endian))[:, :, 0], levels)

    as_int32 = Image.fromarray(levels.astype(np.int32) * 257)
    assert as_int32.mode == "I"
    np.testing.assert_array_equal(np.asarray(load_image(as_int32))[:, :, 1], levels)

    as_float = Image.fromarray(levels.astype(np.float32) / 255.0)
    assert as_float.mode == "F"
    np.testing.assert_array_equal(np.asarray(load_image(as_float))[:, :, 2], levels)

    # 16-bit values between 8-bit steps round to the nearest one.
    odd = Image.fromarray(np.array([[128, 65535, 300, 0]], dtype=np.uint16))
    assert np.asarray(load_image(odd))[0, :, 0].tolist() == [0, 255, 1, 0]


def test_other_modes_become_rgb():
    bits = Image.new("1", (4, 4), 0)
    bits.putpixel((1, 1), 1)
    loaded = load_image(bits)
    assert loaded.getpixel((1, 1)) == (255, 255, 255) and loaded.getpixel((0, 0)) == (0, 0, 0)

    gray = Image.new("L", (4, 4), 77)
    assert load_image(gray).getpixel((3, 3)) == (77, 77, 77)

    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    assert load_image(cmyk).getpixel((0, 0)) == RED

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert load_image(palette).getpixel((0, 0)) == (10, 20, 30)


def test_load_errors_name_the_problem(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError, match="no such image file: .*nope.png"):
        load_image(missing)

    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(ImageError, match="not an image file"):
        load_image(text)

    data = _png_bytes(_scene((128, 128)).effect_spread(9))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(truncated)

    buffer = io.BytesIO()
    _scene((128, 128)).save(buffer, format="JPEG")
    for cut in (200, len(buffer.getvalue()) // 2):  # inside the header, inside the data
        with pytest.raises(ImageError, match="corrupt or truncated"):
            load_image(io.BytesIO(buffer.getvalue()[:cut]))

    assert issubclass(ImageError, ValueError)


def test_huge_images_are_refused_before_decoding():
    side = int(MAX_PIXELS**0.5) + 100
    with pytest.raises(ImageError, match="too large"):
        load_image(io.BytesIO(_png_claiming_size(side, side)))
    # Far above Pillow's own limit: its DecompressionBombError becomes an ImageError.
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(io.BytesIO(_png_claiming_size(40000, 40000)))


def test_max_side_downscales_keeping_aspect(caplog):
    image = _scene((64, 40))
    with caplog.at_level(logging.WARNING, logger="turbo.preprocess"):
        loaded = load_image(image, max_side=32)
    assert loaded.size == (32, 20)
    assert "downscaling" in caplog.text
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(image.resize((32, 20), Image.LANCZOS)))
    assert load_image(image, max_side=64).size == (64, 40)
    with pytest.raises(ImageError):
        load_image(image, max_side=0)
    # one downscale for every caller: a strip that would end under 8 px says so with its own size
    with pytest.raises(ImageError, match="too narrow: 600x9 pixels"):
        load_image(_scene((600, 9)), max_side=64)


def test_canny_matches_cv2():
    image = _scene()
    edges = canny_edges(image, 50, 150)
    expected = cv2.Canny(np.asarray(image), 50, 150)
    result = np.asarray(edges)
    assert edges.mode == "RGB" and edges.size == image.size
    for channel in range(3):
        np.testing.assert_array_equal(result[:, :, channel], expected)
    assert set(np.unique(result).tolist()) == {0, 255}
    np.testing.assert_array_equal(
        np.asarray(canny_edges(image))[:, :, 0], cv2.Canny(np.asarray(image), 100, 200)
    )
    np.testing.assert_array_equal(np.asarray(invert(edges)), 255 - result)


@pytest.mark.parametrize("low, high", [(-1, 100), (200, 100), (10, 256)])
def test_canny_thresholds_are_checked(low, high):
    with pytest.raises(ThresholdError, match="thresholds"):
        canny_edges(_scene(), low, high)
    assert issubclass(ThresholdError, ValueError)


def test_thresholds_are_checked_without_an_image():
    check_canny_thresholds(0, 0)
    check_canny_thresholds(100, 255)
    for low, high in [(-1, 100), (200, 100), (10, 256), (float("nan"), 200), (100, float("inf"))]:
        with pytest.raises(ThresholdError, match="0 <= low <= high <= 255"):
            check_canny_thresholds(low, high)


def test_limit_size_downscales_a_loaded_image_as_load_image_limited_does(tmp_path):
    image = _scene((64, 40))
    image.save(tmp_path / "scene.png")
    small, size = limit_size(image, 32)
    assert size == (64, 40) and small.size == (32, 20)
    from_file, file_size = load_image_limited(tmp_path / "scene.png", 32)
    assert file_size == size
    np.testing.assert_array_equal(np.asarray(small), np.asarray(from_file))
    same, size = limit_size(image, 64)
    assert same is image and size == (64, 40)
    with pytest.raises(ImageError, match="too narrow: 600x9 pixels"):
        limit_size(_scene((600, 9)), 64)
    with pytest.raises(ImageError, match="positive"):
        limit_size(image, 0)


def test_sketch_input_is_one_on_dark_pixels():
    sketch = Image.new("RGB", (16, 8), (255, 255, 255))
    draw = ImageDraw.Draw(sketch)
    draw.line((0, 3, 15, 3), fill=(0, 0, 0))
    sketch.putpixel((2, 6), (127, 127, 127))  # 127/255 < 0.5: a stroke
    sketch.putpixel((3, 6), (128, 128, 128))  # 128/255 > 0.5: paper
    tensor = to_model_input(sketch, "sketch")
    assert tensor.shape == (1, 3, 8, 16) and tensor.dtype == torch.float32
    expected = torch.from_numpy((np.asarray(sketch) < 128).astype(np.float32)).permute(2, 0, 1)
    assert torch.equal(tensor[0], expected)
    assert tensor[0, :, 3].eq(1).all() and tensor[0, :, 6, 2].eq(1).all() and tensor[0, :, 6, 3].eq(0).all()
    assert tensor.sum().item() == 3 * (16 + 1)


def test_model_input_ranges():
    image = Image.new("RGB", (8, 8), (0, 0, 0))
    image.paste((255, 255, 255), (4, 0, 8, 8))
    for kind in ("canny", "none"):
        tensor = to_model_input(image, kind)
        assert tensor.shape == (1, 3, 8, 8)
        assert tensor[0, :, :, :4].eq(0).all() and tensor[0, :, :, 4:].eq(1).all()
    unpaired = to_model_input(image, "unpaired")
    assert unpaired[0, :, :, :4].eq(-1).all() and unpaired[0, :, :, 4:].eq(1).all()
    with pytest.raises(ValueError, match="sketch"):
        to_model_input(image, "edges")


def test_to_pil_matches_torchvision_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    for shape in [(3, 17, 23), (1, 3, 8, 8)]:
        tensor = torch.rand(shape, generator=generator) * 2 - 1
        single = tensor[0] if tensor.dim() == 4 else tensor
        expected = np.asarray(transforms.ToPILImage()(single.cpu() * 0.5 + 0.5))
        result = to_pil(tensor)
        assert result.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(result), expected)
    # Truncation, not rounding: 0 -> 0.5 -> 127.5 -> 127.
    assert to_pil(torch.zeros(3, 2, 2)).getpixel((0, 0)) == (127, 127, 127)
    assert to_pil(torch.full((3, 2, 2), 5.0)).getpixel((0, 0)) == (255, 255, 255)
    batch = torch.rand((2, 3, 4, 4), generator=generator) * 2 - 1
    images = to_pil_batch(batch)
    assert len(images) == 2
    np.testing.assert_array_equal(np.asarray(images[1]), np.asarray(to_pil(batch[1])))
    with pytest.raises(ValueError):
        to_pil(batch)


def test_multiple_of_8_and_restore():
    image = _scene((37, 50))
    resized = resize_to_multiple_of_8(image)
    assert resized.size == (32, 48)
    np.testing.assert_array_equal(np.asarray(resized), np.asarray(image.resize((32, 48), Image.LANCZOS)))
    assert resize_to_multiple_of_8(_scene((16, 8))).size == (16, 8)
    with pytest.raises(ImageError, match="too small"):
        resize_to_multiple_of_8(_scene((7, 20)))
    restored = restore_size(resized, image.size)
    assert restored.size == (37, 50)
    assert restore_size(resized, (32, 48)) is resized


def test_build_transform_sizes():
    image = _scene((300, 200))
    sizes = {
        "resized_crop_512": (512, 512),
        "resize_286_randomcrop_256x256_hflip": (256, 256),
        "resize_256": (256, 256),
        "resize_256x256": (256, 256),
        "resize_512": (512, 512),
        "resize_512x512": (512, 512),
        "no_resize": (300, 200),
    }
    assert set(sizes) == set(IMAGE_PREPS)
    for prep, size in sizes.items():
        assert build_transform(prep)(image).size == size, prep
    np.testing.assert_array_equal(
        np.asarray(build_transform("resize_512x512")(image)),
        np.asarray(image.resize((512, 512), Image.LANCZOS)),
    )
    np.testing.assert_array_equal(np.asarray(build_transform("no_resize")(image)), np.asarray(image))
    crop = build_transform("resized_crop_512")(image)
    expected = image.resize((768, 512), Image.LANCZOS).crop((128, 0, 640, 512))
    np.testing.assert_array_equal(np.asarray(crop), np.asarray(expected))
    with pytest.raises(ValueError, match="resize_512x512"):
        build_transform("resize_1024")
