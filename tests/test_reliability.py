"""Hostile and careless inputs, built here (no committed binaries): each gives a clean error or a correct result.

The catalogue and its outcomes are written up in docs/reliability.md.
"""

from __future__ import annotations

import io as pyio
import json
import struct
import subprocess
import sys
import zlib

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from unetseg import uploads
from unetseg.cli import main
from unetseg.data import io
from unetseg.errors import DataError, UnetsegError

from .test_dicom import dicom_bytes


# ------------------------------------------------------------------ hostile files, made in memory

def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring ``width x height`` grey pixels, with a tiny (truncated) body."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 4096)) + chunk(b"IEND", b"")


def nifti_bomb(shape=(1000, 1000, 1000)) -> bytes:
    """An 80-byte-body NIfTI whose header declares ``shape`` float32 voxels."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    return header.binaryblock + b"\x00" * 4 + b"\x00" * 80


def nifti_patched(*patches: tuple[int, str, tuple]) -> bytes:
    """A valid 20 x 24 x 16 float32 NIfTI-1 (uncompressed) with header fields then overwritten in place:
    ``(byte offset, struct format, values)``; nibabel refuses to write such headers itself."""
    data = np.random.default_rng(0).random((20, 24, 16)).astype(np.float32)
    raw = bytearray(nib.Nifti1Image(data, np.eye(4)).to_bytes())
    for offset, fmt, values in patches:
        struct.pack_into("<" + fmt, raw, offset, *values)
    return bytes(raw)


def one_error_line(err: str) -> str:
    """The CLI's stderr when it refused an input: exactly one line, ``error: ...``; returns it."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def peak_rss_mb(code: str) -> tuple[float, str]:
    """Run ``code`` in a fresh Python that has imported unetseg already; returns how far its peak resident
    memory (MB) rose above that baseline (the imports alone take 600 MB or so, varying by machine) and what it printed."""
    script = ("import resource\nimport unetseg.cli, unetseg.data.io, unetseg.uploads\n"
              "print('base', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
              f"{code}\nprint('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    value = {line.split()[0]: int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith(("base", "peak"))}
    return (value["peak"] - value["base"]) / 1024, result.stdout


# ------------------------------------------------------------------ decompression bombs: refused before decoding

def test_png_bomb_is_refused_from_its_header_with_bounded_memory(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb(13000, 13000))  # 169 million pixels, a few hundred bytes
    with pytest.raises(DataError, match=r"13000 x 13000 = 169,000,000 pixels, over the 134,217,728 pixel budget"):
        io.read_image_2d(bomb)
    code = (f"from unetseg.data.io import read_image_2d\n"
            f"try:\n    read_image_2d({str(bomb)!r})\nexcept Exception as exc:\n    print('refused', exc)")
    peak, printed = peak_rss_mb(code)
    assert "refused" in printed and "pixel budget" in printed
    assert peak < 100, f"peak rose {peak:.0f} MB: the bomb was decoded (169 MB and more)"


def test_nifti_bomb_is_refused_from_its_header_by_the_cli_api_and_viewer(tmp_path, capsys):
    data = nifti_bomb()
    path = tmp_path / "bomb.nii"
    path.write_bytes(data)
    with pytest.raises(DataError, match="1000 x 1000 x 1000 = 1,000,000,000 pixels"):
        io.read_image(path)
    with pytest.raises(DataError, match="bomb.nii: NIfTI header declares 1000 x 1000 x 1000"):
        uploads.read_upload("bomb.nii", data)
    assert main(["predict", "--checkpoint", "hippocampus_2d", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "pixel budget" in err and "--max-pixels" in err
    peak, printed = peak_rss_mb(
        f"from unetseg.data.io import read_image\ntry:\n    read_image({str(path)!r})\nexcept Exception as exc:\n    print('refused')"
    )
    assert "refused" in printed and peak < 100


def test_pixel_budget_from_the_cli_the_environment_and_the_default(tmp_path, monkeypatch, capsys, data_root):
    scan = sorted((data_root / "Task04_Hippocampus" / "imagesTr").glob("hippocampus_*.nii.gz"))[0]
    voxels = int(np.prod(nib.load(str(scan)).shape))
    assert io.max_pixels() == io.DEFAULT_MAX_PIXELS == 2**27
    rc = main(["predict", "--checkpoint", "hippocampus_2d", str(scan), "--out", str(tmp_path / "a"),
               "--max-pixels", str(voxels - 1), "--quiet"])
    assert rc == 2 and "pixel budget" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main(["predict", "--checkpoint", "hippocampus_2d", str(scan), "--out", str(tmp_path / "b"),
                 "--max-pixels", str(voxels), "--quiet"]) == 0
    assert io.max_pixels() == 2**27  # the CLI's budget ends with the command
    monkeypatch.setenv(io.MAX_PIXELS_ENV, "100")
    with pytest.raises(DataError, match="over the 100 pixel budget"):
        io.read_image(scan)
    with io.pixel_budget(voxels):
        assert io.read_image(scan)[0].shape[1:] == nib.load(str(scan)).shape
    monkeypatch.setenv(io.MAX_PIXELS_ENV, "many")
    with pytest.raises(UnetsegError, match="UNETSEG_MAX_PIXELS='many' is not a positive number of pixels"):
        io.max_pixels()


def test_tiff_over_the_budget_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.tif"
    Image.fromarray(np.zeros((200, 300), np.uint8)).save(path, compression="tiff_deflate")
    monkeypatch.setenv(io.MAX_PIXELS_ENV, str(200 * 300 - 1))
    with pytest.raises(DataError, match="200 x 300 = 60,000 pixels"):
        io.read_image_2d(path)
    with pytest.raises(DataError, match="60,000 pixels"):
        uploads.read_upload("big.tif", path.read_bytes())
    monkeypatch.setenv(io.MAX_PIXELS_ENV, str(200 * 300))
    assert io.read_image_2d(path)[0].shape == (1, 200, 300)


def test_dicom_declaring_too_many_pixels_is_refused_before_pixel_decoding(monkeypatch):
    data = dicom_bytes(np.zeros((64, 64), np.uint16), (0, 0, 0))
    monkeypatch.setenv(io.MAX_PIXELS_ENV, str(64 * 64 - 1))
    with pytest.raises(DataError, match="DICOM image declares 1 x 64 x 64 = 4,096 pixels"):
        uploads.read_upload("slice.dcm", data)
    monkeypatch.setenv(io.MAX_PIXELS_ENV, str(64 * 64))
    assert uploads.read_upload("slice.dcm", data)[0].shape == (1, 64, 64, 1)


def test_deflated_dicom_bomb_is_refused_by_the_bytes_it_inflates_to(monkeypatch):
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(pyio.BytesIO(dicom_bytes(np.zeros((2000, 2000), np.uint16), (0, 0, 0))))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = pyio.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    bomb = buf.getvalue()
    assert len(bomb) < 100_000  # 8 MB of pixels
    monkeypatch.setenv(io.MAX_PIXELS_ENV, "1000000")  # 4 MB of inflated data allowed
    with pytest.raises(DataError, match="deflated DICOM inflates to over 4 MB"):
        uploads.read_upload("deflated.dcm", bomb)
    monkeypatch.setenv(io.MAX_PIXELS_ENV, str(2000 * 2000))
    assert uploads.read_upload("deflated.dcm", bomb)[0].shape == (1, 2000, 2000, 1)


def excess_dicom(pixel_bytes: int) -> bytes:
    """A DICOM declaring one 64 x 64 frame of 1-bit pixels (512 bytes) that holds ``pixel_bytes`` of pixel data."""
    import pydicom

    ds = pydicom.dcmread(pyio.BytesIO(dicom_bytes(np.zeros((64, 64), np.uint16), (0, 0, 0), slope=1.0, intercept=0.0)))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
    ds.PixelData = np.random.default_rng(0).integers(0, 255, pixel_bytes, dtype=np.uint8).tobytes()
    buf = pyio.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_dicom_holding_more_pixel_data_than_its_header_declares_is_refused_before_decoding(tmp_path):
    """The header's 64 x 64 x 1 frame passes the pixel budget; 20 MB of 1-bit data used to decode to 39,062 frames
    (160 million voxels, 2.3 GB): the data's length is checked against the header before pixel_array."""
    bomb = excess_dicom(20_000_000)
    with pytest.raises(DataError) as info:
        uploads.read_upload("excess.dcm", bomb)
    assert str(info.value) == ("excess.dcm: DICOM pixel data holds 20,000,000 bytes, more than the 512 its header "
                               "declares (Rows x Columns x NumberOfFrames x SamplesPerPixel x BitsAllocated); fix "
                               "those tags or re-export the file")
    path = tmp_path / "excess.dcm"
    path.write_bytes(bomb)
    peak, printed = peak_rss_mb(f"from unetseg import uploads\ndata = open({str(path)!r}, 'rb').read()\n"
                                "try:\n    uploads.read_upload('excess.dcm', data)\nexcept Exception as exc:\n"
                                "    print('refused', type(exc).__name__)")
    assert "refused DataError" in printed
    assert peak < 100, f"peak rose {peak:.0f} MB: the excess frames were decoded"
    image, _ = uploads.read_upload("exact.dcm", excess_dicom(512))  # the declared length (even: no padding byte)
    assert image.shape == (1, 64, 64, 1) and set(np.unique(image)) <= {0.0, 1.0}
    with pytest.raises(DataError, match="holds 514 bytes, more than the 512"):
        uploads.read_upload("two.dcm", excess_dicom(514))


# ------------------------------------------------------------------ colour modes and pages

def test_cmyk_and_palette_images_are_converted_to_rgb(tmp_path):
    white_cmyk = tmp_path / "white.jpg"
    Image.new("CMYK", (16, 12), (0, 0, 0, 0)).save(white_cmyk)  # no ink: white
    image, _ = io.read_image_2d(white_cmyk)
    assert image.shape == (3, 12, 16) and image.min() > 245  # read as RGB before: CMY channels, black
    palette = Image.new("P", (10, 8))
    palette.putpalette([0, 0, 0, 200, 30, 10] + [0] * 762)
    palette.putpixel((3, 2), 1)
    palette.save(tmp_path / "palette.png")
    image, _ = io.read_image_2d(tmp_path / "palette.png")
    assert image.shape == (3, 8, 10)
    np.testing.assert_array_equal(image[:, 2, 3], [200, 30, 10])
    assert image[:, 0, 0].tolist() == [0, 0, 0]


def test_multi_page_tiff_is_refused_with_a_clear_message(tmp_path):
    pages = [Image.fromarray(np.full((20, 30), v, np.uint8)) for v in (10, 20, 30)]
    path = tmp_path / "stack.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    with pytest.raises(DataError, match="stack.tif: image holds 3 pages or frames, not one grey, RGB or RGBA 2D image; save the page"):
        io.read_image_2d(path)
    with pytest.raises(DataError, match="stack.tif: image holds 3 pages"):
        uploads.read_upload("stack.tif", path.read_bytes())


# ------------------------------------------------------------------ nothing overwritten that the user did not ask for

def test_predict_refuses_to_replace_an_existing_prediction_unless_overwrite(tmp_path, capsys):
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(photo)
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "photo.png"
    mine.write_bytes(b"the user's own file")
    args = ["predict", "--checkpoint", "dsb2018_2d", str(photo), "--out", str(out), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "photo.png already exists; pass --overwrite" in err
    assert mine.read_bytes() == b"the user's own file"
    assert main([*args, "--overwrite"]) == 0
    assert np.asarray(Image.open(mine)).shape == (40, 48)
    (tmp_path / "file").write_text("x")
    assert main(["predict", "--checkpoint", "dsb2018_2d", str(photo), "--out", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["../../../../x", "a/b", "..", ".hidden", "a\\b", "", "x" * 80])
def test_export_name_must_be_a_plain_model_name(tmp_path, name, capsys):
    assert main(["export", str(tmp_path), "--name", name]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "not a plain model name" in err


def test_export_refuses_to_replace_a_shipped_model_unless_overwrite(tmp_path, capsys):
    from unetseg.export import export_run
    from unetseg.infer import PRETRAINED_DIR

    before = (PRETRAINED_DIR / "hippocampus_2d" / "model.pt").read_bytes()
    assert main(["export", str(tmp_path / "no_run"), "--name", "hippocampus_2d"]) == 2
    err = capsys.readouterr().err
    assert "hippocampus_2d already holds a model; pass --overwrite" in err
    assert (PRETRAINED_DIR / "hippocampus_2d" / "model.pt").read_bytes() == before
    # with --overwrite the guard lets it through (here the run folder is missing, so loading best.pt fails next)
    dest = tmp_path / "models"
    (dest / "m").mkdir(parents=True)
    (dest / "m" / "model.pt").write_bytes(b"old")
    with pytest.raises(UnetsegError, match="already holds a model"):
        export_run(tmp_path / "no_run", "m", dest=dest)
    with pytest.raises(UnetsegError, match="not a finished unetseg run"):
        export_run(tmp_path / "no_run", "m", dest=dest, overwrite=True)
    assert json.dumps(sorted(p.name for p in (dest / "m").iterdir())) == '["model.pt"]'


# ------------------------------------------------------------------ train: run folders, logs, finite losses

def test_train_refuses_an_out_folder_holding_the_user_s_files(tmp_path, data_root, capsys):
    from .conftest import tiny_config
    from unetseg.train import fit

    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("my own settings\n")
    with pytest.raises(UnetsegError, match=r"holds files that are not a unetseg run \(config.yaml\)"):
        fit(tiny_config(), out, data_root=data_root, progress=False)
    assert main(["train", "--out", str(out), "--epochs", "1", "--data-root", str(data_root), "--quiet"]) == 2
    assert capsys.readouterr().err.count("error:") == 1
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]
    assert (out / "config.yaml").read_text() == "my own settings\n"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UnetsegError, match="is a file, not a folder"):
        fit(tiny_config(), tmp_path / "afile", data_root=data_root, progress=False)


def test_run_killed_before_its_first_checkpoint_restarts_clean(tmp_path, data_root):
    from .conftest import tiny_config
    from unetseg.train import fit

    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "command.txt"):
        (run / name).write_text("from the killed run\n")
    (run / "split.json").write_text('{"train": [], "val": []}')
    (run / "metrics.jsonl").write_text('{"epoch": 1, "step": 3, "train_loss": 9.0, "lr": 0.1, "samples_per_s": 1, "elapsed_s": 1}\n')
    (run / ".last.pt.k1ll3d").write_bytes(b"half a checkpoint")
    with pytest.raises(UnetsegError, match="nothing to resume .*start it again without --resume"):
        fit(tiny_config(), run, data_root=data_root, progress=False, resume=True)
    fit(tiny_config(), run, data_root=data_root, progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1] and rows[0]["train_loss"] != 9.0  # fresh rows, nothing appended
    assert not list(run.glob(".last.pt.*")) and (run / "last.pt").is_file()
    assert "from the killed run" not in (run / "config.yaml").read_text()


def test_partial_last_metrics_line_and_stale_temp_files_do_not_stop_resume(tmp_path, data_root):
    from .conftest import tiny_config
    from unetseg.train import fit

    cfg = tiny_config(["train.epochs=2", "train.steps_per_epoch=1"])
    run = tmp_path / "run"
    fit(cfg, run, data_root=data_root, progress=False, stop_after_epoch=0)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 2, "step": 2, "train_lo')  # the disk filled up mid-line
    (run / ".last.pt.abc123").write_bytes(b"x")
    (run / ".best.pt.def456").write_bytes(b"x")
    fit(cfg, run, data_root=data_root, progress=False, resume=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert not list(run.glob(".*.pt.*"))
    (run / "metrics.jsonl").write_text('{"epoch": 0}\n{broken\n{"epoch": 1}\n')
    from unetseg.runlog import read_jsonl

    with pytest.raises(UnetsegError, match="metrics.jsonl: line 2 is not valid JSON"):
        read_jsonl(run / "metrics.jsonl")


def test_non_finite_loss_stops_training_with_one_line_naming_the_setting(tmp_path, data_root, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--set", "train.lr=1e30", "--set", "data.max_cases=8", "--set", "train.steps_per_epoch=3",
               "--set", "train.batch_size=8", "--set", "model.channels=[4, 8, 16]", "--set", "data.patch_size=[48, 64]",
               "--epochs", "2", "--out", str(out), "--data-root", str(data_root), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and "Traceback" not in err
    assert "training loss became nan" in err and "lower train.lr (now 1e+30)" in err
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()


# ------------------------------------------------------------------ one line for every user error

BAD_SETTINGS = [
    ("model.norm=foo", "model.norm='foo' must be one of 'batch', 'instance', 'group'"),
    ("model.merge=foo", "model.merge='foo' must be one of 'concat', 'add'"),
    ("model.channels=[]", "model.channels=[] needs at least 2 levels"),
    ("model.channels=[8]", "model.channels=[8] needs at least 2 levels"),
    ("model.channels=[8, 0]", "model.channels=[8, 0] needs at least 2 levels of at least 1 feature map"),
    ("model.dropout=2", "model.dropout=2 must be below 1"),
    ("model.spatial_dims=4", "model.spatial_dims=4 must be one of 2, 3"),
    ("data.normalization=foo", "data.normalization='foo' must be one of 'percentile', 'zscore'"),
    ("data.slice_axis=5", "data.slice_axis=5 must be one of 0, 1, 2"),
    ("data.patch_size=[3]", "data.patch_size=[3] needs 2 sizes (model.spatial_dims), each at least 16"),
    ("data.patch_size=[4, 64]", "data.patch_size=[4, 64] needs 2 sizes"),
    ("data.val_fraction=5", "data.val_fraction=5 must be below 1"),
    ("data.dataset=foo", "data.dataset='foo' must be one of"),
    ("data.fold=3", "data.fold=3 must be below data.num_folds=3"),
    ("train.lr=.nan", "train.lr=nan must be a finite number"),
    ("train.lr=.inf", "train.lr=inf must be a finite number"),
    ("train.device=tpu", "train.device='tpu' must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("train.schedule=foo", "train.schedule='foo' must be one of 'cosine', 'poly'"),
]


@pytest.mark.parametrize("setting, message", BAD_SETTINGS, ids=[s for s, _ in BAD_SETTINGS])
def test_every_bad_setting_is_one_line_before_any_training(setting, message, tmp_path, capsys):
    extra = ["--set", "data.num_folds=3"] if setting.startswith("data.fold") else []
    out = tmp_path / "run"
    assert main(["train", "--set", setting, *extra, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err and message in err, err
    assert not out.exists()  # refused before the run folder or the data were touched


def test_a_config_file_with_no_levels_is_one_line_naming_the_file(tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_text("model:\n  channels: []\n")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and f"{config}: model.channels=[] needs at least 2 levels" in err


def test_an_out_folder_that_cannot_be_made_is_one_line(tmp_path, data_root, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    rc = main(["train", "--out", str(blocker / "run"), "--data-root", str(data_root), "--set", "data.max_cases=4",
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and "Traceback" not in err
    assert str(blocker / "run") in err and "Not a directory" in err and blocker.read_text() == "mine"


def damaged(tmp_path, name: str, change, model: str = "hippocampus_2d") -> str:
    """The shipped checkpoint ``model`` with ``change(payload)`` applied, saved as ``name``."""
    import torch

    from unetseg.infer import resolve_checkpoint

    payload = torch.load(resolve_checkpoint(model), weights_only=True)
    change(payload)
    torch.save(payload, tmp_path / name)
    return str(tmp_path / name)


@pytest.mark.parametrize("name, change, message", [
    ("no_weights.pt", lambda p: p.pop("state_dict"), "damaged checkpoint: entry 'state_dict' is missing"),
    ("no_names.pt", lambda p: p.pop("class_names"), "entry 'class_names' is missing"),
    ("bad_args.pt", lambda p: p["model_args"].update(widths=3), "do not fit the network"),
    ("shapes.pt", lambda p: p["state_dict"].update({"encoder.0.conv1.weight": np.zeros((3, 3), np.float32)}),
     "size mismatch for encoder.0.conv1.weight"),
    ("other_net.pt", lambda p: p.update(state_dict={"fc.weight": np.zeros((2, 2), np.float32)}), "Missing key(s)"),
])
def test_a_damaged_checkpoint_is_one_line_naming_it(tmp_path, data_root, capsys, name, change, message):
    import torch

    def to_torch(payload):
        change(payload)
        payload["state_dict"] = {k: torch.as_tensor(v) for k, v in payload.get("state_dict", {}).items()} \
            if "state_dict" in payload else None
        if payload["state_dict"] is None:
            payload.pop("state_dict")

    path = damaged(tmp_path, name, to_torch)
    scan = data_root / "Task04_Hippocampus" / "imagesTr" / "hippocampus_003.nii.gz"
    assert main(["predict", "--checkpoint", path, str(scan), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err and path in err and message in err, err


def test_a_nifti_with_a_nan_affine_is_one_line(tmp_path, capsys):
    header = nib.Nifti1Header()
    header.set_data_shape((8, 9, 10))
    header.set_data_dtype(np.float32)
    header["srow_x"], header["srow_y"], header["srow_z"] = [np.nan, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]
    header["sform_code"], header["qform_code"], header["vox_offset"] = 1, 0, 352
    path = tmp_path / "nan_affine.nii"
    path.write_bytes(header.binaryblock + b"\x00" * 4 + np.ones((8, 9, 10), np.float32).tobytes(order="F"))
    with pytest.raises(DataError, match="nan_affine.nii: the header's orientation .* is not finite or is singular"):
        io.read_image(path)
    assert main(["predict", "--checkpoint", "hippocampus_2d", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "not finite or is singular" in err


NIFTI_HEADERS = {  # header fields nibabel refuses, written over a valid file: (offset, format, values), message
    "datatype 9999": ((70, "hh", (9999, 32)), "HeaderDataError: data code 9999 not recognized"),
    "datatype 0": ((70, "hh", (0, 0)), "HeaderDataError: data code 0 not supported"),
    "datatype 1 (bits)": ((70, "hh", (1, 1)), "HeaderDataError: data code 1 not supported"),
    "datatype 1536 (float128)": ((70, "hh", (1536, 128)), "HeaderDataError: data code 1536 not supported"),
    "scl_inter inf": ((112, "ff", (1.0, np.inf)), "HeaderDataError: Valid slope but invalid intercept inf"),
    "vox_offset -100": ((108, "f", (-100.0,)), "HeaderDataError: vox offset -100 too low"),
    "dim[0] 9": ((40, "8h", (9, 20, 24, 16, 1, 1, 1, 1)), "not a readable NIfTI file (HeaderDataError"),
    "dim[1] -20": ((40, "8h", (3, -20, 24, 16, 1, 1, 1, 1)), "declares -20 x 24 x 16 pixels: an axis without pixels"),
    "dim 20 x 0 x 16": ((40, "8h", (3, 20, 0, 16, 1, 1, 1, 1)), "declares 20 x 0 x 16 pixels: an axis without pixels"),
    "truncated": (None, "not a readable NIfTI file (OSError: Expected 30720 bytes, got 100 bytes from"),
}


@pytest.mark.parametrize("case", list(NIFTI_HEADERS))
def test_a_nifti_header_nibabel_rejects_is_one_line_in_the_api_and_the_cli(case, tmp_path, capsys):
    patch, message = NIFTI_HEADERS[case]
    data = nifti_patched(patch) if patch else nifti_patched()[:352 + 100]  # truncated: 100 bytes of 30720
    path = tmp_path / "bad.nii"
    path.write_bytes(data)
    with pytest.raises(DataError) as info:
        io.read_image(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value) and "\n" not in str(info.value)
    assert main(["predict", "--checkpoint", "hippocampus_2d", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert message in one_error_line(capsys.readouterr().err)  # and nothing else: nibabel's own log lines muted


@pytest.mark.parametrize("dtype, message", [
    (nib.nifti1.data_type_codes.dtype[128], "voxels are colour (RGB, one value per channel); this network takes a grey"),
    (nib.nifti1.data_type_codes.dtype[2304], "voxels are colour (RGBA, one value per channel)"),
    (np.complex64, "voxels are complex numbers (complex64); save the magnitude or the real part"),
    (np.complex128, "voxels are complex numbers (complex128)"),
], ids=["RGB24", "RGBA32", "complex64", "complex128"])
def test_a_nifti_of_colour_or_complex_voxels_is_refused_not_cast(dtype, message, tmp_path):
    data = np.ones((4, 5, 6), dtype=dtype)
    path = tmp_path / "odd.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with pytest.raises(DataError, match=f"odd.nii.gz: {__import__('re').escape(message)}"):
        io.read_image(path)  # colour used to be a TypeError; complex silently lost its imaginary part
    with pytest.raises(DataError, match=__import__("re").escape(message)):
        uploads.read_upload("odd.nii.gz", path.read_bytes())


def test_an_image_with_an_axis_of_no_pixels_is_refused_by_every_reader(tmp_path):
    path = tmp_path / "flat.nii"
    path.write_bytes(nifti_patched((40, "8h", (3, 20, 0, 16, 1, 1, 1, 1))))
    with pytest.raises(DataError, match="flat.nii: NIfTI header declares 20 x 0 x 16 pixels: an axis without pixels"):
        io.read_image(path)  # used to read as (1, 20, 0, 16): an IndexError in the percentile of the viewer's window
    (tmp_path / "row.png").write_bytes(png_bomb(0, 10))
    with pytest.raises(DataError, match="row.png: "):
        io.read_image(tmp_path / "row.png")
    with pytest.raises(DataError, match="empty.dcm: DICOM image declares 1 x 0 x 7 pixels: an axis without pixels"):
        uploads.read_upload("empty.dcm", dicom_bytes(np.zeros((0, 7), np.uint16), (0, 0, 0)))


@pytest.mark.parametrize("change, message", [
    (lambda d: d["training"][0].pop("image"), "'training' entry 0 needs an 'image' path"),
    (lambda d: d.__setitem__("labels", {"a": "background", "b": "x"}), "'labels' keys must be class indices"),
    (lambda d: d.__setitem__("labels", {"0": "background", "2": "x"}), "keys must be the class indices 0..1, got [0, 2]"),
    (lambda d: d.__setitem__("training", ["x", 3]), "'training' entry 1 needs an 'image' path"),
])
def test_a_broken_dataset_json_is_one_line_naming_it(tmp_path, data_root, change, message):
    from unetseg.data.datasets import list_msd_cases

    original = data_root / "Task04_Hippocampus" / "dataset.json"
    manifest = json.loads(original.read_text())
    change(manifest)
    (tmp_path / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"dataset.json: .*{__import__('re').escape(message)}"):
        list_msd_cases(tmp_path)


def test_a_folder_of_volumes_for_a_2d_rgb_model_is_one_line_naming_the_file(tmp_path, capsys):
    folder = tmp_path / "scans"
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        nib.save(nib.Nifti1Image(rng.random((32, 32, 8)).astype(np.float32), np.eye(4)), folder / "images" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image((rng.random((32, 32, 8)) > 0.5).astype(np.uint8), np.eye(4)), folder / "masks" / f"{name}.nii.gz")
    rc = main(["train", "--config", "dsb2018_2d", "--set", "data.dataset=folder", "--data-root", str(folder),
               "--out", str(tmp_path / "run"), "--quiet"])
    line = one_error_line(capsys.readouterr().err)  # before: a RuntimeError from conv2d after the run folder was made
    assert rc == 2 and not (tmp_path / "run").exists()
    assert line == (f"error: {folder / 'images' / 'a.nii.gz'}: a volume of 1 channel(s), but the folder data set's "
                    "network takes 3 (the folder data set reads 2D images: PNG, JPEG, TIFF, BMP); save the volume's "
                    "slices as 2D images under images/ and masks/ with matching names")
    checkpoint = damaged(tmp_path, "folder.pt", lambda p: p.update(class_names=["background", "foreground"],
                                                                    dataset="folder"), model="dsb2018_2d")
    assert main(["evaluate", "--checkpoint", checkpoint, "--split", "all", "--data-root", str(folder),
                 "--out", str(tmp_path / "ev"), "--quiet"]) == 2
    assert one_error_line(capsys.readouterr().err) == line


def test_json_outputs_are_strict_null_for_undefined_values(tmp_path):
    from unetseg.runlog import append_jsonl, dumps, read_jsonl, write_json

    value = {"hd95": float("nan"), "far": np.float32(np.inf), "list": [np.float64(-np.inf), np.int64(2)], "ok": 0.5}
    assert dumps(value) == '{"hd95": null, "far": null, "list": [null, 2], "ok": 0.5}'
    append_jsonl(tmp_path / "log.jsonl", value)
    write_json(tmp_path / "summary.json", value)
    for path in (tmp_path / "log.jsonl", tmp_path / "summary.json"):
        json.loads(path.read_text().splitlines()[0] if path.suffix == ".jsonl" else path.read_text(),
                   parse_constant=lambda c: pytest.fail(f"{path.name} holds {c}"))
    assert read_jsonl(tmp_path / "log.jsonl")[0]["hd95"] is None


# ------------------------------------------------------------------ finite inputs, finite outputs

@pytest.mark.parametrize("method", ["zscore", "percentile"])
def test_one_non_finite_voxel_is_replaced_not_wiping_the_channel(method):
    from unetseg.data.preprocess import normalize_intensity

    rng = np.random.default_rng(0)
    image = rng.normal(100, 20, (1, 9, 10, 11)).astype(np.float32)
    image[0, 3:6, 4:7, 5:8] = 123.0  # the voxel's nearest neighbours all hold 123: what it becomes
    clean = normalize_intensity(image, method)
    for bad in (np.nan, np.inf, -np.inf):
        broken = image.copy()
        broken[0, 4, 5, 6] = bad
        with pytest.warns(UserWarning, match="channel 0: 1 of 990 values are NaN or infinite; replaced by the nearest"):
            out = normalize_intensity(broken, method)
        assert np.isfinite(out).all() and out.std() > 0.1
        np.testing.assert_allclose(out, clean, atol=1e-6)
    two = np.stack([image[0], np.full(image.shape[1:], np.nan, np.float32)])  # half the values: still repaired
    with pytest.warns(UserWarning, match="scan.nii: channel 1: 990 of 990 values"):
        out = normalize_intensity(two, method, source="scan.nii")
    assert not out[1].any() and np.allclose(out[0], clean[0], atol=1e-6)  # a channel with no finite value: zeros
    with pytest.raises(DataError, match="image: 9 of 9 values are NaN or infinite, more than half, too many to fill in"):
        normalize_intensity(np.full((1, 3, 3), np.nan, np.float32), method)  # used to become zeros: a blank mask


def test_an_image_mostly_nan_or_infinite_is_refused_naming_the_file(tmp_path, capsys):
    """An int16 volume with scl_slope 3e38 decodes to infinities; an all-NaN volume holds nothing: both are refused
    by the readers with one line (they used to be predicted as if blank); a few NaN are repaired with a warning."""
    slope = nib.Nifti1Image(np.full((10, 11, 12), 100, np.int16), np.eye(4))
    slope.header.set_slope_inter(3e38, 0)
    nib.save(slope, tmp_path / "slope.nii")
    nib.save(nib.Nifti1Image(np.full((10, 11, 12), np.nan, np.float32), np.eye(4)), tmp_path / "nan.nii.gz")
    tiff = np.ones((20, 30), np.float32)
    tiff[:, :16] = np.nan  # 320 of 600
    Image.fromarray(tiff).save(tmp_path / "nan.tif")
    for name, count in (("slope.nii", "1,320 of 1,320"), ("nan.nii.gz", "1,320 of 1,320"), ("nan.tif", "320 of 600")):
        with pytest.raises(DataError, match=f"{name}: {count} values are NaN or infinite, more than half"):
            io.read_image(tmp_path / name)
        assert main(["predict", "--checkpoint", "dsb2018_2d" if name.endswith("tif") else "hippocampus_2d",
                     str(tmp_path / name), "--out", str(tmp_path / "o"), "--quiet"]) == 2
        assert f"{name}: {count} values are NaN" in one_error_line(capsys.readouterr().err)
    tiff = np.ones((20, 30), np.float32)
    tiff[:, :14] = np.nan  # 280 of 600: fewer than half, repaired when predicted
    Image.fromarray(tiff).save(tmp_path / "some.tif")
    assert np.isnan(io.read_image(tmp_path / "some.tif")[0]).sum() == 280


def test_non_finite_limits_in_the_environment_are_one_line_naming_the_variable(monkeypatch):
    for raw in ("1e400", "inf", "-inf", "nan"):
        monkeypatch.setenv(io.MAX_PIXELS_ENV, raw)  # 1e400 used to be an OverflowError from int(inf)
        with pytest.raises(UnetsegError, match=f"UNETSEG_MAX_PIXELS='{raw}' is not a positive number of pixels"):
            io.max_pixels()


def test_prediction_of_a_volume_with_a_nan_voxel_matches_the_clean_one(data_root):
    from unetseg.infer import Segmenter

    scan = data_root / "Task04_Hippocampus" / "imagesTr" / "hippocampus_003.nii.gz"
    image, _ = io.read_image(scan)
    seg = Segmenter.from_checkpoint("hippocampus_2d")
    clean = seg.predict(image, channel_axis=0)
    assert (clean > 0).sum() > 100
    broken = image.copy()
    broken[0, 0, 0, 0] = np.nan
    with pytest.warns(UserWarning, match="NaN or infinite"):
        labels = seg.predict(broken, channel_axis=0)
    assert (labels != clean).mean() < 0.001  # before: an all-background prediction


def test_dice_of_an_empty_truth_with_a_non_empty_prediction_is_zero():
    from unetseg.evaluate import summarize
    from unetseg.losses import case_metrics

    truth = np.zeros((8, 8), np.int64)
    painted = np.ones((8, 8), np.int64)
    m = case_metrics(painted, truth, 3)
    assert m["dice"][0] == 0.0 and np.isnan(m["dice"][1])  # class 1 is a false positive; class 2 absent from both
    truth[2:4, 2:4] = 2
    assert case_metrics(truth, truth, 3)["dice"].tolist()[1] == 1.0
    rows = [{"case_id": "a", "dice_x": 1.0, "dice_y": np.nan, "hd95_x": 1.0, "hd95_y": np.nan},
            {"case_id": "b", "dice_x": float(m["dice"][0]), "dice_y": np.nan, "hd95_x": np.nan, "hd95_y": np.nan}]
    assert summarize(rows, ("background", "x", "y"))["classes"]["x"]["dice_mean"] == pytest.approx(0.5)


def test_reliability_doc_names_only_tests_that_exist_and_the_real_defaults():
    import re
    from pathlib import Path

    from unetseg import uploads as up
    from unetseg.data import dicom

    repo = Path(__file__).resolve().parents[1]
    doc = (repo / "docs" / "reliability.md").read_text()
    named = set(re.findall(r"`(test_\w+)`", doc))
    defined = {m for p in (repo / "tests").glob("test_*.py") for m in re.findall(r"^def (test_\w+)", p.read_text(), re.M)}
    assert len(named) > 15 and named <= defined, sorted(named - defined)
    assert f"{io.DEFAULT_MAX_PIXELS:,}" in doc and io.MAX_PIXELS_ENV in doc
    assert f"{dicom.INFLATED_BYTES_PER_PIXEL} bytes x pixel budget" in doc and str(dicom.MAX_ZIP_MEMBERS) in doc
    assert f"{up.DEFAULT_MAX_UPLOAD_MB:g} MB" in doc and up.MAX_UPLOAD_ENV in doc


def test_exponent_numbers_without_a_dot_are_read_as_numbers(tmp_path):
    from unetseg.config import apply_overrides, config_from_dict, load_config

    cfg = apply_overrides(load_config("hippocampus_2d"), ["train.lr=1e-3", "train.weight_decay=3E-5"])
    assert (cfg.train.lr, cfg.train.weight_decay) == (0.001, 3e-05)  # YAML 1.1 alone reads both as text
    assert config_from_dict({"train": {"lr": "5e-4"}}).train.lr == 0.0005
    with pytest.raises(UnetsegError, match="train.seed='1e3' is not of type int"):
        apply_overrides(cfg, ["train.seed=1e3"])


def test_a_large_image_shows_progress_over_its_windows_unless_quiet(tmp_path, capsys, monkeypatch):
    """An image over the inference memory budget is segmented window by window, with a bar over the windows."""
    from unetseg.infer import INFER_MEMORY_ENV

    monkeypatch.setenv(INFER_MEMORY_ENV, "64")  # this 600 x 700 image needs more in one pass: windows
    image = tmp_path / "large.png"
    Image.fromarray((np.random.default_rng(0).random((600, 700, 3)) * 255).astype(np.uint8)).save(image)
    assert main(["predict", "--checkpoint", "dsb2018_2d", str(image), "--out", str(tmp_path / "a")]) == 0
    bars = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert any("it/s]" in b or "s/it]" in b for b in bars if not b.startswith("predicting"))  # the windows' bar
    assert main(["predict", "--checkpoint", "dsb2018_2d", str(image), "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert "it]" not in capsys.readouterr().err


def test_a_progress_callback_is_told_of_every_window(monkeypatch):
    """``Segmenter.progress`` may be a callable (the viewer's bar): told (windows done, windows in all) per batch."""
    from unetseg.infer import INFER_MEMORY_ENV, Segmenter

    monkeypatch.setenv(INFER_MEMORY_ENV, "64")
    seg = Segmenter.from_checkpoint("dsb2018_2d")
    image = np.random.default_rng(0).random((600, 700, 3)).astype(np.float32)
    calls: list[tuple[int, int]] = []
    seg.progress = lambda done, total: calls.append((done, total))
    labels = seg.predict(image, channel_axis=-1)
    done, total = zip(*calls)
    assert len(set(total)) == 1 and total[0] > 1 and list(done) == sorted(done) and done[-1] == total[0], calls
    seg.progress = False
    assert np.array_equal(seg.predict(image, channel_axis=-1), labels)


def test_predict_names_the_file_once_when_it_repairs_a_few_non_finite_voxels(tmp_path, data_root, capsys):
    scan = data_root / "Task04_Hippocampus" / "imagesTr" / "hippocampus_003.nii.gz"
    img = nib.load(str(scan))
    data = np.asarray(img.dataobj, dtype=np.float32)
    data[0, 0, 0] = np.nan
    path = tmp_path / "one_nan.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), str(path))
    assert main(["predict", "--checkpoint", "hippocampus_2d", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count(f"warning: {path}: channel 0: 1 of {data.size:,} values are NaN or infinite") == 1, err
    assert "infer.py" not in err and "Warning:" not in err  # not a Python warning with a source line
