"""unetseg.uploads: bytes + file name -> arrays, one clear DataError per bad file, nothing left on disk."""

from __future__ import annotations

import gzip
import io as pyio
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from unetseg import uploads
from unetseg.data import io
from unetseg.data.datasets import read_dsb_mask
from unetseg.errors import DataError, UnetsegError


def nifti_bytes(data: np.ndarray, affine: np.ndarray | None = None, compress: bool = True) -> bytes:
    img = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    raw = img.to_bytes()
    return gzip.compress(raw) if compress else raw


def png_bytes(pixels: np.ndarray, mode: str | None = None) -> bytes:
    buf = pyio.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buf, format="PNG") if mode else Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Route tempfile to a folder we can inspect, and run from an empty working directory."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.chdir(work)
    return tmp, work


def test_real_nifti_upload_matches_the_file_reader_and_leaves_no_files(data_root, private_tmp, monkeypatch):
    tmp, work = private_tmp
    path = data_root / "Task04_Hippocampus" / "imagesTr" / "hippocampus_003.nii.gz"
    seen = []
    reader = io.read_nifti_image
    monkeypatch.setattr(io, "read_nifti_image", lambda p: seen.append(Path(p)) or reader(p))
    image, meta = uploads.read_upload(path.name, path.read_bytes())
    expected, expected_meta = reader(path)
    assert np.array_equal(image, expected) and image.shape[0] == 1
    assert np.array_equal(meta.affine, expected_meta.affine) and meta.spacing == expected_meta.spacing
    assert meta.path == Path(path.name) and meta.kind == "nifti"
    assert seen and seen[0].is_relative_to(tmp)  # read from a temporary file under tempfile.gettempdir()
    assert list(tmp.iterdir()) == [] and list(work.iterdir()) == []  # and that file is gone; cwd untouched


def test_nifti_named_gz_but_uncompressed_still_reads():
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    image, meta = uploads.read_upload("scan.nii.gz", nifti_bytes(data, compress=False))
    assert np.array_equal(image[0], data)
    image, _ = uploads.read_upload("scan.nii", nifti_bytes(data, compress=True))
    assert np.array_equal(image[0], data)


def test_png_upload_rgba_drops_alpha_and_grey_gives_one_channel():
    rgba = np.random.default_rng(0).integers(0, 255, (5, 7, 4), dtype=np.uint8)
    image, meta = uploads.read_upload("cells.png", png_bytes(rgba))
    assert image.shape == (3, 5, 7) and np.array_equal(image, np.moveaxis(rgba[..., :3], -1, 0).astype(np.float32))
    assert meta.kind == "image2d" and meta.path == Path("cells.png")
    grey, _ = uploads.read_upload("g.PNG", png_bytes(rgba[..., 0]))
    assert grey.shape == (1, 5, 7)


def test_tif_and_jpg_uploads_read():
    pixels = np.stack([*np.meshgrid(np.arange(6) * 20, np.arange(8) * 10, indexing="ij"), np.full((6, 8), 90)], -1)
    pixels = pixels.astype(np.uint8)  # smooth, so JPEG stays close
    expected = np.moveaxis(pixels, -1, 0).astype(np.float32)
    for suffix, fmt, tolerance in ((".tif", "TIFF", 0), (".jpg", "JPEG", 8)):
        buf = pyio.BytesIO()
        Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}))
        image, meta = uploads.read_upload(f"x{suffix}", buf.getvalue())
        assert image.shape == (3, 6, 8) and meta.kind == "image2d"
        assert np.abs(image - expected).max() <= tolerance  # TIFF lossless; JPEG close


def test_upload_file_names_cannot_escape_the_temp_folder(private_tmp):
    tmp, work = private_tmp
    data = np.ones((2, 2, 2), dtype=np.float32)
    image, meta = uploads.read_upload("../../evil/..\\x.nii.gz", nifti_bytes(data))
    assert image.shape == (1, 2, 2, 2)
    assert list(tmp.iterdir()) == [] and list(work.iterdir()) == []
    assert not (work.parent / "evil").exists()


