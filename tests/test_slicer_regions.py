"""Marked regions of a Slicer correction: the module's Slicer-free library (label map, declarations, validation,
the table's state, NIfTI on the study's grid), the client against a real MONAI Label server (final + regions
stored for the image, read back through the server and accepted by the app's own loader), and the MRML side
(segments exported on the reference grid) with PyPI's slicer-core in .venv-slicer."""
from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk
from ADLDenoiseLib import DenoiseServerClient, DenoiseServerError
from ADLDenoiseLib.regions import (
    Grid,
    Region,
    RegionsError,
    SegmentMarks,
    align_to_grid,
    build_region_map,
    prepare_region_file,
    regions_params,
    write_region_map,
)

import processes
from conftest import REPO_ROOT, SAMPLE_STUDIES
from mlserver import assert_same_geometry, copy_weights, start_server, stop_server, write_crop

MODULE_DIR = REPO_ROOT / "slicer_extension" / "ADLDenoise"
SHAPE = (4, 10, 12)


def box(z: slice, y: slice, x: slice, shape=SHAPE) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[z, y, x] = True
    return mask


# --------------------------------------------------------------------------------------------------- label map
def test_label_map_values_follow_segment_order_and_the_later_segment_wins_where_they_overlap():
    lesion = box(slice(1, 3), slice(2, 5), slice(2, 5))
    liver = box(slice(0, 4), slice(4, 9), slice(3, 10))  # overlaps the lesion at y = 4
    vessel = box(slice(2, 3), slice(0, 10), slice(11, 12))
    regions = [Region("lesion 1", "keep"), Region("liver", "strength", 0.5), Region("vessel", "keep")]
    region_map, params = build_region_map([lesion, liver, vessel.astype(np.uint8) * 7], regions, SHAPE)
    assert region_map.dtype == np.uint8 and region_map.shape == SHAPE
    assert params == {"regions": [{"value": 1, "name": "lesion 1", "intent": "keep"},
                                  {"value": 2, "name": "liver", "intent": "strength", "strength": 0.5},
                                  {"value": 3, "name": "vessel", "intent": "keep"}]}
    assert np.all(region_map[liver] == 2)  # the overlap went to the later segment
    assert np.all(region_map[lesion & ~liver] == 1)
    assert np.all(region_map[vessel] == 3)  # any nonzero mask value counts
    assert np.all(region_map[~(lesion | liver | vessel)] == 0)
    # reversed order: values follow the new order and the lesion now wins the overlap
    region_map, params = build_region_map([liver, lesion], [regions[1], regions[0]], SHAPE)
    assert [r["name"] for r in params["regions"]] == ["liver", "lesion 1"]
    assert np.all(region_map[lesion] == 2) and np.all(region_map[liver & ~lesion] == 1)


def test_regions_and_label_maps_that_cannot_be_sent_are_refused_with_a_clear_reason():
    with pytest.raises(RegionsError, match="unknown intent 'blur'"):
        Region("lesion", "blur")
    for bad in (-0.1, 2.01, float("nan"), None, True, "1"):
        with pytest.raises(RegionsError, match=r"within \[0, 2\]"):
            Region("liver", "strength", bad)
    with pytest.raises(RegionsError, match="takes no strength"):
        Region("lesion", "keep", 1.0)
    assert Region("liver", "strength", 2).strength == 2.0 and Region("fat", "strength", 0).strength == 0.0
    keep = Region("lesion", "keep")
    full = box(slice(None), slice(None), slice(None))
    with pytest.raises(RegionsError, match="'lesion' is empty"):
        build_region_map([np.zeros(SHAPE, bool)], [keep], SHAPE)
    with pytest.raises(RegionsError, match="'lesion' lies entirely under later segments"):
        build_region_map([box(slice(1, 2), slice(1, 2), slice(1, 2)), full], [keep, Region("all", "keep")], SHAPE)
    with pytest.raises(RegionsError, match=r"shape \(4, 10, 11\).*image's grid"):
        build_region_map([np.ones((4, 10, 11), bool)], [keep], SHAPE)
    with pytest.raises(RegionsError, match="2 masks for 1 regions"):
        build_region_map([full, full], [keep], SHAPE)
    with pytest.raises(RegionsError, match="no region"):
        regions_params([])
    with pytest.raises(RegionsError, match="at most 255"):
        regions_params([keep] * 256)


