"""train/outpath.py: where `hrseg predict -o` may write, checked before inference (issue 31)."""
import pytest

from hrseg.train import outpath


@pytest.fixture
def ct(tmp_path):
    p = tmp_path / "data" / "volume-3.nii.gz"
    p.parent.mkdir()
    p.write_bytes(b"a CT")
    return p


def test_nifti_paths_folders_and_the_default(ct, tmp_path):
    default = tmp_path / "run" / "predictions" / "prediction-3.nii.gz"
    assert outpath.prediction_target(ct, None, default) == default
    assert outpath.prediction_target(ct, tmp_path / "p.nii", default) == tmp_path / "p.nii"
    assert outpath.prediction_target(ct, tmp_path / "new" / "p.nii.gz", default) == \
        tmp_path / "new" / "p.nii.gz"
    assert outpath.prediction_target(ct, tmp_path, default) == tmp_path / "volume-3_pred.nii.gz"


@pytest.mark.parametrize("name, match", [
    ("p", "give a .nii or .nii.gz file, or an existing folder"),
    ("p.img", "give a .nii or .nii.gz file"),
    (".nii.gz", "give a .nii or .nii.gz file"),
])
def test_other_names_are_refused(ct, tmp_path, name, match):
    with pytest.raises(ValueError, match=match):
        outpath.prediction_target(ct, tmp_path / name, None)


def test_never_the_input_by_path_link_or_inode(ct, tmp_path):
    (tmp_path / "link.nii.gz").symlink_to(ct)
    (tmp_path / "hard.nii.gz").hardlink_to(ct)
    for out in (ct, ct.parent / ".." / "data" / ct.name, tmp_path / "link.nii.gz",
                tmp_path / "hard.nii.gz"):
        with pytest.raises(ValueError, match="that is the input volume"):
            outpath.prediction_target(ct, out, None)
    with pytest.raises(ValueError, match="that is the input volume"):   # folder -> same name
        outpath.prediction_target(tmp_path / "hard.nii.gz", None, ct)
    assert ct.read_bytes() == b"a CT"


def test_a_file_as_folder_and_a_folder_as_file(ct, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        outpath.prediction_target(ct, tmp_path / "f" / "p.nii.gz", None)
    (tmp_path / "d.nii.gz").mkdir()
    assert outpath.prediction_target(ct, tmp_path / "d.nii.gz", None) == \
        tmp_path / "d.nii.gz" / "volume-3_pred.nii.gz"
    (tmp_path / "d.nii.gz" / "volume-3_pred.nii.gz").mkdir()
    with pytest.raises(ValueError, match="exists and is not a file"):
        outpath.prediction_target(ct, tmp_path / "d.nii.gz", None)
    with pytest.raises(ValueError, match="no such file"):
        outpath.prediction_target(tmp_path / "missing.nii.gz", tmp_path / "p.nii.gz", None)
