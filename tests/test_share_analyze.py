"""``share analyze`` on real files of every form: ONNX (inline, external data, Constant nodes, subgraphs),
raw weight folders, tar ``.bin`` archives and safetensors written by hand; identical, renamed, reshaped,
transposed, LSTM gate-permuted and near-duplicate weights; a real MiniLM against a fine-tuned copy; hostile
and broken inputs refused with nothing written anywhere."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pyqshare.errors import InputError
from pyqshare.model import find_weights, load_model, save_model
from pyqshare.share import analyze as analyze_module
from pyqshare.share.analyze import analyze
from pyqshare.share.sources import open_model

RNG = np.random.default_rng(4)


# ----------------------------------------------------------------------------------------------- builders

def weights_model(path: Path, weights: dict[str, np.ndarray], *, external: bool = False,
                  constants: dict[str, np.ndarray] | None = None,
                  subgraph: dict[str, np.ndarray] | None = None) -> Path:
    """A valid model reading each weight through an Identity: initializers, Constant nodes, and initializers
    of an If node's then-branch (both branches output the cond's opposite, the subgraph weights' sum)."""
    nodes, outputs, initializers = [], [], []
    for name, value in weights.items():
        initializers.append(numpy_helper.from_array(value, name))
    for name, value in (constants or {}).items():
        nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name)))
    for name in [*weights, *(constants or {})]:
        nodes.append(helper.make_node("Identity", [name], [f"{name}_out"]))
        outputs.append(helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None))
    inputs = []
    if subgraph:
        branch_nodes = [helper.make_node("ReduceSum", [name], [f"{name}_sum"], keepdims=0) for name in subgraph]
        branch_nodes.append(helper.make_node("Sum", [f"{name}_sum" for name in subgraph], ["branch_out"]))
        then_branch = helper.make_graph(branch_nodes, "then", [],
                                        [helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, [])],
                                        [numpy_helper.from_array(value, name) for name, value in subgraph.items()])
        else_branch = helper.make_graph(
            [helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.float32(0), "zero"))],
            "else", [], [helper.make_tensor_value_info("zero", TensorProto.FLOAT, [])])
        nodes.append(helper.make_node("If", ["cond"], ["if_out"], then_branch=then_branch, else_branch=else_branch))
        inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
        outputs.append(helper.make_tensor_value_info("if_out", TensorProto.FLOAT, []))
    graph = helper.make_graph(nodes, "weights", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    save_model(model, path, external_data=external)
    return path


def lstm_model(path: Path, w: np.ndarray, r: np.ndarray, b: np.ndarray) -> Path:
    hidden = r.shape[-1]
    node = helper.make_node("LSTM", ["x", "W", "R", "B"], ["Y"], hidden_size=hidden)
    graph = helper.make_graph(
        [node], "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, w.shape[-1]])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(r, "R"), numpy_helper.from_array(b, "B")])
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], *, header_override: bytes | None = None) -> Path:
    """The format by hand: little-endian u64 header length, JSON header, then the data, back to back."""
    codes = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
             np.dtype(np.int64): "I64"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, value in tensors.items():
        blob = np.ascontiguousarray(value).tobytes()
        header[name] = {"dtype": codes[value.dtype], "shape": list(value.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    encoded = header_override if header_override is not None else json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + b"".join(blobs))
    return path


def raw_folder(folder: Path, tensors: dict[str, np.ndarray]) -> Path:
    for name, value in tensors.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        value.tofile(folder / name)
    return folder


def tar_of(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w") as tar:
        for file in sorted(folder.rglob("*")):
            tar.add(file, arcname=file.relative_to(folder).as_posix(), recursive=False)
    return archive


def tree(root: Path) -> dict[str, int]:
    """Every path under ``root`` (links not followed) with its size: the state before and after a refusal."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            found[str(path.relative_to(root))] = path.lstat().st_size
    return found


def pair(report: dict, a: int, b: int) -> dict:
    found = next(p for p in report["pairs"] if (p["a"], p["b"]) == (a, b))
    return {key: found[key] for key in ("identical", "relaid", "near_identical", "different", "unmatched_a", "unmatched_b")}


def counts(identical=0, relaid=0, near_identical=0, different=0, unmatched_a=0, unmatched_b=0) -> dict:
    return dict(identical=identical, relaid=relaid, near_identical=near_identical, different=different,
                unmatched_a=unmatched_a, unmatched_b=unmatched_b)


def noisy(value: np.ndarray, relative: float) -> np.ndarray:
    wide = value.astype(np.float64)
    return (wide + RNG.standard_normal(value.shape) * relative * np.sqrt(np.mean(wide**2))).astype(value.dtype)


# ----------------------------------------------------------------------------------------------- a mixed family

@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Six models of five forms built from one set of base weights (see the expected counts below)."""
    root = tmp_path_factory.mktemp("family")
    base = {name: RNG.standard_normal(shape).astype(np.float32)
            for name, shape in {"embed": (100, 64), "q": (64, 64), "k": (64, 48), "v": (64, 32), "o": (32, 64)}.items()}
    v_near = noisy(base["v"], 1e-3)
    o_other = RNG.standard_normal((32, 64)).astype(np.float32)
    paths = [
        weights_model(root / "m0.onnx", base),
        # external data: embed renamed, q and k as they are, v fine-tuned slightly, o retrained from scratch
        weights_model(root / "ext" / "m1.onnx", {"embed_renamed": base["embed"], "q": base["q"], "k": base["k"],
                                                 "v": v_near, "o": o_other}, external=True),
        # embed as an initializer, q as a Constant node, k inside an If's then-branch
        weights_model(root / "m2.onnx", {"embed": base["embed"]}, constants={"q_const": base["q"]},
                      subgraph={"k_sub": base["k"]}),
        # transposed o (a torch Linear against an ONNX MatMul), q flattened (reshaped: same bytes)
        write_safetensors(root / "m3.safetensors", {"o.weight": np.ascontiguousarray(base["o"].T),
                                                    "q_flat": base["q"].reshape(-1)}),
        raw_folder(root / "raw", {f"layers/{name}.raw": value for name, value in base.items()}),
    ]
    paths.append(tar_of(paths[-1], root / "m5.bin"))
    return {"paths": paths, "base": base, "v_near": v_near, "o_other": o_other, "root": root}


@pytest.fixture(scope="module")
def family_report(family):
    return analyze(family["paths"])


def test_every_form_lists_its_tensors(family):
    sources = [open_model(path, index) for index, path in enumerate(family["paths"])]
    assert [source.form for source in sources] == ["onnx", "onnx", "onnx", "safetensors", "raw", "tar"]
    assert sorted(t.name for t in sources[2].tensors) == ["embed", "k_sub", "q_const"]
    assert {t.name: t.shape for t in sources[3].tensors} == {"o.weight": (64, 32), "q_flat": (4096,)}
    assert sorted(t.name for t in sources[5].tensors) == sorted(f"layers/{n}.raw" for n in family["base"])
    raw = {t.name: t for t in sources[4].tensors}
    assert raw["layers/q.raw"].dtype == np.uint8 and raw["layers/q.raw"].shape == (64 * 64 * 4,)
    for source in sources:  # every reader gives back the very bytes written
        for tensor in source.tensors:
            values = tensor.array()
            assert values.flags.c_contiguous and not values.flags.writeable
            assert values.shape == tensor.shape and values.nbytes == tensor.nbytes
    assert sources[5].tensors[0].array().tobytes() == (family["root"] / "raw" / sources[5].tensors[0].name).read_bytes()


def test_file_backed_tensors_are_memory_mapped_not_copied(family):
    for path in family["paths"][3:]:
        for tensor in open_model(path).tensors:
            values = tensor.array()
            assert not values.flags.owndata and values.base is not None  # a view of a memory map


def test_pair_counts_by_content(family_report):
    report = family_report
    # m1: embed renamed, q, k identical; v near; o same name, other content
    assert pair(report, 0, 1) == counts(identical=3, near_identical=1, different=1)
    assert pair(report, 0, 2) == counts(identical=3, unmatched_a=2)  # Constant q, subgraph k, embed
    # the flattened q is identical bytes; the transposed o is a layout copy
    assert pair(report, 0, 3) == counts(identical=1, relaid=1, unmatched_a=3)
    assert pair(report, 0, 4) == counts(identical=5)  # float32 ONNX against raw bytes
    assert pair(report, 4, 5) == counts(identical=5)  # the folder and its tar archive
    assert pair(report, 1, 3) == counts(identical=1, unmatched_a=4, unmatched_b=1)  # m1's o is not m0's o
    assert pair(report, 1, 5) == counts(identical=3, near_identical=1, unmatched_a=1, unmatched_b=1)
    for found in report["pairs"]:  # every tensor of each side is accounted for exactly once
        a_count = report["model_stats"][found["a"]]["tensors"]
        b_count = report["model_stats"][found["b"]]["tensors"]
        matched = found["identical"] + found["relaid"] + found["near_identical"] + found["different"]
        assert matched + found["unmatched_a"] == a_count and matched + found["unmatched_b"] == b_count


def test_matches_say_which_tensor_matches_which(family_report):
    matches = next(p for p in family_report["pairs"] if (p["a"], p["b"]) == (0, 1))["matches"]
    near = next(m for m in matches if m["kind"] == "near_identical")
    assert (near["tensor_a"], near["tensor_b"]) == ("v", "v")
    assert 0.99 < near["cosine"] < 1 and 5e-4 < near["relative_l2"] < 2e-3 and near["max_abs_difference"] > 0
    assert {"kind": "different", "tensor_a": "o", "tensor_b": "o"} in matches
    relaid = next(p for p in family_report["pairs"] if (p["a"], p["b"]) == (0, 3))["matches"]
    assert relaid == [{"kind": "transposed", "tensor_a": "o", "tensor_b": "o.weight", "detail": "2-D transpose"}]


def test_groups_and_bytes_match_a_plain_dictionary_of_contents(family, family_report):
    report = family_report
    contents: dict[bytes, list[tuple[int, str]]] = {}
    for index, path in enumerate(family["paths"]):
        for tensor in open_model(path, index).tensors:
            contents.setdefault(tensor.array().tobytes(), []).append((index, tensor.name))
    assert report["total_bytes"] == sum(len(blob) * len(members) for blob, members in contents.items())
    assert report["unique_bytes"] == report["predicted_combined_bytes"] == sum(map(len, contents))
    assert report["shared_bytes"] == sum(len(blob) for blob, members in contents.items()
                                         if len({model for model, _ in members}) > 1)
    expected_groups = sorted(sorted(members) for members in contents.values() if len(members) > 1)
    found_groups = sorted(sorted((m["model"], m["tensor"]) for m in group["members"]) for group in report["groups"])
    assert found_groups == expected_groups
    embed = next(g for g in report["groups"] if {"model": 1, "tensor": "embed_renamed"} in g["members"])
    assert embed["bytes"] == family["base"]["embed"].nbytes and len(embed["members"]) == 5
    assert report["predicted_solo_bytes"] == report["total_bytes"]  # no model repeats a tensor of its own
    assert report["predicted_combined_bytes"] < report["predicted_solo_bytes"]


def test_family_counts(family_report):
    # each tensor once, by its best relation to another model: m1's v is near m0's, m1's o has no copy but
    # m0 has an "o" (different), m3's o.weight is m0's o transposed; the other 22 have copies elsewhere
    assert family_report["family"] == {"tensors": 5 + 5 + 3 + 2 + 5 + 5, "identical": 22, "relaid": 1,
                                       "near_identical": 1, "different": 1, "unmatched": 0}


def test_relations_are_reported_with_their_members(family_report):
    kinds = sorted(relation["kind"] for relation in family_report["relations"])
    assert kinds == ["near_identical", "transposed"]
    transposed = next(r for r in family_report["relations"] if r["kind"] == "transposed")
    sides = [{(m["model"], m["tensor"]) for m in transposed[side]} for side in ("a", "b")]
    assert {(0, "o"), (4, "layers/o.raw"), (5, "layers/o.raw")} in sides and {(3, "o.weight")} in sides


def test_a_stricter_threshold_turns_the_near_copy_into_a_difference(family):
    report = analyze(family["paths"][:2], near_threshold=0.9999999)
    assert pair(report, 0, 1) == counts(identical=3, different=2)


def test_min_elements_drops_small_tensors(family):
    report = analyze(family["paths"][:2], min_elements=100 * 64)
    assert pair(report, 0, 1) == counts(identical=1)  # only the embedding table has 6,400 elements


def test_duplicates_inside_a_model_match_one_to_one(tmp_path):
    w = RNG.standard_normal((16, 16)).astype(np.float32)
    a = weights_model(tmp_path / "a.onnx", {"tied_in": w, "tied_out": w})
    b = weights_model(tmp_path / "b.onnx", {"tied_out": w})
    report = analyze([a, b])
    assert pair(report, 0, 1) == counts(identical=1, unmatched_a=1)
    assert report["model_stats"][0]["solo_bytes"] == w.nbytes  # stored once in its own binary too
    assert report["groups"][0]["members"] == [{"model": 0, "tensor": "tied_in"}, {"model": 0, "tensor": "tied_out"},
                                              {"model": 1, "tensor": "tied_out"}]


# ----------------------------------------------------------------------------------------------- LSTM gate order

def test_lstm_gate_order_copy_is_found_and_means_the_same_lstm(tmp_path):
    """ONNX LSTM W/R (gates i o f c) against PyTorch weight_ih/weight_hh (gates i f g o) of the same LSTM."""
    hidden, inputs = 16, 8
    w = RNG.standard_normal((1, 4 * hidden, inputs)).astype(np.float32)
    r = RNG.standard_normal((1, 4 * hidden, hidden)).astype(np.float32)
    b = RNG.standard_normal((1, 8 * hidden)).astype(np.float32)
    to_torch = [0, 2, 3, 1]  # torch block k is onnx block to_torch[k]

    def torch_order(value):
        return np.ascontiguousarray(value.reshape(4, hidden, -1)[to_torch].reshape(4 * hidden, *value.shape[2:]))

    torch_params = {"lstm.weight_ih_l0": torch_order(w[0][None]), "lstm.weight_hh_l0": torch_order(r[0][None]),
                    "lstm.bias_ih_l0": torch_order(b[0, :4 * hidden].reshape(1, -1, 1)).reshape(-1),
                    "lstm.bias_hh_l0": torch_order(b[0, 4 * hidden:].reshape(1, -1, 1)).reshape(-1)}
    onnx_path = lstm_model(tmp_path / "lstm.onnx", w, r, b)
    st_path = write_safetensors(tmp_path / "lstm.safetensors", torch_params)
    report = analyze([onnx_path, st_path])
    # W and R are gate-reordered copies; ONNX's B [1, 8H] has no single-tensor counterpart (torch splits it)
    assert pair(report, 0, 1) == counts(relaid=2, unmatched_a=1, unmatched_b=2)
    matches = report["pairs"][0]["matches"]
    assert {(m["tensor_a"], m["tensor_b"], m["detail"]) for m in matches} == {
        ("W", "lstm.weight_ih_l0", "LSTM gates onnx iofc -> torch ifgo"),
        ("R", "lstm.weight_hh_l0", "LSTM gates onnx iofc -> torch ifgo")}

    torch = pytest.importorskip("torch")  # the permutation is PyTorch's real gate order
    lstm = torch.nn.LSTM(inputs, hidden)
    with torch.no_grad():
        for name, value in torch_params.items():
            getattr(lstm, name.removeprefix("lstm.")).copy_(torch.from_numpy(value))
        x = RNG.standard_normal((5, 1, inputs)).astype(np.float32)
        expected = lstm(torch.from_numpy(x))[0].numpy()
    got = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got[:, 0], expected, rtol=1e-5, atol=1e-5)


def test_gru_gate_order_between_two_onnx_exports(tmp_path):
    hidden = 24
    w = RNG.standard_normal((1, 3 * hidden, 8)).astype(np.float32)
    node_args = {"hidden_size": hidden}
    paths = []
    for name, value in (("a", w), ("b", np.ascontiguousarray(w.reshape(3, -1)[[1, 0, 2]].reshape(w.shape)))):
        node = helper.make_node("GRU", ["x", "W", "R"], ["Y"], **node_args)
        r = np.zeros((1, 3 * hidden, hidden), np.float32) + (0.5 if name == "a" else 0.25)
        graph = helper.make_graph([node], "gru", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1, 8])],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(value, "W"), numpy_helper.from_array(r, "R")])
        paths.append(tmp_path / f"{name}.onnx")
        save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), paths[-1])
    report = analyze(paths)
    assert pair(report, 0, 1) == counts(relaid=1, near_identical=1)  # constant R's: cosine 1, other values
    assert report["pairs"][0]["matches"][0]["detail"] == "GRU gates onnx zrh -> torch rzn"


