"""fvae_aug_seg's DICOM Segmentation output (``output_format dicom_seg | both``) on the real 512x512 DICOM series:
decoded back onto the source grid, the SEG equals the label map voxel for voxel; it references the source images,
study, patient and frame of reference; the input folder is untouched; bad requests end in one line.

The asset series is anonymised without UIDs (empty Study/Series/SOP Instance UIDs): it is refused as such, and the
round trips run on a copy that has the study and series UIDs and a patient ID back (pixel data and geometry
untouched; the SOP Instance UIDs stay empty, so the File Meta's are the ones referenced)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fvae_ct.errors import BatchFailure, InputError, OptionError, user_error

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

from fvae_ct.aug_seg import dicom_seg as ds_mod  # noqa: E402
from fvae_ct.bundle import run_bundle  # noqa: E402
from fvae_ct.io import load_ct, load_labels  # noqa: E402

CLASSES = ["background", "organ", "lesion"]
STUDY, SERIES, PATIENT = "1.2.826.0.1.3680043.8.498.101", "1.2.826.0.1.3680043.8.498.102", "FVAE-TEST-1"


def hashes(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(Path(folder).iterdir())}


@pytest.fixture(scope="module")
def series(dicom_dir, tmp_path_factory) -> Path:
    """The real series with StudyInstanceUID, SeriesInstanceUID and PatientID set (nothing else changed)."""
    out = tmp_path_factory.mktemp("series") / "ct_series"
    out.mkdir()
    for f in sorted(dicom_dir.iterdir()):
        d = pydicom.dcmread(str(f))
        d.StudyInstanceUID, d.SeriesInstanceUID, d.PatientID = STUDY, SERIES, PATIENT
        d.save_as(str(out / f.name))
    return out


def source_files(folder: Path) -> list:
    """The series' files, full datasets (pixels), in position order along the slice normal."""
    files = [pydicom.dcmread(str(f)) for f in sorted(folder.iterdir())]
    normal = np.cross(*np.reshape(np.asarray(files[0].ImageOrientationPatient, float), (2, 3)))
    return sorted(files, key=lambda d: float(np.asarray(d.ImagePositionPatient, float) @ normal))


def hu(d) -> np.ndarray:
    return d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)


def on_frames(volume: np.ndarray, affine, files) -> np.ndarray:
    """``volume`` [X, Y, Z] (RAS ``affine``) sampled at every pixel centre of ``files``: world coordinates of each
    pixel (LPS -> RAS), then voxel indices through the inverse affine (they must be integers)."""
    rows, cols = int(files[0].Rows), int(files[0].Columns)
    i, j = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    inv = np.linalg.inv(np.asarray(affine, float))
    out = []
    for d in files:
        iop = np.asarray(d.ImageOrientationPatient, float)
        sr, sc = (float(s) for s in d.PixelSpacing)
        lps = np.asarray(d.ImagePositionPatient, float)[:, None, None] + iop[:3, None, None] * sc * j + iop[3:, None, None] * sr * i
        ras = lps * np.array([-1.0, -1.0, 1.0])[:, None, None]
        vox = np.einsum("ab,bij->aij", inv[:3, :3], ras) + inv[:3, 3][:, None, None]
        assert np.abs(vox - np.rint(vox)).max() < 1e-3
        v = np.rint(vox).astype(int)
        out.append(volume[v[0], v[1], v[2]])
    return np.stack(out)


def decoded(path: Path, files) -> np.ndarray:
    """The SEG at ``path`` decoded (highdicom) as label frames, one per source image of ``files``, in their order."""
    seg = hd.seg.segread(str(path))
    uids = [d.file_meta.MediaStorageSOPInstanceUID for d in files]
    return seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)


