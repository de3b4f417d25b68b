"""Annotation files in every shape QuPath and ASAP write, through shapely, rasterised to masks."""

import json

import numpy as np
import pytest

from data_plane.annotations import AnnotationError, rasterise, read_annotations, region_features

SQUARE = [[100, 100], [500, 100], [500, 400], [100, 400], [100, 100]]
HOLE = [[200, 200], [300, 200], [300, 300], [200, 300], [200, 200]]


def write(tmp_path, data, name="a.geojson"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_a_bare_geometry_as_quPath_writes_it_is_one_region(tmp_path):
    classes = read_annotations(write(tmp_path, {"type": "Polygon", "coordinates": [SQUARE]}))
    assert list(classes) == ["annotation"] and len(classes["annotation"]) == 1


def test_a_single_feature_a_collection_and_a_list_of_features_all_read(tmp_path):
    feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [SQUARE]},
               "properties": {"classification": {"name": "Tumor", "color": [200, 0, 0]}}}
    for data in (feature, {"type": "FeatureCollection", "features": [feature]}, [feature]):
        assert set(read_annotations(write(tmp_path, data))) == {"tumor"}


def test_multipolygon_holes_are_cut_and_other_kinds_reported_not_silently_dropped(tmp_path):
    data = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
         "geometry": {"type": "MultiPolygon", "coordinates": [[SQUARE, HOLE], [[[600, 600], [700, 600], [700, 700],
                                                                               [600, 600]]]]}},
        {"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
         "geometry": {"type": "GeometryCollection", "geometries": [
             {"type": "LineString", "coordinates": [[0, 0], [10, 10]]},
             {"type": "Polygon", "coordinates": [[[800, 100], [900, 100], [900, 200], [800, 100]]]}]}},
        {"type": "Feature", "properties": {}, "geometry": {"type": "Point", "coordinates": [5, 5]}}]}
    classes, skipped = read_annotations(write(tmp_path, data), with_skipped=True)
    assert skipped == {"LineString": 1, "Point": 1}
    assert len(classes["tumor"]) == 3
    mask = rasterise(classes, (1000, 1000), 10, "test")["tumor"]
    assert mask[15, 15] and mask[35, 45]          # inside the square (row = y / 10, col = x / 10)
    assert not mask[25, 25]                        # inside its hole
    assert mask[62, 68] and mask[12, 88]           # the triangles of the second polygon and the collection


def test_only_points_is_an_error_that_says_what_the_file_holds(tmp_path):
    data = [{"type": "Feature", "properties": {}, "geometry": {"type": "Point", "coordinates": [5, 5]}}] * 2
    with pytest.raises(AnnotationError, match="holds no polygons .it holds only 2 Point"):
        read_annotations(write(tmp_path, data))


def test_qupath_ignore_classes_are_exclusions(tmp_path):
    data = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
         "geometry": {"type": "Polygon", "coordinates": [SQUARE]}},
        {"type": "Feature", "properties": {"classification": {"name": "Ignore*"}},
         "geometry": {"type": "Polygon", "coordinates": [HOLE]}}]}
    masks = rasterise(read_annotations(write(tmp_path, data)), (1000, 1000), 10, "test")
    assert set(masks) == {"tumor"}
    assert masks["tumor"][15, 15] and not masks["tumor"][25, 25]


def test_regions_exported_from_a_map_rasterise_back_to_the_same_map(tmp_path):
    rng = np.random.default_rng(0)
    mask = np.zeros((40, 60), bool)
    mask[5:20, 8:30] = True
    mask[10:14, 15:20] = False                     # a hole
    mask[25:38, 40:55] = rng.random((13, 15)) > 0.3  # ragged blobs
    features = region_features(mask, 16, "flagged")
    path = write(tmp_path, {"type": "FeatureCollection", "features": features})
    back = rasterise(read_annotations(path), (40 * 16, 60 * 16), 16, "round trip")["anomaly"]
    np.testing.assert_array_equal(back, mask)
