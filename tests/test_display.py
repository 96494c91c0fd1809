"""unetseg.display: windowing, colours, overlays, error and disagreement maps, sizes, orientation (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from unetseg import display


def test_class_colors_background_black_foreground_distinct_and_wrapping():
    colors = display.class_colors(3)
    assert colors.shape == (3, 3) and colors.dtype == np.uint8
    assert colors[0].tolist() == [0, 0, 0]
    assert len({tuple(c) for c in colors}) == 3
    many = display.class_colors(len(display.PALETTE) + 2)
    assert many[len(display.PALETTE)].tolist() == display.PALETTE[1].tolist()  # wraps to the first foreground
    with pytest.raises(ValueError, match="num_classes"):
        display.class_colors(0)


def test_legend_lists_foreground_classes_with_hex_colours():
    assert display.legend(("background", "anterior", "posterior")) == [("anterior", "#e69f00"), ("posterior", "#56b4e9")]


# Machado, Oliveira & Fernandes (2009), severity 1.0, on linear RGB: what a protanope, deuteranope, tritanope sees.
CVD = {
    "protanopia": [[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216], [-0.003882, -0.048116, 1.051998]],
    "deuteranopia": [[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413], [-0.011820, 0.042940, 0.968881]],
    "tritanopia": [[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602], [0.004733, 0.691367, 0.303900]],
}


def seen(rgb, vision: str | None) -> np.ndarray:
    """sRGB colour (0-255) as seen with normal vision (None) or simulated colour-blindness."""
    c = np.asarray(rgb, dtype=float) / 255
    if vision is None:
        return c * 255
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4) @ np.array(CVD[vision]).T
    linear = np.clip(linear, 0, 1)
    return 255 * np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


def apart(a, b) -> float:
    """The smallest RGB distance between two colours over normal vision and the three simulated colour-blindnesses."""
    return min(float(np.linalg.norm(seen(a, v) - seen(b, v))) for v in (None, *CVD))


def test_class_colours_stay_apart_for_colour_blind_viewers():
    fg = [tuple(c) for c in display.PALETTE[1:].tolist()]
    assert len(set(fg)) == len(fg) and (0, 0, 0) not in fg
    # The first three (hippocampus: anterior, posterior; DSB: nucleus) far apart for everyone. The old palette's red
    # and green (anterior, posterior) were 35 apart for a deuteranope.
    assert min(apart(a, b) for i, a in enumerate(fg[:3]) for b in fg[i + 1:3]) > 60
    assert min(apart(a, b) for i, a in enumerate(fg) for b in fg[i + 1:]) > 25


def test_error_colours_are_distinct_and_never_a_class_colour():
    errors = [display.FALSE_POSITIVE, display.FALSE_NEGATIVE, display.WRONG_CLASS]
    marks = errors + [display.DISAGREEMENT]
    assert len(set(marks)) == len(marks)
    classes = [tuple(c) for c in display.class_colors(len(display.PALETTE) + 3).tolist()]
    assert not set(marks) & set(classes)  # "red" once meant both the anterior class and a false positive
    assert min(apart(m, c) for m in marks for c in classes[1:]) > 50  # not even close, for any viewer
    assert min(apart(a, b) for i, a in enumerate(errors) for b in errors[i + 1:]) > 150  # one errors panel
    names = display.ERROR_KEY.split(", ")
    assert [n.split(" ", 1)[1] for n in names] == ["false positive", "false negative", "wrong class"]


def test_apply_window_maps_level_and_width_to_grey_and_clips():
    image = np.array([-50.0, 0.0, 50.0, 100.0, 500.0])
    out = display.apply_window(image, level=50, width=100)
    assert out.dtype == np.uint8
    assert out.tolist() == [0, 0, 128, 255, 255]
    with pytest.raises(ValueError, match="width"):
        display.apply_window(image, 0, 0)


def test_default_window_spans_robust_percentiles():
    image = np.concatenate([np.linspace(0, 100, 1001), [1e6]])  # one hot voxel must not stretch the window
    level, width = display.default_window(image)
    assert level == pytest.approx(50, abs=1)
    assert width == pytest.approx(99.5, abs=1.5)
    assert display.default_window(np.zeros(10))[1] > 0


def test_channels_last_and_to_rgb():
    grey = np.arange(6, dtype=np.uint8).reshape(1, 2, 3)
    assert display.channels_last(grey).shape == (2, 3)
    rgb = np.arange(18, dtype=np.uint8).reshape(3, 2, 3)
    assert display.channels_last(rgb)[1, 2].tolist() == rgb[:, 1, 2].tolist()
    assert display.to_rgb(grey[0]).shape == (2, 3, 3)
    assert np.all(display.to_rgb(grey[0])[..., 2] == grey[0])
    with pytest.raises(ValueError):
        display.channels_last(np.zeros((2, 4, 4)))
    with pytest.raises(ValueError):
        display.to_rgb(np.zeros((4, 4, 2)))


def test_overlay_paints_class_colours_at_given_opacity():
    base = np.full((4, 5), 100, dtype=np.uint8)
    labels = np.zeros((4, 5), dtype=np.int64)
    labels[0, 0], labels[1, 1] = 1, 2
    colors = display.class_colors(3)
    solid = display.overlay(base, labels, 3, opacity=1.0)
    assert solid[0, 0].tolist() == colors[1].tolist() and solid[1, 1].tolist() == colors[2].tolist()
    assert solid[3, 4].tolist() == [100, 100, 100]  # background untouched
    assert np.array_equal(display.overlay(base, labels, 3, opacity=0.0), display.to_rgb(base))
    half = display.overlay(base, labels, 3, opacity=0.5)
    assert half[0, 0].tolist() == np.round((100 + colors[1].astype(float)) / 2).astype(int).tolist()
    with pytest.raises(ValueError, match="opacity"):
        display.overlay(base, labels, 3, opacity=1.5)
    with pytest.raises(ValueError, match="shape"):
        display.overlay(base, labels[:3], 3)


def test_error_masks_split_false_positives_negatives_and_wrong_classes():
    truth = np.array([[0, 1, 1, 2], [0, 0, 2, 2]])
    pred = np.array([[1, 1, 0, 1], [0, 2, 2, 2]])
    m = display.error_masks(pred, truth)
    assert np.argwhere(m["false_positive"]).tolist() == [[0, 0], [1, 1]]
    assert np.argwhere(m["false_negative"]).tolist() == [[0, 2]]
    assert np.argwhere(m["wrong_class"]).tolist() == [[0, 3]]
    rgb = display.error_overlay(np.zeros((2, 4), np.uint8), pred, truth, opacity=1.0)
    assert rgb[0, 0].tolist() == list(display.FALSE_POSITIVE)
    assert rgb[0, 2].tolist() == list(display.FALSE_NEGATIVE)
    assert rgb[0, 3].tolist() == list(display.WRONG_CLASS)
    assert rgb[0, 1].tolist() == [0, 0, 0]  # correct foreground stays as it was


def test_disagreement_and_vote_disagreement():
    a = np.array([[0, 1], [2, 2]])
    b = np.array([[0, 2], [2, 0]])
    assert display.disagreement(a, b).tolist() == [[False, True], [False, True]]
    votes = display.vote_disagreement(np.stack([a, b, a]))
    assert votes.dtype == np.float32
    assert votes == pytest.approx(np.array([[0, 1 / 3], [0, 1 / 3]]))
    three_way = display.vote_disagreement(np.array([[0], [1], [2]]))
    assert three_way[0] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        display.vote_disagreement(a[None])


def test_heat_overlay_scales_with_value():
    base = np.zeros((1, 3), dtype=np.uint8)
    out = display.heat_overlay(base, np.array([[0.0, 0.5, 1.0]]), opacity=1.0, color=(200, 0, 0))
    assert out[0, :, 0].tolist() == [0, 100, 200]


def test_class_sizes_volume_in_mm3_from_affine_and_area_in_pixels():
    labels = np.zeros((4, 4, 4), dtype=np.int64)
    labels[0, 0, :3] = 1
    labels[1, :, :] = 2
    affine = np.diag([2.0, -3.0, 0.5, 1.0])  # a flipped axis must not give a negative volume
    affine[:3, 3] = [10, 20, 30]
    assert display.voxel_volume(affine) == pytest.approx(3.0)
    rows = display.class_sizes(labels, ("background", "a", "b"), affine)
    assert rows == [
        {"class": "a", "voxels": 3, "volume_mm3": pytest.approx(9.0)},
        {"class": "b", "voxels": 16, "volume_mm3": pytest.approx(48.0)},
    ]
    rotated = np.eye(4)
    rotated[:3, :3] = np.array([[0, 0, 1.5], [2.0, 0, 0], [0, 1.0, 0]])  # permuted axes, 3 mm^3 voxels
    assert display.class_sizes(labels, ("background", "a", "b"), rotated)[0]["volume_mm3"] == pytest.approx(9.0)
    flat = display.class_sizes(labels[1], ("background", "a", "b"))
    assert flat == [{"class": "a", "pixels": 0}, {"class": "b", "pixels": 16}]
    with pytest.raises(ValueError, match="affine"):
        display.class_sizes(labels, ("background", "a", "b"))


def test_to_ras_undoes_flips_and_permutations():
    volume = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM-like: x runs to the left, y to the back
    ras = display.to_ras(volume, lps)
    assert ras.shape == (2, 3, 4)
    assert ras[0, 0, 0] == volume[1, 2, 0]
    permuted = np.zeros((4, 4))
    permuted[0, 2] = permuted[1, 0] = permuted[2, 1] = 1.0  # voxel axis 2 is R, 0 is A, 1 is S
    permuted[3, 3] = 1.0
    ras = display.to_ras(volume, permuted)
    assert ras.shape == (4, 2, 3)
    assert ras[3, 1, 2] == volume[1, 2, 3]
    assert display.ras_spacing((1.0, 2.0, 3.0), permuted) == (3.0, 1.0, 2.0)
    image = display.to_ras(volume[None].astype(np.float32), permuted)
    assert image.shape == (1, 4, 2, 3)


def test_plane_slices_are_in_neurological_orientation():
    x, y, z = 3, 4, 5
    volume = np.fromfunction(lambda i, j, k: i + 10 * j + 100 * k, (x, y, z))
    axial = display.plane_slice(volume, "axial", 2)
    assert axial.shape == (y, x)
    assert axial[0, 0] == volume[0, y - 1, 2]  # top left: x=0 (patient's left shown left), most anterior row
    assert axial[-1, -1] == volume[x - 1, 0, 2]
    coronal = display.plane_slice(volume, "coronal", 1)
    assert coronal.shape == (z, x) and coronal[0, 0] == volume[0, 1, z - 1]  # superior at the top
    sagittal = display.plane_slice(volume, "sagittal", 0)
    assert sagittal.shape == (z, y) and sagittal[0, -1] == volume[0, y - 1, z - 1]  # superior top, anterior right
    channels = display.plane_slice(volume[None], "axial", 2)
    assert channels.shape == (1, y, x) and np.array_equal(channels[0], axial)
    assert display.num_slices(volume.shape, "sagittal") == x
    with pytest.raises(IndexError):
        display.plane_slice(volume, "axial", z)
    with pytest.raises(ValueError, match="plane"):
        display.plane_slice(volume, "transverse", 0)


def test_pixel_aspect_and_upscale():
    assert display.pixel_aspect((0.5, 1.0, 3.0), "axial") == (1.0, 0.5)
    assert display.pixel_aspect((0.5, 1.0, 3.0), "coronal") == (3.0, 0.5)
    picture = np.arange(6).reshape(2, 3)
    big = display.upscale(picture, target=30)
    assert big.shape == (20, 30) and big[19, 29] == 5 and big[0, 10] == 1
    stretched = display.upscale(picture, target=30, aspect=(2.0, 1.0))  # rows twice as tall as columns are wide
    assert stretched.shape[0] / stretched.shape[1] == pytest.approx(2 * 2 / 3, rel=0.2)
    huge = np.zeros((600, 800))
    assert display.upscale(huge, target=480) is huge


@pytest.mark.parametrize("shape", [(1, 10240), (10240, 1), (3, 10240, 3), (1, 481), (2, 100_000), (1, 2**27)])
def test_upscale_thickens_a_thin_picture_so_the_page_can_shrink_it(shape):
    """A 1 x 10240 PNG shown at the page width was under one pixel high: Pillow's resize in st.image raised
    "height and width must be > 0". The short side is now at least 1/target of the long side, the size bounded."""
    from PIL import Image

    picture = np.broadcast_to(np.uint8(200), shape)  # a 1 x 2**27 view takes no memory
    out = display.upscale(picture, target=420)
    short, long = sorted(out.shape[:2])
    assert short * 420 >= long and short * long <= 420 * 16**2  # bounded: 16 x 6720 at most (max_factor 16)
    page = 1460  # Streamlit's widest picture: anything wider is resized to it, keeping the aspect
    height = int(out.shape[0] * page / out.shape[1]) if out.shape[1] > page else out.shape[0]
    assert height >= 1
    Image.fromarray(np.ascontiguousarray(out)).resize((min(page, out.shape[1]), height))  # what raised before
    assert display.upscale(np.zeros((600, 800)), target=480).shape == (600, 800)  # ordinary pictures unchanged


@pytest.mark.parametrize(
    "affine, axial, sagittal",
    [
        (np.diag([1.0, 1.0, 1.0, 1.0]), "LRAP", "PASI"),  # RAS voxels
        (np.diag([-1.0, 2.0, 3.0, 1.0]), "LRAP", "PASI"),  # x flipped (LAS, radiological files): still R on the right
        (np.array([[0, 0, -1.0, 0], [-1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]]), "LRAP", "PASI"),  # permuted
    ],
)
def test_edge_letters_name_where_the_patient_lies_at_each_edge(affine, axial, sagittal):
    shape = (5, 6, 7)
    for plane, expected in (("axial", axial), ("sagittal", sagittal)):
        letters = display.edge_letters(affine, shape, plane)
        assert "".join(letters[e] for e in ("left", "right", "top", "bottom")) == expected
    assert display.edge_letters(affine, shape, "coronal") == {"left": "L", "right": "R", "top": "S", "bottom": "I"}
    # The letters agree with the pixels: a voxel at the patient's right-anterior-superior corner (largest world
    # x, y, z) shows at the picture's "R"/"A"/"S" edges, whatever the voxel order of the file.
    corner = np.argmax(np.array([(affine @ [i, j, k, 1])[:3].sum() for i, j, k in np.ndindex(shape)]))
    volume = np.zeros(shape)
    volume[np.unravel_index(corner, shape)] = 1
    ras = display.to_ras(volume, affine)
    for plane in display.PLANES:
        index = int(np.argwhere(ras)[0][display.PLANE_AXIS[plane]])
        row, col = np.argwhere(display.plane_slice(ras, plane, index))[0]
        letters = display.edge_letters(affine, shape, plane)
        picture = display.plane_slice(ras, plane, 0)
        assert letters["right" if col == picture.shape[1] - 1 else "left"] in "RAS"
        assert letters["top" if row == 0 else "bottom"] in "RAS"
        assert col in (0, picture.shape[1] - 1) and row in (0, picture.shape[0] - 1)


def test_edge_letters_of_an_oblique_affine_take_the_closest_direction():
    angle = np.deg2rad(30)  # rotated 30 degrees about z: x still mostly R, y mostly A
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    assert display.edge_letters(rot, (4, 4, 4), "axial") == {"left": "L", "right": "R", "top": "A", "bottom": "P"}
    assert display.direction_letter((0, -0.9, 0.2)) == "P"
    with pytest.raises(ValueError, match="plane"):
        display.edge_letters(np.eye(4), (4, 4, 4), "oblique")


def test_mark_edges_writes_letters_at_the_edges_only():
    picture = np.full((200, 300, 3), 100, np.uint8)
    marked = display.mark_edges(picture, {"left": "R", "right": "L", "top": "A", "bottom": "P"})
    assert marked.shape == picture.shape and marked.dtype == np.uint8
    changed = np.any(marked != picture, axis=2)
    assert not changed[40:160, 40:260].any()  # the middle is untouched
    for region in (changed[80:120, :30], changed[80:120, -30:], changed[:30, 130:170], changed[-30:, 130:170]):
        assert region.any()
    assert (marked == 255).all(axis=2).any() and (marked == 0).all(axis=2).any()  # white letters, black outline


def test_zoom_box_shows_a_part_of_the_picture_kept_inside_it():
    assert display.zoom_box((1024, 1024), 1) == (slice(0, 1024), slice(0, 1024))
    assert display.zoom_box((1024, 1024), 4) == (slice(384, 640), slice(384, 640))  # the middle quarter of each side
    assert display.zoom_box((1040, 1388), 4, (0.0, 1.0)) == (slice(0, 260), slice(1041, 1388))  # a corner, inside
    assert display.zoom_box((5, 3), 8) == (slice(2, 3), slice(1, 2))  # never under one pixel
    with pytest.raises(ValueError, match="zoom"):
        display.zoom_box((4, 4), 0.5)
