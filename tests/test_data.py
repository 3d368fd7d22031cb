"""Data readers: input specs, batch folders and files, checks against the model, random data."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import MODELS, REPO
from onnxmp.data import InputSpec, input_specs, load_batches, random_batches
from onnxmp.errors import DataError
from onnxmp.ir import Model

DIGITS_CALIB = REPO / "fixtures" / "data" / "digits_calib"


def two_input_model() -> onnx.ModelProto:
    """ids: int64[N,S], mask: bool[N,S], scale: float32[N,4] (plus an initializer listed as input)."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["scale", "w"], ["y"])],
        "two",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "S"]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, ["N", "S"]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor("w", TensorProto.FLOAT, [4], [1, 2, 3, 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def digits_specs() -> list[InputSpec]:
    return input_specs(onnx.load(MODELS / "digits_cnn.onnx"))


@pytest.fixture
def two_specs() -> list[InputSpec]:
    return input_specs(two_input_model())


def good_two(rows: int = 2, seq: int = 3) -> dict[str, np.ndarray]:
    return {
        "ids": np.zeros((rows, seq), np.int64),
        "mask": np.ones((rows, seq), bool),
        "scale": np.ones((rows, 4), np.float32),
    }


# ------------------------------------------------------------------------------ specs
def test_input_specs_skip_initializers_and_keep_dims():
    specs = input_specs(two_input_model())
    assert [(s.name, s.dtype, s.shape) for s in specs] == [
        ("ids", np.dtype(np.int64), ["N", "S"]),
        ("mask", np.dtype(bool), ["N", "S"]),
        ("scale", np.dtype(np.float32), ["N", 4]),
    ]
    assert str(specs[2]) == "scale: float32[N,4]"


def test_input_specs_of_ir_model_match_the_proto():
    proto = two_input_model()
    assert input_specs(Model.load(proto)) == input_specs(proto)


def test_input_specs_unknown_dims_and_rank():
    graph = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["y"])],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT16, [None, 2]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)],
    )
    specs = input_specs(helper.make_model(graph))
    assert specs[0].shape == [None, 2] and specs[0].dtype == np.float16
    assert specs[1].shape is None


def test_input_specs_refuse_non_tensor_inputs():
    seq = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("SequenceLength", ["s"], ["n"])], "g", [seq],
                              [helper.make_tensor_value_info("n", TensorProto.INT64, [])])
    with pytest.raises(DataError, match="model input 's' is not a tensor"):
        input_specs(helper.make_model(graph))


# ------------------------------------------------------------------------------ folders and files
def test_folder_reads_batches_in_name_order(digits_specs):
    source = load_batches(DIGITS_CALIB, digits_specs)
    files = sorted(DIGITS_CALIB.glob("*.npz"))
    assert len(source) == len(files) == 8
    assert "8 batch files" in source.description
    labels = []
    for (label, batch), path in zip(source.labelled(), files):
        labels.append(label)
        np.testing.assert_array_equal(batch["x"], np.load(path)["x"])
    assert labels == [p.name for p in files]


def test_folder_reading_is_lazy(tmp_path, digits_specs):
    for index in range(3):
        np.savez(tmp_path / f"b{index}.npz", x=np.zeros((2, 1, 8, 8), np.float32))
    source = load_batches(tmp_path, digits_specs)
    (tmp_path / "b2.npz").write_bytes((tmp_path / "b2.npz").read_bytes()[:-40])  # truncated after opening
    batches = iter(source)
    next(batches), next(batches)  # the first two are read without touching b2
    with pytest.raises(DataError, match=r"b2\.npz' is not a readable \.npz/\.npy file"):
        next(batches)


def test_digest_is_stable_and_tracks_names_and_bytes(tmp_path, digits_specs):
    copy = tmp_path / "copy"
    shutil.copytree(DIGITS_CALIB, copy)
    original = load_batches(DIGITS_CALIB, digits_specs).digest
    assert load_batches(copy, digits_specs).digest == original  # the folder's own path does not count
    assert original.startswith("sha256:")
    (copy / "batch_007.npz").rename(copy / "batch_008.npz")
    assert load_batches(copy, digits_specs).digest != original
    np.savez(copy / "batch_008.npz", x=np.ones((32, 1, 8, 8), np.float32))
    assert load_batches(copy, digits_specs).digest != original


def test_npy_files_serve_single_input_models(tmp_path, digits_specs):
    np.save(tmp_path / "a.npy", np.ones((2, 1, 8, 8), np.float32))
    np.savez(tmp_path / "b.npz", x=np.zeros((3, 1, 8, 8), np.float32))
    (tmp_path / "notes.txt").write_text("ignored")
    source = load_batches(tmp_path, digits_specs)
    assert [b["x"].shape[0] for b in source] == [2, 3]