def test_segment_marks_keep_choices_across_segment_changes_and_send_only_marked_segments():
    marks = SegmentMarks()
    marks.sync([("S1", "lesion 1"), ("S2", "liver"), ("S3", "fat")])
    assert [r["choice"] for r in marks.rows()] == ["ignore"] * 3  # nothing is sent until the user says so
    assert marks.marked() == []
    marks.choose("S2", "strength")
    marks.set_strength("S2", 0.5)
    marks.choose("S1", "keep structure")
    marks.choose("S3", "strength")
    marks.set_strength("S3", 1.5)
    marks.choose("S3", "ignore")  # the strength stays in the table but is not sent
    assert marks.marked() == [("S1", Region("lesion 1", "keep")), ("S2", Region("liver", "strength", 0.5))]
    # the user reorders and renames segments and deletes one: choices follow the segment, order the segmentation
    marks.sync([("S2", "liver (right lobe)"), ("S1", "lesion 1")])
    assert marks.marked() == [("S2", Region("liver (right lobe)", "strength", 0.5)), ("S1", Region("lesion 1", "keep"))]
    assert marks.rows()[0]["strength"] == 0.5
    marks.choose("S1", "keep structure")
    marks.set_strength("S1", 1.7)
    marks.sync([("S2", "liver")])
    marks.sync([("S2", "liver"), ("S1", "lesion 1")])  # S1 came back: its old choices were forgotten with it
    assert marks.rows()[1] == {"id": "S1", "name": "lesion 1", "choice": "ignore", "strength": 1.0}
    with pytest.raises(RegionsError, match="unknown choice"):
        marks.choose("S2", "blur")
    with pytest.raises(RegionsError, match="no segment 'S9'"):
        marks.choose("S9", "keep structure")
    with pytest.raises(RegionsError, match="within"):
        marks.set_strength("S2", 3.0)


# --------------------------------------------------------------------------------------------------- geometry
def oblique_ijk_to_ras() -> np.ndarray:
    angle = np.deg2rad(25)
    directions = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, -1.0]])
    matrix = np.eye(4)
    matrix[:3, :3] = directions * np.array([0.7, 0.8, 2.5])[None, :]
    matrix[:3, 3] = [-12.0, 30.5, 101.0]
    return matrix


def test_region_map_is_written_as_nifti_with_the_volume_nodes_geometry(tmp_path):
    grid = Grid.from_ijk_to_ras(oblique_ijk_to_ras(), SHAPE)
    np.testing.assert_allclose(grid.spacing, [0.7, 0.8, 2.5])
    np.testing.assert_allclose(grid.origin, [12.0, -30.5, 101.0])  # RAS -> LPS: x and y change sign
    region_map = np.zeros(SHAPE, np.uint8)
    region_map[1, 2, 3] = 1
    region_map[3, 9, 11] = 2
    path = write_region_map(region_map, grid, tmp_path / "regions.nii.gz")
    image = sitk.ReadImage(str(path))
    assert image.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), region_map)
    np.testing.assert_allclose(image.GetSpacing(), [0.7, 0.8, 2.5], atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), [12.0, -30.5, 101.0], atol=1e-4)
    # voxel (i, j, k) = (3, 2, 1) lies where the node's IJK-to-RAS puts it
    ras = oblique_ijk_to_ras() @ np.array([3, 2, 1, 1.0])
    lps = image.TransformIndexToPhysicalPoint((3, 2, 1))
    np.testing.assert_allclose(lps, [-ras[0], -ras[1], ras[2]], atol=1e-4)
    assert Grid.from_file(path).shape == SHAPE
    np.testing.assert_allclose(Grid.from_file(path).ijk_to_lps, grid.ijk_to_lps, atol=1e-5)
    with pytest.raises(RegionsError, match="NIfTI"):
        write_region_map(region_map, grid, tmp_path / "regions.nrrd")
    with pytest.raises(RegionsError, match="uint8"):
        write_region_map(region_map.astype(np.int16), grid, tmp_path / "regions.nii.gz")


def test_region_map_goes_onto_the_study_files_grid_and_a_foreign_grid_is_refused(tmp_path):
    node_grid = Grid.from_ijk_to_ras(oblique_ijk_to_ras(), SHAPE)
    region_map = np.zeros(SHAPE, np.uint8)
    region_map[0, 1, 2] = 1
    # the study as the server holds it, stored with its last axis running the other way (same voxel centres):
    # Slicer reads such a file with that axis reversed, so the node's voxel order is not the file's
    mirrored = node_grid.ijk_to_lps.copy()
    mirrored[:3, 2] *= -1
    mirrored[:3, 3] = node_grid.ijk_to_lps[:3, 3] + node_grid.ijk_to_lps[:3, 2] * (SHAPE[0] - 1)
    study = sitk.GetImageFromArray(np.zeros(SHAPE, np.int16))
    file_grid = Grid(SHAPE, mirrored)
    study.SetSpacing(file_grid.spacing.tolist())
    study.SetOrigin(file_grid.origin.tolist())
    study.SetDirection(file_grid.direction.reshape(-1).tolist())
    sitk.WriteImage(study, str(tmp_path / "study.nrrd"))
    path = prepare_region_file(region_map, node_grid, tmp_path / "r.nii.gz", tmp_path / "study.nrrd")
    written = sitk.ReadImage(str(path))
    assert_same_geometry(written, sitk.ReadImage(str(tmp_path / "study.nrrd")))
    array = sitk.GetArrayFromImage(written)
    assert array[SHAPE[0] - 1, 1, 2] == 1 and int(array.sum()) == 1  # the same point, in the file's order
    lps_node = node_grid.ijk_to_lps @ np.array([2, 1, 0, 1.0])
    np.testing.assert_allclose(written.TransformIndexToPhysicalPoint((2, 1, SHAPE[0] - 1)), lps_node[:3], atol=1e-4)
    # equal grids: unchanged; no study file: the node's grid
    np.testing.assert_array_equal(align_to_grid(region_map, node_grid, node_grid), region_map)
    path = prepare_region_file(region_map, node_grid, tmp_path / "own.nii.gz")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), region_map)
    # another position, spacing or size: refused, naming both grids
    for change in ("origin", "spacing", "size"):
        other = node_grid.ijk_to_lps.copy()
        shape = SHAPE
        if change == "origin":
            other[:3, 3] += 1.0
        elif change == "spacing":
            other[:3, 0] *= 1.1
        else:
            shape = (5, 10, 12)
        with pytest.raises(RegionsError, match="not on the study's grid"):
            align_to_grid(region_map, node_grid, Grid(shape, other))


