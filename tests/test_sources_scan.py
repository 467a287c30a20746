"""`sources.scan`: which files, in which order, with which labels."""

import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reglue.pipeline.sources import _lines, _normal, scan


def touch_image(path, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(path)


def test_class_tree_labels_follow_sorted_folders(tmp_path):
    for rel in ["n02/b.png", "n02/a.JPEG", "n01/z.png", "n01/sub/y.png", "n04/x.png"]:
        touch_image(tmp_path / rel)
    (tmp_path / "n03").mkdir()                            # empty class
    (tmp_path / "n01" / "notes.txt").write_text("x")      # not an image extension
    (tmp_path / "dataset.json").write_text("{}")          # top-level non-image file: ignored
    touch_image(tmp_path / ".hidden" / "h.png")           # hidden folder: not a class
    src = scan(tmp_path)
    assert src.kind == "classes"
    assert src.class_names == ("n01", "n02", "n03", "n04")
    assert src.empty_classes == ("n03",)
    assert src.paths == ("n01/sub/y.png", "n01/z.png", "n02/a.JPEG", "n02/b.png", "n04/x.png")
    assert src.labels == (0, 0, 1, 1, 3)                  # n04 keeps index 3 despite empty n03
    assert src.num_classes == 4 and len(src) == 5
    assert src.path(4) == tmp_path / "n04" / "x.png"


def test_flat_folder_is_unlabelled(tmp_path):
    for name in ["b.png", "a.jpg", "c.webp"]:
        touch_image(tmp_path / name)
    (tmp_path / "readme.md").write_text("x")
    src = scan(tmp_path)
    assert src.kind == "flat" and src.paths == ("a.jpg", "b.png", "c.webp")
    assert src.labels == (-1, -1, -1) and src.class_names == () and src.num_classes == 0


def test_file_list(tmp_path):
    touch_image(tmp_path / "imgs" / "one.png")
    touch_image(tmp_path / "imgs" / "with space.png")
    absolute = tmp_path / "elsewhere" / "abs.png"
    touch_image(absolute)
    lst = tmp_path / "list.txt"
    lst.write_text(f"# comment\nimgs/one.png 3\n\nimgs/with space.png\n{absolute} 0\n")
    src = scan(lst)
    assert src.kind == "list"
    assert src.paths == ("imgs/one.png", "imgs/with space.png", absolute.as_posix())
    assert src.labels == (3, -1, 0) and src.num_classes == 4
    assert src.path(0) == tmp_path / "imgs" / "one.png" and src.path(2) == absolute


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan(tmp_path / "missing")
    touch_image(tmp_path / "cls" / "a.png")
    touch_image(tmp_path / "stray.png")
    with pytest.raises(ValueError, match="mixes class folders"):
        scan(tmp_path)
    bad = tmp_path / "bad.txt"
    bad.write_text("a.png -2\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        scan(bad)


def test_a_file_list_naming_a_file_twice_is_refused(tmp_path):
    touch_image(tmp_path / "imgs" / "a.png")
    touch_image(tmp_path / "imgs" / "b.png")
    for repeat in ("imgs/a.png 1", "./imgs/a.png", f"{tmp_path / 'imgs' / 'a.png'} 0", "imgs/../imgs/a.png"):
        lst = tmp_path / "list.txt"
        lst.write_text(f"imgs/a.png 0\nimgs/b.png 0\n{repeat}\n")
        with pytest.raises(ValueError, match=r"list.txt:3: .* is the same file as line 1; remove the repeated line"):
            scan(lst)


def test_a_list_path_is_kept_as_is_only_where_path_would_not_change_it():
    parts = ["a", ".", "", "..", "b c", "x.JPEG"]
    for k in range(1, 5):
        for combo in itertools.product(parts, repeat=k):
            for path in {"/".join(combo), "/" + "/".join(combo), "//" + "/".join(combo), "/".join(combo) + "/"}:
                if path.strip() and _normal(path):
                    assert Path(path).as_posix() == path, path
    assert _normal("n01440764/n01440764_10026.JPEG") and not _normal("./a.png") and not _normal("a//b.png")


def test_a_list_is_read_a_line_at_a_time_into_the_same_lines(tmp_path):
    rng = np.random.default_rng(0)
    pieces = ["a", "b c", " ", "#x", "1", "\n", "\r\n", "\r", "\x0c", "\x85", "\u2028"]
    for _ in range(300):
        text = "".join(rng.choice(pieces, rng.integers(0, 12)))
        (tmp_path / "list.txt").write_text(text)
        assert list(_lines(tmp_path / "list.txt")) == (tmp_path / "list.txt").read_text().splitlines(), repr(text)