def test_npy_files_are_refused_for_models_with_several_inputs(tmp_path, two_specs):
    np.save(tmp_path / "a.npy", np.ones((2, 4), np.float32))
    with pytest.raises(DataError, match=r"a\.npy' is a \.npy file, which holds one array, but the model has 3 inputs"):
        load_batches(tmp_path, two_specs)


def test_single_npz_is_one_batch(tmp_path, two_specs):
    np.savez(tmp_path / "all.npz", **good_two(rows=5))
    source = load_batches(tmp_path / "all.npz", two_specs)
    assert len(source) == 1 and "one batch" in source.description
    assert [b["scale"].shape for b in source] == [(5, 4)]


def test_single_npz_is_cut_into_batches_of_batch_size(tmp_path, two_specs):
    data = good_two(rows=5)
    data["scale"] = np.arange(20, dtype=np.float32).reshape(5, 4)
    np.savez_compressed(tmp_path / "all.npz", **data)
    source = load_batches(tmp_path / "all.npz", two_specs, batch_size=2)
    assert len(source) == 3
    labelled = list(source.labelled())
    assert [label for label, _ in labelled] == ["all.npz rows 0:2", "all.npz rows 2:4", "all.npz rows 4:5"]
    np.testing.assert_array_equal(np.concatenate([b["scale"] for _, b in labelled]), data["scale"])
    assert source.digest != load_batches(tmp_path / "all.npz", two_specs, batch_size=3).digest
    assert source.digest != load_batches(tmp_path / "all.npz", two_specs).digest


# ------------------------------------------------------------------------------ errors
def test_missing_path(tmp_path, two_specs):
    with pytest.raises(DataError, match="data path '.*nope' does not exist"):
        load_batches(tmp_path / "nope", two_specs)


def test_other_file_kinds_are_refused(tmp_path, two_specs):
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(DataError, match="is neither a folder of .npz/.npy batch files nor a .npz file"):
        load_batches(tmp_path / "data.csv", two_specs)


def test_empty_folder(tmp_path, two_specs):
    (tmp_path / "readme.txt").write_text("no data")
    with pytest.raises(DataError, match="holds no .npz or .npy files"):
        load_batches(tmp_path, two_specs)


def test_batch_size_does_not_apply_to_folders(digits_specs):
    with pytest.raises(DataError, match="batch size 4 given for folder"):
        load_batches(DIGITS_CALIB, digits_specs, batch_size=4)


def test_batch_size_must_be_positive(tmp_path, two_specs):
    with pytest.raises(DataError, match="batch size must be at least 1, not 0"):
        load_batches(tmp_path, two_specs, batch_size=0)


def test_corrupt_file_is_named(tmp_path, two_specs):
    (tmp_path / "batch_000.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match=r"batch_000\.npz' is not a readable \.npz/\.npy file .*write it again"):
        load_batches(tmp_path, two_specs)


def test_npz_member_that_is_not_an_array(tmp_path, two_specs):
    import zipfile

    with zipfile.ZipFile(tmp_path / "b.npz", "w") as archive:
        archive.writestr("ids.txt", "1 2 3")
    with pytest.raises(DataError, match=r"b\.npz' holds 'ids\.txt', which is not a numpy array"):
        load_batches(tmp_path, two_specs)


def save_two(folder: Path, **changes: np.ndarray) -> None:
    data = {**good_two(), **changes}
    np.savez(folder / "batch_000.npz", **{k: v for k, v in data.items() if v is not None})


def test_missing_input(tmp_path, two_specs):
    save_two(tmp_path, mask=None)
    with pytest.raises(DataError, match=r"batch_000\.npz' has no array for input 'mask' \(the model's inputs: ids, mask, scale\)"):
        load_batches(tmp_path, two_specs)


def test_unknown_array(tmp_path, two_specs):
    save_two(tmp_path, labels=np.zeros(2))
    with pytest.raises(DataError, match=r"batch_000\.npz' holds array 'labels', which is not an input of the model"):
        load_batches(tmp_path, two_specs)


def test_dtype_mismatch_names_the_wanted_dtype_and_astype(tmp_path, two_specs):
    save_two(tmp_path, scale=np.ones((2, 4), np.float64))
    with pytest.raises(DataError, match=r"batch_000\.npz': input 'scale' is float64 but the model wants float32; convert it with \.astype\('float32'\)"):
        load_batches(tmp_path, two_specs)


def test_rank_mismatch(tmp_path, two_specs):
    save_two(tmp_path, scale=np.ones((2, 4, 1), np.float32))
    with pytest.raises(DataError, match=r"input 'scale' has 3 dimensions \[2,4,1\] but the model wants 2: \[N,4\]"):
        load_batches(tmp_path, two_specs)


def test_static_dim_mismatch(tmp_path, two_specs):
    save_two(tmp_path, scale=np.ones((2, 5), np.float32))
    with pytest.raises(DataError, match=r"input 'scale' has shape \[2,5\] but the model wants \[N,4\] \(dimension 1 must be 4\)"):
        load_batches(tmp_path, two_specs)


def test_symbolic_dims_are_free_but_consistent_within_a_batch(tmp_path, two_specs):
    np.savez(tmp_path / "a.npz", **good_two(rows=2, seq=3))
    np.savez(tmp_path / "b.npz", **good_two(rows=7, seq=11))
    assert len(load_batches(tmp_path, two_specs)) == 2
    save_two(tmp_path, mask=np.ones((2, 5), bool))
    with pytest.raises(DataError, match=r"dimension 'S' is 3 in input 'ids' but 5 in input 'mask'"):
        load_batches(tmp_path, two_specs)


def test_split_needs_equal_row_counts(tmp_path, two_specs):
    np.savez(tmp_path / "all.npz", **{**good_two(rows=4), "scale": np.ones((3, 4), np.float32)})
    with pytest.raises(DataError, match=r"all\.npz': arrays have different numbers of rows \(ids: 4, mask: 4, scale: 3\)"):
        load_batches(tmp_path / "all.npz", two_specs, batch_size=2)


def test_split_refuses_scalars_and_empty_files(tmp_path):
    specs = [InputSpec("x", np.dtype(np.float32), None)]
    np.savez(tmp_path / "scalar.npz", x=np.float32(1))
    with pytest.raises(DataError, match="array 'x' is a scalar, so it has no batch axis"):
        load_batches(tmp_path / "scalar.npz", specs, batch_size=2)
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 3), np.float32))
    with pytest.raises(DataError, match=r"empty\.npz' holds 0 rows"):
        load_batches(tmp_path / "empty.npz", specs, batch_size=2)