def assert_references_the_source(path: Path, files, class_names) -> None:
    d = pydicom.dcmread(str(path))  # no force: a proper Part 10 file
    src = files[0]
    assert d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and d.Modality == "SEG" and d.SegmentationType == "BINARY"
    assert (d.StudyInstanceUID, d.PatientID, d.FrameOfReferenceUID) == (STUDY, PATIENT, src.FrameOfReferenceUID)
    assert d.SeriesInstanceUID not in (SERIES, "") and d.SOPInstanceUID
    (ref,) = d.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == SERIES
    want = {f.file_meta.MediaStorageSOPInstanceUID for f in files}
    assert {r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence} == want
    assert {r.ReferencedSOPClassUID for r in ref.ReferencedInstanceSequence} == {"1.2.840.10008.5.1.4.1.1.2"}
    seg = hd.seg.segread(str(path))
    assert {u[2] for u in seg.get_source_image_uids()} <= want
    assert [s.SegmentNumber for s in d.SegmentSequence] == list(range(1, len(class_names)))
    assert [s.SegmentLabel for s in d.SegmentSequence] == list(class_names[1:])
    alg = d.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert alg.AlgorithmName.startswith("fvae_aug_seg") and alg.AlgorithmFamilyCodeSequence[0].CodeMeaning == (
        "Artificial Intelligence"
    )
    pm = d.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(x) for x in pm.PixelSpacing] == [float(x) for x in src.PixelSpacing]


def test_the_writer_round_trips_a_label_map_of_the_real_ct(series, tmp_path):
    """The real CT thresholded into 3 classes, written, decoded: each frame equals the thresholds applied to its
    source file's own pixels (pydicom), so the geometry is checked against the DICOM files themselves."""
    before = hashes(series)
    ct = load_ct(series)
    labels = ((ct[0] > -300).to(torch.uint8) + (ct[0] > 200).to(torch.uint8)).numpy()
    out = tmp_path / "out" / "ct_series_seg.dcm"
    alg = {"name": "fvae_aug_seg segresnet", "version": "9.9.9", "parameters": {"model": "test"}}
    assert ds_mod.write_dicom_seg(labels, ct.affine, series, out, CLASSES, alg) == out
    files = source_files(series)
    want = np.stack([(hu(d) > -300).astype(np.uint8) + (hu(d) > 200) for d in files])
    assert np.bincount(want.ravel(), minlength=3).min() > 1000  # all three classes present
    got = decoded(out, files)
    assert got.shape == (20, 512, 512) and np.array_equal(got, want)
    assert np.array_equal(on_frames(labels, ct.affine, files), want)  # the test's own mapping agrees
    assert_references_the_source(out, files, CLASSES)
    d = pydicom.dcmread(str(out))
    alg_seq = d.SegmentSequence[1].SegmentationAlgorithmIdentificationSequence[0]
    assert (alg_seq.AlgorithmVersion, alg_seq.AlgorithmParameters) == ("9.9.9", "model=test")
    organ, lesion = d.SegmentSequence
    assert (organ.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning,
            organ.SegmentedPropertyTypeCodeSequence[0].CodeValue) == ("Tissue", "91772007")  # fmt: skip
    assert (lesion.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning,
            lesion.SegmentedPropertyTypeCodeSequence[0].CodeValue) == ("Morphologically Abnormal Structure",
                                                                       "52988006")  # fmt: skip
    assert hashes(series) == before
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temporary left


def test_the_asset_organ_label_map_round_trips_with_coded_organs(series, assets, tmp_path):
    """TotalSegmentator's label map of the series (stored with flipped axes) resampled onto the series grid: 117
    classes by name, most of them absent; decoded = the label map; organs coded (liver, kidney + laterality)."""
    names = json.loads((assets / "ct" / "totalseg_labels.json").read_text())
    class_names = ["background"] + [names.get(str(i), f"class_{i}") for i in range(1, 118)]
    ct = load_ct(series)
    labels = load_labels(assets / "ct" / "dicom_series_512_seg.nii.gz", ct.affine, ct.shape[1:]).astype(np.uint8)
    assert len(np.unique(labels)) > 20
    out = ds_mod.write_dicom_seg(labels, ct.affine, series, tmp_path / "organs_seg.dcm", class_names)
    files = source_files(series)
    assert np.array_equal(decoded(out, files), on_frames(labels, ct.affine, files))
    d = pydicom.dcmread(str(out))
    by_label = {s.SegmentLabel: s for s in d.SegmentSequence}
    assert len(by_label) == 117 and by_label["liver"].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Liver"
    kidney = by_label["kidney_left"]
    assert kidney.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Kidney"
    assert kidney.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Left"