BAD = {
    "wrong type": ("notes.txt", b"hello", "unsupported file type"),
    "empty": ("scan.nii.gz", b"", "empty"),
    "empty png": ("cells.png", b"", "empty"),
    "truncated nifti": ("scan.nii.gz", None, "not a readable NIfTI"),
    "truncated uncompressed nifti": ("scan.nii", None, (  # nibabel's message is two lines
        "(OSError: Expected 32000 bytes, got 15824 bytes from scan.nii - could the file be damaged?); check it is complete")),
    "corrupt png": ("cells.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, "not a readable image"),
    "4D volume": ("fmri.nii.gz", None, "expected a 3D volume"),
    "two channels": ("la.png", None, "grey, RGB or RGBA"),
    "NaN volume": ("nan.nii", None, "NaN"),
}


def bad_bytes(case: str) -> bytes:
    if case.startswith("truncated"):
        full = nifti_bytes(np.random.default_rng(0).random((20, 20, 20)).astype(np.float32), compress="uncompressed" not in case)
        return full[: len(full) // 2]
    if case == "4D volume":
        return nifti_bytes(np.zeros((4, 4, 4, 3), dtype=np.float32))
    if case == "two channels":
        return png_bytes(np.zeros((10, 12, 2), dtype=np.uint8), mode="LA")
    if case == "NaN volume":
        data = np.zeros((3, 3, 3), dtype=np.float32)
        data[1, 1, 1] = np.nan
        return nifti_bytes(data, compress=False)
    return BAD[case][1]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_uploads_raise_one_clear_data_error_naming_the_file(case, private_tmp):
    tmp, work = private_tmp
    name, _, expected = BAD[case]
    with pytest.raises(DataError) as info:
        uploads.read_upload(name, bad_bytes(case))
    message = str(info.value)
    assert message.startswith(f"{name}: ") and expected in message
    assert "\n" not in message and str(tmp) not in message and "Traceback" not in message
    assert list(tmp.iterdir()) == [] and list(work.iterdir()) == []


def test_size_limit_from_argument_and_environment(monkeypatch):
    data = nifti_bytes(np.zeros((8, 8, 8), dtype=np.float32), compress=False)
    with pytest.raises(DataError, match=r"over the 0\.001 MB upload limit"):
        uploads.read_upload("big.nii", data, max_bytes=1000)
    monkeypatch.setenv(uploads.MAX_UPLOAD_ENV, "0.001")
    assert uploads.max_upload_bytes() == 1000
    with pytest.raises(DataError, match=uploads.MAX_UPLOAD_ENV):
        uploads.read_upload("big.nii", data)
    monkeypatch.setenv(uploads.MAX_UPLOAD_ENV, "lots")
    with pytest.raises(UnetsegError, match="UNETSEG_MAX_UPLOAD_MB=.lots. is not a positive number of megabytes"):
        uploads.max_upload_bytes()
    for raw in ("inf", "nan", "1e400"):  # an OverflowError or ValueError from int() before
        monkeypatch.setenv(uploads.MAX_UPLOAD_ENV, raw)
        with pytest.raises(UnetsegError, match=f"UNETSEG_MAX_UPLOAD_MB='{raw}' is not a positive number of megabytes"):
            uploads.max_upload_bytes()
    monkeypatch.delenv(uploads.MAX_UPLOAD_ENV)
    assert uploads.max_upload_bytes() == int(uploads.DEFAULT_MAX_UPLOAD_MB * 1e6)


def test_small_file_claiming_a_huge_volume_is_refused_before_decoding():
    header = nib.Nifti1Header()
    header.set_data_shape((2048, 2048, 2048))
    header.set_data_dtype(np.uint8)
    data = header.binaryblock + b"\x00" * 4 + b"\x00" * 1000  # vox_offset 352, then a short body
    with pytest.raises(DataError, match="bomb.nii: NIfTI header declares 2048 x 2048 x 2048 = .* pixel budget"):
        uploads.read_upload("bomb.nii", data)


def test_upload_kind_by_name_and_magic_bytes():
    assert uploads.upload_kind("a.nii.gz", b"") == "nifti"
    assert uploads.upload_kind("a.TIFF", b"") == "image2d"
    assert uploads.upload_kind("series.zip", b"") == "dicom"
    assert uploads.upload_kind("IM0001", b"\0" * 128 + b"DICM") == "dicom"
    assert uploads.upload_kind("export", b"PK\x03\x04rest") == "dicom"
    with pytest.raises(DataError, match="unsupported"):
        uploads.upload_kind("IM0001", b"\0" * 200)


def test_digest_is_sha256():
    assert uploads.digest(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# ---------------------------------------------------------------- ground truth


def test_nifti_label_upload_matches_reader_and_checks_shape_and_values(data_root):
    path = data_root / "Task04_Hippocampus" / "labelsTr" / "hippocampus_003.nii.gz"
    expected, _ = io.read_nifti_label(path, 3)
    labels = uploads.read_label_upload(path.name, path.read_bytes(), expected.shape, 3)
    assert labels.dtype == np.int64 and np.array_equal(labels, expected)
    with pytest.raises(DataError, match="does not match the image shape"):
        uploads.read_label_upload(path.name, path.read_bytes(), (1, 2, 3), 3)
    with pytest.raises(DataError, match=r"unknown label values \[2\]"):
        uploads.read_label_upload(path.name, path.read_bytes(), expected.shape, 2)


def test_png_label_binary_for_two_classes_indices_for_more():
    pixels = np.array([[0, 255, 0], [128, 0, 0]], dtype=np.uint8)
    assert uploads.read_label_upload("m.png", png_bytes(pixels), (2, 3), 2).tolist() == [[0, 1, 0], [1, 0, 0]]
    indices = np.array([[0, 1, 2], [2, 0, 0]], dtype=np.uint8)
    assert uploads.read_label_upload("m.png", png_bytes(indices), (2, 3), 3).tolist() == indices.tolist()
    with pytest.raises(DataError, match="unknown label values"):
        uploads.read_label_upload("m.png", png_bytes(pixels), (2, 3), 3)
    with pytest.raises(DataError, match="unsupported label type"):
        uploads.read_label_upload("m.txt", b"0 1", (2, 3), 2)
    with pytest.raises(DataError, match="empty"):
        uploads.read_label_upload("m.png", b"", (2, 3), 2)


def test_zip_of_dsb_masks_is_their_union_as_evaluate_reads_it(data_root):
    case = min((data_root / "dsb2018_stage1_train").iterdir())
    buf = pyio.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for f in sorted((case / "masks").glob("*.png")):
            archive.write(f, f"masks/{f.name}")
        archive.writestr("README.txt", "not a mask")
    expected = read_dsb_mask(case / "masks")
    labels = uploads.read_label_upload("masks.zip", buf.getvalue(), expected.shape, 2)
    assert np.array_equal(labels, expected) and labels.sum() > 0
    with pytest.raises(DataError, match="not a readable zip"):
        uploads.read_label_upload("masks.zip", buf.getvalue()[:100], expected.shape, 2)


# ---------------------------------------------------------------- downloads and samples


def test_prediction_download_nifti_keeps_affine_and_header(data_root):
    path = data_root / "Task04_Hippocampus" / "imagesTr" / "hippocampus_003.nii.gz"
    image, meta = uploads.read_upload(path.name, path.read_bytes())
    labels = (image[0] > np.median(image)).astype(np.int64)
    name, data, mime = uploads.prediction_download(labels, meta, num_classes=3)
    assert name == "hippocampus_003_prediction.nii.gz" and mime == "application/gzip"
    saved = nib.Nifti1Image.from_bytes(gzip.decompress(data))
    source = nib.load(path)
    assert np.array_equal(np.asarray(saved.dataobj), labels)
    assert np.allclose(saved.affine, source.affine)
    assert saved.header.get_zooms() == source.header.get_zooms()
    assert saved.header.get_data_dtype() == np.uint8


def test_prediction_download_png_for_2d():
    image, meta = uploads.read_upload("cells.png", png_bytes(np.zeros((4, 6, 3), dtype=np.uint8)))
    labels = np.zeros((4, 6), dtype=np.int64)
    labels[1:3, 2:5] = 1
    name, data, mime = uploads.prediction_download(labels, meta, num_classes=2)
    assert (name, mime) == ("cells_prediction.png", "image/png")
    assert np.array_equal(np.asarray(Image.open(pyio.BytesIO(data))), labels.astype(np.uint8) * 255)


def test_list_samples_finds_both_data_sets_and_nothing_in_an_empty_folder(data_root, tmp_path):
    found = uploads.list_samples(data_root)
    assert set(found) == {"hippocampus", "dsb2018"}
    assert len(found["hippocampus"]) == 208 and len(found["dsb2018"]) == 600
    assert all(r.label is not None for r in found["hippocampus"])
    name, data = uploads.read_sample(found["hippocampus"][0])
    assert name.endswith(".nii.gz") and data[:2] == b"\x1f\x8b"
    assert uploads.list_samples(tmp_path) == {}


@pytest.mark.parametrize("flag, method, message", [
    (0x1, None, "zip member m0.png is encrypted; zip the files without a password"),
    (0, 99, "zip member m0.png is encrypted (AES); zip the files without a password"),
    (0, 98, "zip member m0.png is compressed with method 98, which cannot be read"),
], ids=["encrypted", "AES", "PPMd"])
def test_a_mask_zip_with_an_encrypted_or_unreadable_member_is_one_error(flag, method, message, private_tmp):
    from .test_dicom import zip_patched

    tmp, _ = private_tmp
    masks = {f"m{i}.png": png_bytes(np.eye(4, dtype=np.uint8) * 255) for i in range(2)}
    with pytest.raises(DataError) as info:  # RuntimeError and NotImplementedError from zipfile before
        uploads.read_label_upload("masks.zip", zip_patched(masks, flag, method), (4, 4), 2)
    assert str(info.value).startswith(f"masks.zip: {message}")
    assert list(tmp.iterdir()) == []


def test_a_mask_zip_with_too_many_members_is_refused_before_unpacking(private_tmp, monkeypatch):
    from unetseg.data.dicom import MAX_ZIP_MEMBERS

    tmp, _ = private_tmp
    written = []
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: written.append(self))
    buf = pyio.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for i in range(MAX_ZIP_MEMBERS + 1):
            archive.writestr(f"masks/{i}.png", b"")
    with pytest.raises(DataError, match=f"masks.zip: zip holds {MAX_ZIP_MEMBERS + 1} files; the limit is {MAX_ZIP_MEMBERS}"):
        uploads.read_label_upload("masks.zip", buf.getvalue(), (4, 4), 2)
    assert written == [] and list(tmp.iterdir()) == []  # 20,000 blank PNGs used to be unpacked (27 s, 20k files)


def coloured_masks() -> dict[str, Image.Image]:
    """The same drawn square (rows 1-2, columns 2-4 of 4 x 6) stored the ways drawing tools save masks."""
    region = np.zeros((4, 6), bool)
    region[1:3, 2:5] = True
    blue, green = np.zeros((4, 6, 3), np.uint8), np.zeros((4, 6, 3), np.uint8)
    blue[region, 2], green[region, 1] = 255, 200
    palette = Image.fromarray(region.astype(np.uint8), "L").convert("P")
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 1 is blue: red channel 0
    alpha_only = np.zeros((4, 6, 4), np.uint8)
    alpha_only[region, 3] = 255  # black, drawn in the alpha channel only
    on_clear = np.zeros((4, 6, 4), np.uint8)
    on_clear[..., :3] = 255  # white but transparent background ...
    on_clear[region] = (0, 0, 0, 255)  # ... and an opaque black drawing
    red_opaque = np.zeros((4, 6, 4), np.uint8)
    red_opaque[..., 3] = 255
    red_opaque[region, 0] = 255
    grey_alpha = np.zeros((4, 6, 2), np.uint8)
    grey_alpha[region, 1] = 255
    return {"blue on black": Image.fromarray(blue), "green on black": Image.fromarray(green), "palette": palette,
            "alpha only": Image.fromarray(alpha_only), "black on transparent white": Image.fromarray(on_clear),
            "red on opaque black": Image.fromarray(red_opaque), "grey + alpha": Image.fromarray(grey_alpha, "LA")}


@pytest.mark.parametrize("kind", list(coloured_masks()))
def test_colour_palette_and_alpha_masks_read_as_the_drawn_region(kind, tmp_path):
    region = np.zeros((4, 6), bool)
    region[1:3, 2:5] = True
    mask = coloured_masks()[kind]
    path = tmp_path / "mask.png"
    mask.save(path)
    assert np.array_equal(io.read_mask_2d(path), region), kind  # read as empty (the red channel) before
    (tmp_path / "masks").mkdir()
    mask.save(tmp_path / "masks" / "a.png")
    assert np.array_equal(read_dsb_mask(tmp_path / "masks"), region)  # how evaluate and training read DSB masks
    labels = uploads.read_label_upload("mask.png", path.read_bytes(), (4, 6), 2)  # the viewer's ground truth
    assert np.array_equal(labels, region.astype(np.int64))


def test_empty_masks_stay_empty_and_colour_is_no_class_index(tmp_path):
    for name, pixels in (("black.png", np.zeros((4, 6, 3), np.uint8)), ("opaque.png", np.zeros((4, 6, 4), np.uint8))):
        if pixels.shape[2] == 4:
            pixels[..., 3] = 255  # an opaque black mask: empty, not all foreground
        Image.fromarray(pixels).save(tmp_path / name)
        assert not io.read_mask_2d(tmp_path / name).any()
    indices = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    palette = Image.fromarray(indices, "L").convert("P")
    palette.putpalette([0, 0, 0, 0, 0, 255, 0, 255, 0] + [0] * 759)
    buf = pyio.BytesIO()
    palette.save(buf, format="PNG")  # a palette label map: its indices are the classes (blue 1, green 2)
    assert uploads.read_label_upload("l.png", buf.getvalue(), (2, 3), 3).tolist() == indices.tolist()
    colour = png_bytes(np.stack([indices * 100, indices, indices], -1))
    with pytest.raises(DataError, match="l.png: a colour label image cannot hold the class indices 0..2; save each"):
        uploads.read_label_upload("l.png", colour, (2, 3), 3)
    grey_as_rgb = png_bytes(np.repeat(indices[..., None], 3, axis=2))
    assert uploads.read_label_upload("l.png", grey_as_rgb, (2, 3), 3).tolist() == indices.tolist()


@pytest.mark.parametrize("raw", ["lots", "inf", "nan", "1e400", "0", "-5"])
def test_every_limit_refuses_a_bad_number_in_the_same_words(monkeypatch, raw):
    """The upload, pixel and inference-memory limits share one reader, so one bad value reads alike in each."""
    from unetseg.data import io
    from unetseg.infer import INFER_MEMORY_ENV, infer_memory_mb

    for env, unit, read in ((uploads.MAX_UPLOAD_ENV, "megabytes", uploads.max_upload_bytes),
                            (io.MAX_PIXELS_ENV, "pixels", io.max_pixels),
                            (INFER_MEMORY_ENV, "megabytes", infer_memory_mb)):
        monkeypatch.setenv(env, raw)
        with pytest.raises(UnetsegError, match=f"^{env}='{raw}' is not a positive number of {unit}; set it to e.g. "):
            read()
        monkeypatch.delenv(env)
