"""Data: from NIfTI files on disk to the float32 volumes and batches the network sees.

    nifti       reading .nii/.nii.gz into canonical RAS+ arrays; finding LiTS / MSD / KiTS19 cases
    kits        ``data.preprocess: kits`` (Wang et al.): clip, z-score, KiTS spacing, 256² crop
    resample    the resampling grid (spacing, shape) and trilinear / nearest resampling
    integrity   ``hrseg verify``: every case readable, shapes and affines agree, labels in range
    dataset     windowing, preprocessing, splits, batches (``load_dataset``)
    cache       the on-disk cache of preprocessed volumes: verified entries, ``hrseg cache``
    buckets     native-size volumes: bucketed padding (IGNORE) and same-bucket batches
    patches     random training crops with nnU-Net's foreground oversampling (``data.patch``)
    augment     flips and tumour synthesis (Hou et al.'s released code): remove real tumours, paint blurred ones
    phantom     the embedded synthetic abdomen dataset (``hrseg phantom``)
    kits_phantom  its KiTS19 variant (``--task kits``): kidney / renal tumour labels, KiTS layout
    anatomy     the phantom's geometry: body, liver, tumours as ellipsoids
    field       smooth random fields (cubic B-splines): the phantom's and augment's
    painter     rendering an anatomy onto voxels, slab by slab

``hrseg.data`` re-exports the dataset API: ``data.load_dataset(cfg)``, ``data.batch_for_step``, ...
"""
from hrseg.data.dataset import (  # noqa: F401
    CACHE_VERSION,
    PAPER_VAL_FRACTION,
    Case,
    Dataset,
    Volume,
    batch_for_step,
    cache_dir,
    find_cases,
    grid_for,
    load_dataset,
    load_volume,
    preprocess,
    preprocess_case,
    preprocess_label,
    read_nifti,
    sample_of_row,
    split,
    stack_slices,
    to_original_geometry,
    verify_dataset,
    window,
)