def test_split_checks_a_static_batch_dim_against_every_batch(tmp_path):
    specs = [InputSpec("x", np.dtype(np.float32), [2, 3])]
    np.savez(tmp_path / "all.npz", x=np.zeros((5, 3), np.float32))
    assert len(load_batches(tmp_path / "all.npz", [InputSpec("x", np.dtype(np.float32), ["N", 3])], batch_size=2)) == 3
    with pytest.raises(DataError, match=r"all\.npz' rows 4:5: input 'x' has shape \[1,3\] but the model wants \[2,3\]"):
        load_batches(tmp_path / "all.npz", specs, batch_size=2)


# ------------------------------------------------------------------------------ random data
def test_random_batches_match_the_specs(two_specs):
    source = random_batches(two_specs, count=3, batch_size=4, seed=1)
    batches = list(source)
    assert len(source) == len(batches) == 3
    for batch in batches:
        assert batch["ids"].shape == (4, 1) and batch["ids"].dtype == np.int64
        assert batch["ids"].min() >= 0 and batch["ids"].max() < 2
        assert batch["mask"].dtype == bool and batch["scale"].shape == (4, 4)
        assert batch["scale"].dtype == np.float32
    assert "smoke tests only" in source.description and "meaningless for calibration" in source.description
    assert "smoke tests only" in random_batches.__doc__


def test_random_batches_are_reproducible(two_specs):
    first = [b["scale"] for b in random_batches(two_specs, 2, seed=3)]
    again = [b["scale"] for b in random_batches(two_specs, 2, seed=3)]
    np.testing.assert_array_equal(np.stack(first), np.stack(again))
    assert random_batches(two_specs, 2, seed=3).digest == random_batches(two_specs, 2, seed=3).digest
    assert random_batches(two_specs, 2, seed=3).digest != random_batches(two_specs, 2, seed=4).digest


def test_random_dims_symbol_of_a_batch_axis_is_batch_size_elsewhere_one():
    specs = [InputSpec("a", np.dtype(np.float16), ["B", "T", None]), InputSpec("b", np.dtype(np.float32), [3, "B"])]
    batch = next(iter(random_batches(specs, 1, batch_size=5)))
    assert batch["a"].shape == (5, 1, 1) and batch["a"].dtype == np.float16
    assert batch["b"].shape == (3, 5)


def test_random_batches_refuse_what_they_cannot_make():
    with pytest.raises(DataError, match="model input 'x' has no shape, so random data cannot be made"):
        random_batches([InputSpec("x", np.dtype(np.float32), None)], 1)
    with pytest.raises(DataError, match="model input 's' is object; random data is made for numbers and bools only"):
        random_batches([InputSpec("s", np.dtype(object), [1])], 1)
    with pytest.raises(DataError, match="at least 1 batch"):
        random_batches([InputSpec("x", np.dtype(np.float32), [1])], 0)