# ----------------------------------------------------------------------------------------------- narrowing

def test_near_duplicates_are_confirmed_only_for_candidates(tmp_path, monkeypatch):
    """300 unrelated tensors of one shape per model and two near pairs: the signatures nominate the pairs,
    so the full comparison runs a handful of times, not 300 x 300."""
    a = {f"w{i}": RNG.standard_normal((16, 32)).astype(np.float32) for i in range(300)}
    b = {f"u{i}": RNG.standard_normal((16, 32)).astype(np.float32) for i in range(300)}
    b["u7"], b["u8"] = noisy(a["w3"], 0.02), noisy(a["w9"], 0.05)
    calls = []
    compare = analyze_module._compare_values
    monkeypatch.setattr(analyze_module, "_compare_values", lambda x, y: calls.append(1) or compare(x, y))
    report = analyze([write_safetensors(tmp_path / "a.safetensors", a), write_safetensors(tmp_path / "b.safetensors", b)])
    assert pair(report, 0, 1) == counts(near_identical=2, unmatched_a=298, unmatched_b=298)
    assert {(m["tensor_a"], m["tensor_b"]) for m in report["pairs"][0]["matches"]} == {("w3", "u7"), ("w9", "u8")}
    assert 2 <= len(calls) <= 20


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_near_duplicates_of_half_precision_values(tmp_path, dtype):
    w = RNG.standard_normal((64, 64)).astype(dtype)
    a = write_safetensors(tmp_path / "a.safetensors", {"w": w})
    b = write_safetensors(tmp_path / "b.safetensors", {"w": noisy(w, 0.01)})
    found = analyze([a, b])["pairs"][0]["matches"][0]
    assert found["kind"] == "near_identical" and found["cosine"] > 0.999