def test_segment_codes():
    c = ds_mod.segment_codes
    assert (c("Pancreas")["category"].meaning, c("Pancreas")["type"].meaning) == ("Anatomical Structure", "Pancreas")
    t = c("pancreas_tumour")
    assert (t["category"].meaning, t["type"].meaning, [r.meaning for r in t["regions"]]) == (
        "Morphologically Abnormal Structure", "Neoplasm", ["Pancreas"])
    assert c("lung tumor")["type"].value == "108369006" and c("nodule")["type"].meaning == "Nodule"
    assert (c("organ")["category"].meaning, c("organ")["type"].meaning) == ("Tissue", "Organ")
    assert (c("my_class_7")["category"].meaning, c("my_class_7")["type"].meaning) == ("Tissue", "Tissue")


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    """A bundle_root with the smallest SegResNet of the aug_seg tests (init_filters 8, blocks_down [1, 1, 1]),
    seeded weights (the writer is under test, not the training), and its models/model.json."""
    from monai.networks.nets import SegResNet

    from fvae_ct.aug_seg import DEFAULT_NETWORK

    root = tmp_path_factory.mktemp("bundle")
    (root / "models").mkdir()
    sizes = {**DEFAULT_NETWORK, "init_filters": 8, "blocks_down": [1, 1, 1], "blocks_up": [1, 1],
             "patch_size": [256, 256, 32], "class_names": CLASSES}  # fmt: skip
    torch.manual_seed(0)
    net = SegResNet(spatial_dims=3, in_channels=1, out_channels=3, init_filters=8, blocks_down=[1, 1, 1],
                    blocks_up=[1, 1])  # fmt: skip
    torch.save(net.state_dict(), root / "models" / "model.pt")
    (root / "models" / "model.json").write_text(json.dumps(sizes))
    return root


def test_inference_writes_the_seg_and_the_nifti_that_agree(series, tiny_bundle, tmp_path):
    """inference.yaml --output_format both on the series folder: <case>_seg.nii.gz and <case>_seg.dcm; the SEG
    decoded onto the source images equals the NIfTI label map voxel for voxel."""
    before = hashes(series)
    out = tmp_path / "seg"
    run_bundle("fvae_aug_seg", "inference.yaml", input=str(series), bundle_root=str(tiny_bundle), output_dir=str(out),
               output_format="both")  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["ct_series_seg.dcm", "ct_series_seg.nii.gz"]
    nii = nib.load(str(out / "ct_series_seg.nii.gz"))
    labels = np.asarray(nii.dataobj)
    ct = load_ct(series)
    assert labels.shape == tuple(ct.shape[1:]) and np.allclose(nii.affine, ct.affine, atol=1e-4)
    assert len(np.unique(labels)) >= 2
    files = source_files(series)
    assert np.array_equal(on_frames(ct[0].numpy(), nii.affine, files), np.stack([hu(d) for d in files]))
    assert np.array_equal(decoded(out / "ct_series_seg.dcm", files), on_frames(labels, nii.affine, files))
    assert_references_the_source(out / "ct_series_seg.dcm", files, CLASSES)
    alg = pydicom.dcmread(str(out / "ct_series_seg.dcm")).SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    version = json.loads((Path(ds_mod.__file__).parents[3] / "bundles" / "fvae_aug_seg" / "configs" /
                          "metadata.json").read_text())["version"]  # fmt: skip
    assert (alg.AlgorithmName, alg.AlgorithmVersion) == ("fvae_aug_seg segresnet", version)
    sha = hashlib.sha256((tiny_bundle / "models" / "model.pt").read_bytes()).hexdigest()
    assert f"model.pt sha256:{sha}" in alg.AlgorithmParameters
    assert hashes(series) == before


