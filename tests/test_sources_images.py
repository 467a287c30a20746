"""`sources.load_image` / `ImageDataset`: every convertible kind becomes RGB, the rest `BadImage`."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from reglue.pipeline.sources import (
    BadImage,
    ImageDataset,
    center_crop,
    content_hash,
    file_stamp,
    load_image,
    read_source,
    scan,
)

R = 32


def gradient(w, h):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(np.uint8)


def write_bad_files(folder):
    """name -> expected reason fragment"""
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(gradient(64, 48)).save(buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image\n")
    return {"truncated.jpg": "(?i)truncated", "empty.png": "0 bytes", "text.jpg": "cannot identify"}


def test_bad_files_raise_badimage(tmp_path):
    for name, reason in write_bad_files(tmp_path).items():
        with pytest.raises(BadImage, match=reason):
            load_image(tmp_path / name, R)
    with pytest.raises(BadImage, match="FileNotFoundError"):
        load_image(tmp_path / "missing.png", R)


def test_extreme_aspect_ratio_is_refused_not_exhausting_memory(tmp_path):
    Image.new("RGB", (1, 400_000)).save(tmp_path / "strip.png")
    with pytest.raises(BadImage, match="aspect ratio"):
        load_image(tmp_path / "strip.png", R)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK"])
def test_modes_convert_like_the_reference(tmp_path, mode):
    # the reference (edm2 dataset_tools) does PIL convert('RGB') on every image: alpha is dropped
    src = Image.fromarray(gradient(40, 30)).convert(mode)
    path = tmp_path / ("a.jpg" if mode == "CMYK" else "a.png")
    src.save(path)
    out = load_image(path, R)
    expected = center_crop(Image.open(path).convert("RGB"), R).transpose(2, 0, 1)
    assert out.dtype == np.uint8 and out.shape == (3, R, R)
    np.testing.assert_array_equal(out, expected)


def test_16bit_greyscale_is_scaled_not_clipped(tmp_path):
    a = np.full((R, R), 65535, np.uint16)
    a[:, : R // 2] = 32896                                  # 128 * 257
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = load_image(tmp_path / "g16.png", R)
    assert (out[:, :, : R // 2] == 128).all() and (out[:, :, R // 2:] == 255).all()


def test_float_and_int32_images(tmp_path):
    Image.fromarray(np.full((R, R), 0.5, np.float32), mode="F").save(tmp_path / "f.tif")
    assert (load_image(tmp_path / "f.tif", R) == 128).all()
    Image.fromarray(np.full((R, R), 200, np.int32), mode="I").save(tmp_path / "i.tif")
    assert (load_image(tmp_path / "i.tif", R) == 200).all()  # 8-bit data in an "I" container


@pytest.mark.parametrize("size", [(1, 1000), (1000, 1), (1, 1), (3, 5), (R, R), (4 * R + 1, 2 * R)])
def test_odd_sizes_give_a_full_crop(tmp_path, size):
    Image.fromarray(gradient(*size)).save(tmp_path / "odd.png")
    out = load_image(tmp_path / "odd.png", R)
    assert out.shape == (3, R, R) and out.dtype == np.uint8 and out.flags.c_contiguous


def test_dataset_survives_bad_files_in_workers(tmp_path):
    write_bad_files(tmp_path / "cls_b")
    (tmp_path / "cls_a").mkdir()
    Image.fromarray(gradient(50, 40)).save(tmp_path / "cls_a" / "good.png")
    src = scan(tmp_path)
    ds = ImageDataset(src, R)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    got = {}
    for index, images, ok, reason in loader:
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, R, R)
        for i, img, k, why in zip(index.tolist(), images, ok.tolist(), reason):
            got[src.paths[i]] = (k, why, int(img.sum()))
    assert got["cls_a/good.png"][:2] == (True, "")
    bad = {p: v for p, v in got.items() if p.startswith("cls_b/")}
    assert len(bad) == 3 and all(not k and why and total == 0 for k, why, total in bad.values())
    assert ImageDataset(src, R, indices=[2])[0][0] == 2


def bomb_png(path, side=20000):
    """A valid PNG header claiming side x side pixels (above Pillow's bomb limit) with no pixel data."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_bombs_missing_files_and_dangling_symlinks_are_skipped_and_named(tmp_path):
    """Issue 12 item 9: already right, kept so."""
    folder = tmp_path / "flat"
    folder.mkdir()
    bomb_png(folder / "bomb.png")
    (folder / "dangling.png").symlink_to(tmp_path / "gone.png")
    Image.fromarray(gradient(40, 30)).save(tmp_path / "real.png")
    (folder / "linked.png").symlink_to(tmp_path / "real.png")
    src = scan(folder)
    assert src.paths == ("bomb.png", "dangling.png", "linked.png")
    items = {src.paths[i]: item for i, *item in ImageDataset(src, R)}
    assert not items["bomb.png"][1] and "DecompressionBombError" in items["bomb.png"][2]
    assert not items["dangling.png"][1] and "FileNotFoundError" in items["dangling.png"][2]
    assert items["linked.png"][1]  # a symlink to an image is followed
    listed = tmp_path / "list.txt"
    listed.write_text("flat/linked.png 0\nflat/nowhere.png 1\n")
    index, _, ok, reason = ImageDataset(scan(listed), R)[1]
    assert index == 1 and not ok and "FileNotFoundError" in reason


def test_exif_orientation_is_ignored_as_the_reference_does(tmp_path):
    """edm2 dataset_tools.py opens with PIL and converts to RGB without ImageOps.exif_transpose."""
    from PIL import ImageOps

    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(gradient(60, 40)).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rotated.jpg", R)
    raw = Image.open(tmp_path / "rotated.jpg")
    np.testing.assert_array_equal(out, center_crop(raw.convert("RGB"), R).transpose(2, 0, 1))
    assert not np.array_equal(out, center_crop(ImageOps.exif_transpose(raw).convert("RGB"), R).transpose(2, 0, 1))


def test_stamps_describe_the_bytes_read(tmp_path):
    Image.fromarray(gradient(40, 30)).save(tmp_path / "a.png")
    _, stamp = read_source(tmp_path / "a.png")
    st = (tmp_path / "a.png").stat()
    assert stamp[:2] == (st.st_size, st.st_mtime_ns) == file_stamp(tmp_path / "a.png")
    assert stamp[2] == content_hash((tmp_path / "a.png").read_bytes()) and len(stamp[2]) == 16
    assert file_stamp(tmp_path / "missing.png") == (-1, 0)
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    src = scan(tmp_path)
    stamps = {src.paths[i]: stamp for i, _, _, _, stamp in ImageDataset(src, R, stamps=True)}
    assert stamps == {"a.png": stamp, "dangling.png": (-1, 0, "")}