# --------------------------------------------------------------------------------------------------- server
@pytest.fixture(scope="module")
def regions_server(tmp_path_factory, tiny_weights):
    """A server of this module's own: it receives uploads, corrections and regions."""
    root = tmp_path_factory.mktemp("regions_server")
    studies = root / "studies"
    studies.mkdir()
    srv = start_server(studies, copy_weights(tiny_weights, root / "model"), root / "work")
    yield srv
    stop_server(srv)


@pytest.mark.server
@pytest.mark.slow
def test_correction_and_its_marked_regions_are_stored_for_the_image_on_a_real_server(regions_server, tmp_path):
    from lib.data.regions import load_correction_regions  # the app's own reader of what was sent

    client = DenoiseServerClient(regions_server.url)
    # the study as the module uploads one loaded from a file: NRRD; the correction on its grid
    original = write_crop(SAMPLE_STUDIES / "ct_head_invesalius_ld25.nii.gz", tmp_path / "study.nrrd", z=slice(60, 63))
    corrected = write_crop(SAMPLE_STUDIES / "ct_head_invesalius.nii.gz", tmp_path / "study_c.nrrd", z=slice(60, 63))
    image_id = client.upload_image(original, "slicer_regions_1")
    grid = Grid.from_file(original)
    lesion = np.zeros(grid.shape, bool)
    lesion[1, 200:220, 240:260] = True
    liver = np.zeros(grid.shape, bool)
    liver[:, 210:300, 200:330] = True
    regions = [Region("lesion 1", "keep"), Region("liver", "strength", 0.5)]
    region_map, params = build_region_map([lesion, liver], regions, grid.shape)
    path = prepare_region_file(region_map, grid, tmp_path / "regions.nii.gz", original)

    sent = client.save_regions(image_id, path, regions)
    client.save_correction(image_id, corrected, regions_sha256=sent["sha256"])

    # read back through the server: the regions label, its declaration, and the correction next to it
    info = client.label_info(image_id, "regions")
    assert info["regions"] == params["regions"] == [
        {"value": 1, "name": "lesion 1", "intent": "keep"},
        {"value": 2, "name": "liver", "intent": "strength", "strength": 0.5}]
    stored = client.download_label(image_id, "regions", tmp_path / "back" / "regions.nii.gz")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(stored))), region_map)
    final = client.download_label(image_id, "final", tmp_path / "back" / "final.nrrd")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(final))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(corrected))))
    labels = client._json("GET", "/datastore/", {"output": "all"})["objects"][image_id]["labels"]
    assert {"final", "regions"} <= set(labels)
    # the correction is bound to the map sent with it (the server checked the hash against the stored map)
    assert labels["final"]["info"]["regions_sha256"] == sent["sha256"] == labels["regions"]["info"]["sha256"]
    # the app's own loader accepts what the module sent: on the image's grid, every value declared
    image = client.download_image(image_id, tmp_path / "back")
    loaded = load_correction_regions(image_id, image, stored, info)
    assert [(r.value, r.name, r.intent, r.strength) for r in loaded.regions] == [
        (1, "lesion 1", "keep", None), (2, "liver", "strength", 0.5)]
    np.testing.assert_array_equal(loaded.region_map, region_map)

    with pytest.raises(DenoiseServerError, match="NIfTI"):
        client.save_regions(image_id, original, regions)
    with pytest.raises(DenoiseServerError, match="no marked region"):
        client.save_regions(image_id, path, [])


# --------------------------------------------------------------------------------------------------- MRML
def test_segments_export_with_real_mrml_from_slicer_core():
    python = REPO_ROOT / ".venv-slicer" / "bin" / "python"
    if not python.exists():
        pytest.skip("no .venv-slicer (scripts/setup_slicer_env.sh could not install PyPI's slicer-core here)")
    env = dict(os.environ, PYTHONPATH=str(MODULE_DIR))
    result = processes.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            MODULE_DIR / "Testing" / "Python" / "test_mrml_regions.py"], 600, cwd=REPO_ROOT, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "3 passed" in result.stdout
