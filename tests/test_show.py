"""`patterncc show` pictures: a real PNG of sensible size, the right rows, and clear errors for bad requests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import patterncc
from patterncc import PatternUsageError, show
from patterncc.mask import pattern_mask
from patterncc.semantics import bind_pattern


def open_png(path: Path) -> Image.Image:
    assert path.is_file(), f"{path} was not written"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    image = Image.open(path)
    image.load()
    return image


def assert_sensible(image: Image.Image, min_width: int = 600) -> None:
    width, height = image.size
    assert min_width <= width <= 6000 and 400 <= height <= 6000, f"odd picture size {width} x {height}"
    colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    white = sum(count for count, rgb in colors if rgb == (255, 255, 255))
    assert white < 0.97 * width * height, "the picture is (almost) blank"


def test_every_example_renders_with_grid(example_file: Path, tmp_path: Path):
    """n = 130 is not a multiple of the block (64) nor of any example's l."""
    out = show.render(patterncc.parse(example_file), 130, tmp_path / "p.png", grid=13)
    assert out == tmp_path / "p.png"
    assert_sensible(open_png(out))


def test_large_n_draws_tiles_without_the_n_by_n_mask(examples_dir: Path, tmp_path: Path, monkeypatch):
    def no_dense_mask(*args, **kwargs):
        raise AssertionError("built a dense n x n mask for n > EXACT_MAX_N")

    monkeypatch.setattr(show, "head_mask", no_dense_mask)
    pattern = patterncc.parse(examples_dir / "bigbird.attn")
    out = show.render(pattern, show.EXACT_MAX_N * 4 + 1, tmp_path / "big.png", grid=100)
    assert_sensible(open_png(out))


def test_one_panel_per_distinct_head_and_the_union(examples_dir: Path, tmp_path: Path):
    """strided: two heads plus the union, three panels across; local: four identical heads, one panel."""
    strided = open_png(show.render(patterncc.parse(examples_dir / "strided.attn"), 256, tmp_path / "s.png"))
    local = open_png(show.render(patterncc.parse(examples_dir / "local.attn"), 256, tmp_path / "l.png"))
    assert strided.size[0] > 2 * local.size[0], f"strided {strided.size}, local {local.size}"


@pytest.mark.parametrize("query", [0, 77, 129], ids=["first", "middle", "last"])
def test_query_row_matches_the_mask(examples_dir: Path, query: int):
    """The --grid row is computed without the n x n mask; it must be the mask's row."""
    for path in sorted(examples_dir.glob("*.attn")):
        pattern = patterncc.parse(path)
        bound = bind_pattern(pattern, 130)
        masks = pattern_mask(pattern, 130)
        for k, pairs in enumerate(bound.head_sets()):
            row = show.query_row(bound, pairs, query)
            assert torch.equal(row, masks[k, query]), f"{path.name} head {k} query {query}"


def test_interleaved_layer(tmp_path: Path):
    pattern = patterncc.parse("pattern p() { combine interleaved\n head a = local(2)\n head b = stride(3) }")
    assert_sensible(open_png(show.render(pattern, 100, tmp_path / "l1.png", layer=1)), min_width=300)


@pytest.mark.parametrize("name, make_path, words", [
    ("missing-folder", lambda tmp: tmp / "nope" / "x.png", "does not exist"),
    ("a-folder", lambda tmp: tmp, "is a folder"),
    ("not-png", lambda tmp: tmp / "x.jpg", "must be a .png file"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_output_path_is_a_usage_error(tmp_path: Path, name, make_path, words):
    pattern = patterncc.parse("pattern p() { head a = local(1) }")
    with pytest.raises(PatternUsageError, match=words):
        show.render(pattern, 32, make_path(tmp_path))


def test_failed_write_is_a_usage_error(tmp_path: Path, monkeypatch):
    from matplotlib.figure import Figure

    def refuse(self, path, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Figure, "savefig", refuse)
    with pytest.raises(PatternUsageError, match="cannot write .*x.png: Permission denied"):
        show.render(patterncc.parse("pattern p() { head a = local(1) }"), 32, tmp_path / "x.png")


@pytest.mark.parametrize("kwargs, words", [
    ({"query": 32}, "query position must be in 0..31"),
    ({"query": -1}, "query position must be in 0..31"),
    ({"grid": 0}, "grid width must be a positive integer"),
    ({"layer": -1}, "layer must be a non-negative integer"),
], ids=["query-past-end", "query-negative", "grid-zero", "layer-negative"])
def test_bad_options_are_usage_errors(tmp_path: Path, kwargs, words):
    pattern = patterncc.parse("pattern p() { head a = local(1) }")
    with pytest.raises(PatternUsageError, match=words):
        show.render(pattern, 32, tmp_path / "x.png", **kwargs)
    assert not (tmp_path / "x.png").exists()


def test_too_large_to_draw(tmp_path: Path):
    pattern = patterncc.parse("pattern p() { block 16\n head a = local(1) }")
    with pytest.raises(PatternUsageError, match="too large to draw"):
        show.render(pattern, 16 * 5000, tmp_path / "x.png")