# ----------------------------------------------------------------------------------------------- a real model

def test_minilm_against_a_fine_tune_of_its_top_layer(minilm_onnx, tmp_path, run_cli):
    """MiniLM against a copy whose layer 5 (the top one) got 1% noise: everything else is shared, every
    layer-5 weight is near-identical to its original, found by content (MatMul weights are anonymous)."""
    tuned = load_model(minilm_onnx, load_weights=True)
    weights = find_weights(tuned, None)
    top = [w for w in weights if "layer.5." in w.name or any("/layer.5/" in node for node, _, _ in w.consumers)]
    assert 10 <= len(top) < len(weights) // 4
    from pyqshare.model import replace_weight

    for weight in top:
        replace_weight(tuned, weight, noisy(weight.array(), 0.01))
    tuned_path = tmp_path / "tuned.onnx"
    save_model(tuned, tuned_path)
    done = run_cli("share", "analyze", minilm_onnx, tuned_path, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    total = len(weights)
    assert pair(report, 0, 1) == counts(identical=total - len(top), near_identical=len(top))
    assert report["family"] == {"tensors": 2 * total, "identical": 2 * (total - len(top)), "relaid": 0,
                                "near_identical": 2 * len(top), "different": 0, "unmatched": 0}
    top_bytes = sum(w.nbytes for w in top)
    assert report["predicted_combined_bytes"] == report["predicted_solo_bytes"] // 2 + top_bytes
    assert all(m["cosine"] > 0.999 for m in report["pairs"][0]["matches"])


# ----------------------------------------------------------------------------------------------- the command line

def test_cli_json_and_model_path_spelling(family, run_cli):
    a, b = family["paths"][0], family["paths"][4]
    done = run_cli("share", "analyze", a, "--model-path", b, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["models"] == [str(a), str(b)]
    assert set(report) >= {"models", "total_bytes", "unique_bytes", "predicted_combined_bytes", "pairs", "groups"}
    assert set(report["pairs"][0]) >= {"a", "b", "identical", "near_identical", "different", "unmatched_a", "unmatched_b"}


@pytest.mark.parametrize("count", [1, 65])
def test_cli_refuses_too_few_or_too_many_models(family, run_cli, count):
    done = run_cli("share", "analyze", *[family["paths"][0]] * count, "--json")
    assert done.returncode == 2 and done.stdout == ""
    assert f"2 to 64 models, got {count}" in done.stderr


def test_cli_refuses_a_bad_threshold(family, run_cli):
    done = run_cli("share", "analyze", *family["paths"][:2], "--near-threshold", "1.5")
    assert done.returncode == 2 and "--near-threshold" in done.stderr


# ----------------------------------------------------------------------------------------------- hostile inputs

HOSTILE_NAMES = {"dotdot": "../x", "nested_dotdot": "a/../../x", "absolute": "/tmp/pyqshare-evil.raw",
                 "symlink": "link.raw", "hardlink": "link.raw", "device": "dev.raw"}


def hostile_tar(path: Path, kind: str) -> Path:
    """A tar holding one ordinary member and one hostile one, written with tarfile itself."""
    payload = RNG.standard_normal(64).astype(np.float32).tobytes()
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("fine.raw")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
        info = tarfile.TarInfo(HOSTILE_NAMES[kind])
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "fine.raw"
        elif kind == "device":
            info.type = tarfile.CHRTYPE
        else:
            info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload) if info.isreg() else None)
    return path