def test_output_format_picks_the_writers():
    from monai.bundle import ConfigParser
    from monai.transforms import Identityd, SaveImaged

    from fvae_ct.bundle import bundle_dir

    conf = bundle_dir("fvae_aug_seg") / "configs" / "inference.yaml"
    for fmt, nifti, seg in (("nifti", True, False), ("dicom_seg", False, True), (" Both ", True, True)):
        p = ConfigParser()
        p.read_config(str(conf))
        p["output_format"] = fmt
        assert isinstance(p.get_parsed_content("save_pred"), SaveImaged if nifti else Identityd), fmt
        assert isinstance(p.get_parsed_content("save_seg"), ds_mod.SaveDicomSegd if seg else Identityd), fmt
    with pytest.raises(OptionError, match=r"^output_format: expected one of nifti, dicom_seg, both, got 'dicom'$"):
        ds_mod.output_formats("dicom")


def test_a_nifti_input_with_dicom_seg_is_one_line_naming_it(series, assets, tmp_path):
    """A datalist of the series and a NIfTI: checked before the run, one line naming the NIfTI, nothing written."""
    nifti = str(assets / "ct" / "totalseg_ct_sm_3mm.nii.gz")
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps([{"image": str(series)}, {"image": nifti}]))
    with pytest.raises(Exception) as e:
        run_bundle("fvae_aug_seg", "inference.yaml", input=str(listing), bundle_root=str(tmp_path / "root"),
                   output_dir=str(tmp_path / "out"), output_format="dicom_seg")  # fmt: skip
    cause = user_error(e.value)
    assert isinstance(cause, InputError) and "\n" not in str(cause), e.value
    assert str(cause).startswith(nifti + ": output_format dicom_seg needs a DICOM series folder")
    assert not (tmp_path / "out").exists()


def test_series_without_uids_and_output_inside_the_series_are_refused(dicom_dir, series, tmp_path):
    before = hashes(dicom_dir)
    with pytest.raises(InputError, match="has no StudyInstanceUID, SeriesInstanceUID .*anonymised") as e:
        ds_mod.source_datasets(dicom_dir)
    assert str(e.value).startswith(str(dicom_dir) + ": ") and "\n" not in str(e.value)
    with pytest.raises(BatchFailure) as e:  # both cases listed, one line each
        ds_mod.check_inputs([{"image": str(dicom_dir)}, {"image": str(series)}], ("dicom_seg",), str(series))
    lines = str(e.value).splitlines()
    assert len(lines) == 3 and str(dicom_dir) in lines[1] and "lies in the input series folder" in lines[2]
    labels = np.zeros(load_ct(series).shape[1:], np.uint8)
    with pytest.raises(InputError, match="lies in the input series folder"):
        ds_mod.write_dicom_seg(labels, load_ct(series).affine, series, series / "x_seg.dcm", CLASSES)
    assert hashes(dicom_dir) == before and "x_seg.dcm" not in hashes(series)


def test_a_label_map_off_the_series_grid_is_refused(series, tmp_path):
    ct = load_ct(series)
    shifted = np.asarray(ct.affine, float).copy()
    shifted[0, 3] += 0.4  # 0.4 mm: not on a voxel centre
    with pytest.raises(InputError, match="does not lie on the grid of the DICOM series"):
        ds_mod.write_dicom_seg(np.zeros(ct.shape[1:], np.uint8), shifted, series, tmp_path / "a.dcm", CLASSES)
    assert not (tmp_path / "a.dcm").exists()


def test_without_highdicom_the_option_fails_in_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "highdicom", None)  # what `import highdicom` meets where it is not installed
    with pytest.raises(OptionError) as e:
        ds_mod.output_formats("dicom_seg")
    assert str(e.value) == (
        "output_format dicom_seg needs the package highdicom, which is not installed: pip install highdicom"
    )
    assert ds_mod.output_formats("nifti") == ("nifti",)  # NIfTI output never needs it