HOSTILE_TARS = {"dotdot": "contains '..'", "nested_dotdot": "contains '..'", "absolute": "absolute path",
                "symlink": "symbolic link", "hardlink": "hard link", "device": "device or FIFO"}


@pytest.fixture
def sandbox(tmp_path):
    """A folder for the hostile inputs, the good model to pair them with, and the filesystem checks: nothing
    appears or changes in the folder or its parent, and no file escapes to where a traversal would point."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    good = weights_model(tmp_path / "good.onnx", {"w": RNG.standard_normal((8, 8)).astype(np.float32)})
    yield folder, good
    for escaped in (tmp_path / "x", folder.parent.parent / "x", Path("/tmp/pyqshare-evil.raw")):
        assert not escaped.exists()


def refused(folder: Path, good: Path, model: Path, fragment: str) -> None:
    before, parent_before = tree(folder), tree(folder.parent)
    with pytest.raises(InputError, match=fragment) as caught:
        analyze([good, model])
    assert str(model) in str(caught.value) and "\n" not in str(caught.value)
    assert tree(folder) == before and tree(folder.parent) == parent_before


@pytest.mark.parametrize("kind", sorted(HOSTILE_TARS))
def test_hostile_tar_members_are_refused(sandbox, kind):
    folder, good = sandbox
    path = hostile_tar(folder / f"{kind}.bin", kind)
    with tarfile.open(path) as archive:  # the archive really holds the hostile member
        assert archive.getnames() == ["fine.raw", HOSTILE_NAMES[kind]]
    refused(folder, good, path, HOSTILE_TARS[kind])


@pytest.mark.parametrize("cut", ["inside_data", "inside_header", "at_header"])
def test_truncated_tar_is_refused(sandbox, cut):
    folder, good = sandbox
    source = raw_folder(folder / "raw", {"a.raw": RNG.standard_normal(4000).astype(np.float32),
                                         "b.raw": RNG.standard_normal(4000).astype(np.float32)})
    whole = tar_of(source, folder / "whole.tar").read_bytes()
    second_header = 512 + 16000  # a.raw's header and data (16,000 bytes, a multiple of 512 once padded)
    second_header += -second_header % 512
    size = {"inside_data": 2000, "inside_header": second_header + 100, "at_header": second_header}[cut]
    path = folder / f"{cut}.bin"
    path.write_bytes(whole[:size])
    refused(folder, good, path, "truncated")


def test_compressed_tar_is_refused(sandbox):
    folder, good = sandbox
    source = raw_folder(folder / "raw", {"a.raw": RNG.standard_normal(100).astype(np.float32)})
    path = folder / "model.bin"
    path.write_bytes(gzip.compress(tar_of(source, folder / "plain.tar").read_bytes()))
    refused(folder, good, path, "not an uncompressed tar")


@pytest.mark.parametrize("suffix", [".onnx", ".bin", ".safetensors", ""])
def test_zero_byte_model_is_refused(sandbox, suffix):
    folder, good = sandbox
    path = folder / f"empty{suffix}"
    path.touch()
    refused(folder, good, path, "empty file")


SAFETENSORS_CASES = {
    "past_end": (b'{"w": {"dtype": "F32", "shape": [64], "data_offsets": [0, 4096]}}', "fall outside"),
    "malformed": (b'{"w": {"dtype": "F32", "shape": [64], ', "malformed safetensors header"),
    "not_object": (b"[1, 2]", "not a JSON object"),
    "wrong_size": (b'{"w": {"dtype": "F32", "shape": [32], "data_offsets": [0, 256]}}', "needs 128"),
    "bad_dtype": (b'{"w": {"dtype": "F33", "shape": [64], "data_offsets": [0, 256]}}', "unknown dtype"),
    "negative": (b'{"w": {"dtype": "F32", "shape": [64], "data_offsets": [-256, 0]}}', "fall outside"),
    "overlap": (b'{"w": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}, '
                b'"u": {"dtype": "F32", "shape": [64], "data_offsets": [128, 384]}}', "overlap"),
}


@pytest.mark.parametrize("case", sorted(SAFETENSORS_CASES))
def test_broken_safetensors_is_refused(sandbox, case):
    folder, good = sandbox
    header, fragment = SAFETENSORS_CASES[case]
    path = write_safetensors(folder / f"{case}.safetensors", {"w": np.zeros(64, np.float32), "u": np.ones(64, np.float32)},
                             header_override=header)
    refused(folder, good, path, fragment)


def test_safetensors_header_length_past_the_end_is_refused(sandbox):
    folder, good = sandbox
    path = folder / "long.safetensors"
    path.write_bytes((10**6).to_bytes(8, "little") + b'{"w": 1}')
    refused(folder, good, path, "does not fit")


def test_truncated_safetensors_data_is_refused(sandbox):
    folder, good = sandbox
    path = write_safetensors(folder / "cut.safetensors", {"w": np.ones((64, 64), np.float32)})
    path.write_bytes(path.read_bytes()[:-100])
    refused(folder, good, path, "fall outside")


def test_onnx_external_data_escaping_the_folder_is_refused(sandbox):
    folder, good = sandbox
    secret = folder.parent / "secret.bin"
    secret.write_bytes(np.ones(256, np.float32).tobytes())
    model_dir = folder / "model"
    path = weights_model(model_dir / "m.onnx", {"w": np.ones((16, 16), np.float32)}, external=True)
    model = onnx.load(path, load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../../secret.bin"
    path.write_bytes(model.SerializeToString())
    refused(folder, good, path, "contains '..'")


def test_raw_folder_with_a_symlink_is_refused(sandbox):
    folder, good = sandbox
    outside = folder.parent / "outside.raw"
    outside.write_bytes(b"\x01" * 4096)
    source = raw_folder(folder / "raw", {"a.raw": np.ones(100, np.float32)})
    os.symlink(outside, source / "b.raw")
    refused(folder, good, source, "symbolic link")
    (source / "b.raw").unlink()
    os.symlink(folder.parent, source / "dir")
    refused(folder, good, source, "symbolic link")


def test_a_missing_model_and_a_non_model_are_refused(sandbox):
    folder, good = sandbox
    refused(folder, good, folder / "missing.onnx", "no such model")
    junk = folder / "junk.onnx"
    junk.write_bytes(b"\xff" * 100)
    refused(folder, good, junk, "not an ONNX model")
    empty_dir = folder / "empty_raw"
    empty_dir.mkdir()
    refused(folder, good, empty_dir, "empty folder")
    shutil.rmtree(empty_dir)


def test_tar_with_a_repeated_member_name_is_refused(sandbox):
    folder, good = sandbox
    path = folder / "twice.bin"
    with tarfile.open(path, "w") as tar:
        for payload in (b"\x00" * 256, b"\x01" * 256):  # extraction would keep the second one silently
            info = tarfile.TarInfo("w.raw")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    refused(folder, good, path, "appears twice")


def test_quantized_view_lists_float_identical_weights_whose_encodings_differ(tmp_path, run_method, run_cli):
    """``--quantized``: the same float MLP per channel and per tensor shares only its small identical tensors,
    and w1/w2 are listed with the encoding fields that differ."""
    from pyqshare.zoo import synthetic_mlp

    source = synthetic_mlp(tmp_path / "mlp.onnx")
    run_method("per-channel", source, tmp_path / "a.onnx", "--optimization-level", "1", "--input-shape", "x=1,16,32")
    run_method("per-channel", source, tmp_path / "b.onnx", "--optimization-level", "1", "--input-shape", "x=1,16,32",
               "--weight-method", "per-tensor")
    done = run_cli("share", "analyze", tmp_path / "a.onnx", tmp_path / "b.onnx", "--quantized",
                   "--float-models", source, source, "--json")
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)["quantized"]
    assert view["float_evidence"] == "float"
    differs = {mismatch["members"][0]["tensor"]: set(mismatch["differs"]) for mismatch in view["mismatches"]}
    assert differs == {"w1": {"granularity", "axis", "scale"}, "w2": {"granularity", "axis", "scale"}}
    prediction = view["prediction"]
    assert prediction["shared_bytes"] < prediction["total_bytes"] / 4
    refused = run_cli("share", "analyze", tmp_path / "a.onnx", tmp_path / "b.onnx", "--float-models", source, source)
    assert refused.returncode == 2 and "--quantized" in refused.stderr


def test_inline_onnx_initializers_are_mapped_from_the_file_not_kept_parsed(tmp_path):
    """Main-graph initializers stored as raw bytes are read at their offset in the .onnx file (so a family of
    inline models is not held in memory); Constant-node weights still come from the parsed model."""
    import mmap

    import onnx
    from onnx import helper, numpy_helper

    from pyqshare.share.sources import open_model

    rng = np.random.default_rng(7)
    weight, constant = rng.standard_normal((64, 32)).astype(np.float32), rng.standard_normal((32, 8)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(constant, "c")),
             helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("MatMul", ["h", "c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8])],
                              [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    tensors = {t.name: t for t in open_model(tmp_path / "m.onnx").tensors}
    mapped, parsed = tensors["w"].array(), tensors["c"].array()
    np.testing.assert_array_equal(mapped, weight)
    np.testing.assert_array_equal(parsed, constant)

    def backing(array):
        while isinstance(array, np.ndarray) and array.base is not None:
            array = array.base
        return array.obj if isinstance(array, memoryview) else array

    assert isinstance(backing(mapped), mmap.mmap) and not isinstance(backing(parsed), mmap.mmap)
