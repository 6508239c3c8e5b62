"""AIMET encodings: file round trips (0.6.1, 1.0.0), known answers from the spec, refusals, ONNX equivalence
through onnxruntime, and collection from QDQ models."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pyqshare.encodings import (
    EncodingKind,
    Encodings,
    TensorEncoding,
    encodings_from_qdq_model,
    read_encodings,
    write_encodings,
)
from pyqshare.errors import InputError

RNG_SEED = 20240613


def f32(values) -> np.ndarray:
    """Scales that are exact in float32, as AIMET's are."""
    return np.asarray(values, dtype=np.float32)


# ---------------------------------------------------------------- one encoding of every kind

def per_tensor_sym_int8() -> TensorEncoding:
    return TensorEncoding(name="conv.weight", bitwidth=8, symmetric=True, scale=f32(0.0125), offset=np.array(-128))


def per_tensor_asym_uint8() -> TensorEncoding:
    return TensorEncoding(name="relu_out", bitwidth=8, scale=f32(0.02), offset=np.array(-37))


def int16_activation() -> TensorEncoding:
    return TensorEncoding(name="/encoder/Add_output_0", bitwidth=16, scale=f32(2**-15), offset=np.array(-32700))


def int4_per_channel() -> TensorEncoding:
    return TensorEncoding(name="fc.weight", bitwidth=4, symmetric=True, scale=f32([0.5, 0.25, 0.125]),
                          offset=np.full(3, -8), axis=0)


def int4_per_block() -> TensorEncoding:
    scale = f32(np.arange(1, 9).reshape(4, 2) / 64)
    return TensorEncoding(name="proj.weight", bitwidth=4, symmetric=True, scale=scale, offset=np.full((4, 2), -8),
                          axis=1, block_axis=0, block_size=16)


def lpbq() -> TensorEncoding:
    return TensorEncoding(name="lm_head.weight", bitwidth=8, symmetric=True, scale=f32([0.001, 0.002, 0.003]),
                          offset=np.full(3, -128), axis=0, block_axis=1, block_size=32, compressed_bitwidth=4,
                          per_block_int_scale=np.array([[3, 5], [11, 9], [7, 16]]))


def float16() -> TensorEncoding:
    return TensorEncoding(name="softmax_out", dtype="float", bitwidth=16)


ALL_KINDS = [per_tensor_sym_int8, per_tensor_asym_uint8, int16_activation, int4_per_channel, int4_per_block, lpbq,
             float16]
LEGACY_KINDS = [per_tensor_sym_int8, per_tensor_asym_uint8, int16_activation, int4_per_channel, float16]


def without_axes(enc: TensorEncoding) -> TensorEncoding:
    """What a file gives back: files record no axes."""
    return dataclasses.replace(enc, axis=None, block_axis=None)


def test_kinds_and_derived_values():
    assert [make().kind for make in ALL_KINDS] == [
        EncodingKind.PER_TENSOR, EncodingKind.PER_TENSOR, EncodingKind.PER_TENSOR, EncodingKind.PER_CHANNEL,
        EncodingKind.PER_BLOCK, EncodingKind.LPBQ, EncodingKind.PER_TENSOR]
    sym = per_tensor_sym_int8()
    assert sym.min == pytest.approx(-128 * 0.0125) and sym.max == pytest.approx(127 * 0.0125)
    asym = per_tensor_asym_uint8()
    assert asym.min == pytest.approx(-37 * 0.02) and asym.max == pytest.approx((255 - 37) * 0.02)
    assert np.array_equal(lpbq().block_scale, f32([[3, 5], [11, 9], [7, 16]]) * f32([0.001, 0.002, 0.003])[:, None])
    assert not per_tensor_sym_int8().scale.flags.writeable


# ---------------------------------------------------------------- file round trips

@pytest.mark.parametrize("version,makers", [("1.0.0", ALL_KINDS), ("0.6.1", LEGACY_KINDS)])
def test_file_round_trip(tmp_path, version, makers):
    encs = [make() for make in makers]
    original = Encodings(
        params={e.name: e for e in encs if "weight" in e.name},
        activations={e.name: e for e in encs if "weight" not in e.name},
        quantizer_args={"activation_bitwidth": 16, "dtype": "int", "is_symmetric": True, "param_bitwidth": 8,
                        "per_channel_quantization": True, "quant_scheme": "post_training_tf"},
        excluded_layers=["/pooler/Tanh"],
        extra={"producer": {"name": "pyqshare"}},
    )
    path = tmp_path / "model.encodings"
    write_encodings(path, original, version=version)
    document = json.loads(path.read_text())
    assert document["version"] == version
    again = read_encodings(path, block_channels={"proj.weight": 4})
    assert again.params == {name: without_axes(e) for name, e in original.params.items()}
    assert again.activations == {name: without_axes(e) for name, e in original.activations.items()}
    assert (again.quantizer_args, again.excluded_layers, again.extra) == (
        original.quantizer_args, original.excluded_layers, original.extra)
    rewritten = tmp_path / "again.encodings"
    write_encodings(rewritten, again, version=version)
    assert rewritten.read_bytes() == path.read_bytes()


def test_0_6_1_layout_on_disk(tmp_path):
    path = tmp_path / "m.encodings"
    write_encodings(path, Encodings(params={"fc.weight": int4_per_channel()}, activations={"softmax_out": float16()},
                                    quantizer_args={"is_symmetric": True}), version="0.6.1")
    document = json.loads(path.read_text())
    channels = document["param_encodings"]["fc.weight"]
    assert [c["scale"] for c in channels] == [0.5, 0.25, 0.125]
    assert {c["offset"] for c in channels} == {-8} and {c["is_symmetric"] for c in channels} == {"True"}
    assert [(c["min"], c["max"]) for c in channels] == [(-4.0, 3.5), (-2.0, 1.75), (-1.0, 0.875)]
    assert document["activation_encodings"]["softmax_out"] == [{"bitwidth": 16, "dtype": "float"}]
    assert document["quantizer_args"] == {"is_symmetric": "True"}


def test_1_0_0_layout_on_disk(tmp_path):
    path = tmp_path / "m.encodings"
    write_encodings(path, Encodings(params={"lm_head.weight": lpbq(), "proj.weight": int4_per_block()},
                                    activations={"softmax_out": float16()}))
    document = json.loads(path.read_text())
    lp, block = document["param_encodings"]
    assert lp == {"name": "lm_head.weight", "dtype": "INT", "enc_type": "LPBQ", "bw": 8, "is_sym": True,
                  "scale": f32([0.001, 0.002, 0.003]).tolist(), "offset": [-128] * 3, "block_size": 32,
                  "compressed_bw": 4, "per_block_int_scale": [3, 5, 11, 9, 7, 16]}
    # Channel-major even though this MatMul weight is [in, out] (channel axis 1), as AIMET writes it.
    assert block["enc_type"] == "PER_BLOCK" and block["scale"] == (np.arange(1, 9) / 64).tolist()
    assert document["activation_encodings"] == [{"name": "softmax_out", "dtype": "FLOAT", "enc_type": "PER_TENSOR",
                                                 "bw": 16}]


@pytest.mark.parametrize("maker", [int4_per_block, lpbq])
def test_0_6_1_refuses_blocks(tmp_path, maker):
    path = tmp_path / "m.encodings"
    with pytest.raises(InputError, match=r"m\.encodings: param_encodings .*0\.6\.1 cannot express .*1\.0\.0"):
        write_encodings(path, Encodings(params={maker().name: maker()}), version="0.6.1")
    assert not path.exists()


def test_write_refusals(tmp_path):
    path = tmp_path / "m.encodings"
    with pytest.raises(InputError, match="unknown encodings version '2.0.0'"):
        write_encodings(path, Encodings(), version="2.0.0")
    with pytest.raises(InputError, match="must be a TensorEncoding named 'other'"):
        write_encodings(path, Encodings(params={"other": per_tensor_sym_int8()}))
    two_bit = TensorEncoding(name="w", bitwidth=2, symmetric=True, scale=f32(0.5), offset=np.array(-2))
    with pytest.raises(InputError, match="0.6.1 allows bit widths 4..32, got 2"):
        write_encodings(path, Encodings(params={"w": two_bit}), version="0.6.1")
    assert not path.exists()
    write_encodings(path, Encodings(params={"w": two_bit}))  # 1.0.0 allows 2 bits
    assert read_encodings(path).params["w"] == two_bit


# ---------------------------------------------------------------- known answers

# The spec's example (section "Encoding File Example for PyTorch"), in 0.6.1's fields: dtype and quantizer_args.
SPEC_SAMPLE_0_6_1 = """{
  "version": "0.6.1",
  "activation_encodings": {
    "20": [{"bitwidth": 8, "dtype": "int", "is_symmetric": "False", "max": 2.6086959838867188,
            "min": -2.109158515930176, "offset": -114, "scale": 0.018501389771699905}],
    "21": [{"bitwidth": 8, "dtype": "int", "is_symmetric": "False", "max": 2.558866932988167,
            "min": -0.12636379897594452, "offset": -12, "scale": 0.010530316270887852}],
    "22": [{"bitwidth": 16, "dtype": "float"}]
  },
  "param_encodings": {
    "conv2.weight": [{"bitwidth": 8, "dtype": "int", "is_symmetric": "False", "max": 0.06318144500255585,
                      "min": -0.06268782913684845, "offset": -127, "scale": 0.0004936049808748066}],
    "fc1.weight": [
      {"bitwidth": 8, "dtype": "int", "is_symmetric": "True", "max": 0.05589814856648445,
       "min": -0.05546144023537636, "offset": -128, "scale": 0.0004367042565718293},
      {"bitwidth": 8, "dtype": "int", "is_symmetric": "True", "max": 0.0279, "min": -0.0281, "offset": -128,
       "scale": 0.0002183521282859147}]
  },
  "quantizer_args": {"activation_bitwidth": 8, "dtype": "int", "is_symmetric": "True", "param_bitwidth": 8,
                     "per_channel_quantization": "False", "quant_scheme": "post_training_tf_enhanced"}
}"""

# The spec has no 1.0.0 example; this one follows its tables, with the same values.
SPEC_SAMPLE_1_0_0 = """{
  "version": "1.0.0",
  "activation_encodings": [
    {"name": "20", "dtype": "INT", "enc_type": "PER_TENSOR", "bw": 8, "is_sym": false,
     "scale": [0.018501389771699905], "offset": [-114]},
    {"name": "22", "dtype": "FLOAT", "enc_type": "PER_TENSOR", "bw": 16}
  ],
  "param_encodings": [
    {"name": "fc1.weight", "dtype": "INT", "enc_type": "PER_CHANNEL", "bw": 8, "is_sym": true,
     "scale": [0.0004367042565718293, 0.0002183521282859147], "offset": [-128.0, -128.0]},
    {"name": "fc2.weight", "dtype": "INT", "enc_type": "PER_BLOCK", "bw": 4, "is_sym": true, "block_size": 32,
     "scale": [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625], "offset": [-8, -8, -8, -8, -8, -8]},
    {"name": "fc3.weight", "dtype": "INT", "enc_type": "LPBQ", "bw": 8, "compressed_bw": 4, "is_sym": true,
     "block_size": 64, "scale": [0.001, 0.002], "offset": [-128, -128], "per_block_int_scale": [3, 5, 16, 1]}
  ],
  "quantizer_args": {"activation_bitwidth": 8, "dtype": "int", "is_symmetric": true, "param_bitwidth": 8,
                     "per_channel_quantization": true, "quant_scheme": "post_training_tf"},
  "excluded_layers": []
}"""


def test_known_answer_0_6_1(tmp_path):
    path = tmp_path / "spec.encodings"
    path.write_text(SPEC_SAMPLE_0_6_1)
    got = read_encodings(path)
    act = got.activations["20"]
    assert (act.kind, act.bitwidth, act.symmetric, float(act.scale), int(act.offset)) == (
        EncodingKind.PER_TENSOR, 8, False, 0.018501389771699905, -114)
    qdq = act.to_qdq()  # unsigned asymmetric: zero point = -offset
    assert (qdq.elem_type, qdq.zero_point.dtype, int(qdq.zero_point)) == (TensorProto.UINT8, np.uint8, 114)
    assert float(got.params["conv2.weight"].to_qdq().zero_point) == 127
    assert got.activations["22"] == TensorEncoding(name="22", dtype="float", bitwidth=16)
    fc1 = got.params["fc1.weight"]
    assert fc1.kind == EncodingKind.PER_CHANNEL and fc1.axis is None
    assert np.array_equal(fc1.scale, f32([0.0004367042565718293, 0.0002183521282859147]))
    qdq = dataclasses.replace(fc1, axis=0).to_qdq()  # symmetric int8 (offset -128) is signed with zero point 0
    assert (qdq.elem_type, qdq.zero_point.tolist(), qdq.axis) == (TensorProto.INT8, [0, 0], 0)
    assert got.quantizer_args["is_symmetric"] is True and got.quantizer_args["per_channel_quantization"] is False


def test_known_answer_1_0_0(tmp_path):
    path = tmp_path / "spec.encodings"
    path.write_text(SPEC_SAMPLE_1_0_0)
    got = read_encodings(path, block_channels={"fc2.weight": 3})
    assert got.activations["20"] == TensorEncoding(name="20", bitwidth=8, scale=f32(0.018501389771699905),
                                                   offset=np.array(-114))
    assert got.activations["22"].dtype == "float" and got.activations["22"].bitwidth == 16
    assert np.array_equal(got.params["fc1.weight"].offset, [-128, -128])
    block = got.params["fc2.weight"]
    assert block.kind == EncodingKind.PER_BLOCK and block.block_size == 32
    assert np.array_equal(block.scale, f32([[0.5, 0.25], [0.125, 0.0625], [0.03125, 0.015625]]))
    qdq = dataclasses.replace(block, axis=0, block_axis=1).to_qdq()
    assert qdq.scale.shape == (3, 2) and qdq.elem_type == TensorProto.INT4 and qdq.block_size == 32
    lp = got.params["fc3.weight"]
    assert (lp.kind, lp.bitwidth, lp.compressed_bitwidth) == (EncodingKind.LPBQ, 8, 4)
    assert np.array_equal(lp.per_block_int_scale, [[3, 5], [16, 1]])
    assert np.array_equal(lp.block_scale, f32([[3, 5], [16, 1]]) * f32([[0.001], [0.002]]))
    assert got.excluded_layers == [] and got.quantizer_args["quant_scheme"] == "post_training_tf"


# ---------------------------------------------------------------- malformed input

def entry_1_0_0(**changes) -> str:
    entry = {"name": "w", "dtype": "INT", "enc_type": "PER_TENSOR", "bw": 8, "is_sym": True, "scale": [0.5],
             "offset": [-128]}
    entry.update(changes)
    entry = {k: v for k, v in entry.items() if v is not None}
    return json.dumps({"version": "1.0.0", "activation_encodings": [], "param_encodings": [entry]})


def entry_0_6_1(*channels) -> str:
    base = {"bitwidth": 8, "dtype": "int", "is_symmetric": "True", "max": 63.5, "min": -64.0, "offset": -128,
            "scale": 0.5}
    return json.dumps({"version": "0.6.1", "activation_encodings": {},
                       "param_encodings": {"w": [{**base, **c} for c in channels]}})


MALFORMED = [
    ("{not json", "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ("[]", "top level must be a JSON object"),
    ('{"activation_encodings": [], "param_encodings": []}', "unsupported encodings version None"),
    ('{"version": "2.0.0", "encodings": []}', "unsupported encodings version '2.0.0'"),
    ('{"version": "1.0.0", "activation_encodings": []}', "missing 'param_encodings'"),
    ('{"version": "1.0.0", "version": "0.6.1"}', "duplicate key 'version'"),
    (entry_1_0_0(scale=None), "param_encodings 'w': missing scale"),
    (entry_1_0_0(scale=["0.5"]), "param_encodings 'w': scale must be a finite number"),
    (entry_1_0_0().replace("0.5", "1e999"), "param_encodings 'w': scale must be a finite number"),
    (entry_1_0_0().replace("0.5", "Infinity"), "param_encodings 'w': scale must be a finite number"),
    (entry_1_0_0(scale=[-0.5]), "param_encodings 'w': scale must be finite and positive"),
    (entry_1_0_0().replace("0.5", "NaN"), "param_encodings 'w': scale must be a finite number, got nan"),
    (entry_1_0_0(is_sym="True"), "param_encodings 'w': is_sym must be true or false"),
    (entry_1_0_0(bw=8.0), "param_encodings 'w': bitwidth must be an integer in 1..32"),
    (entry_1_0_0(bw=40), "param_encodings 'w': bitwidth must be an integer in 1..32"),
    (entry_1_0_0(offset=[1]), r"param_encodings 'w': offsets must lie in \[-255, 0\]"),
    (entry_1_0_0(offset=[-3.5]), "param_encodings 'w': offset must be an integer"),
    (entry_1_0_0(enc_type="PER_ROW"), "param_encodings 'w': enc_type must be one of"),
    (entry_1_0_0(dtype="int"), "param_encodings 'w': dtype must be 'INT' or 'FLOAT'"),
    (entry_1_0_0(colour="red"), "param_encodings 'w': unknown key"),
    (entry_1_0_0(scale=[0.5, 0.25], offset=[-128, -128]), "PER_TENSOR has one scale, got 2"),
    (entry_1_0_0(zero_point_shift=[0.5]), "zero_point_shift"),
    (entry_1_0_0(enc_type="PER_BLOCK", block_size=32), "does not record the channel count"),
    (entry_1_0_0(enc_type="LPBQ", block_size=32, compressed_bw=4, per_block_int_scale=[17]),
     r"per_block_int_scale must lie in \[1, 16\]"),
    (entry_1_0_0(name=7), r"param_encodings '#0': name must be a string"),
    (entry_0_6_1({}, {"bitwidth": 16}), "param_encodings 'w': every channel must have the same bitwidth"),
    (entry_0_6_1({"is_symmetric": True}), "param_encodings 'w': is_symmetric must be the string 'True' or 'False'"),
    (entry_0_6_1({"min": None}), "param_encodings 'w': min must be a finite number"),
    (entry_0_6_1({"bitwidth": 2, "offset": -2}), "0.6.1 allows bit widths 4..32"),
    (json.dumps({"version": "0.6.1", "activation_encodings": [], "param_encodings": {}}),
     "activation_encodings must be an object"),
]


@pytest.mark.parametrize("text,message", MALFORMED, ids=[message for _, message in MALFORMED])
def test_malformed_files_are_refused(tmp_path, text, message):
    path = tmp_path / "bad.encodings"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as caught:
        read_encodings(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_missing_file_and_duplicate_names(tmp_path):
    with pytest.raises(InputError, match="cannot read encodings file"):
        read_encodings(tmp_path / "absent.encodings")
    entry = json.loads(entry_1_0_0())["param_encodings"][0]
    path = tmp_path / "dup.encodings"
    path.write_text(json.dumps({"version": "1.0.0", "activation_encodings": [], "param_encodings": [entry, entry]}))
    with pytest.raises(InputError, match="param_encodings 'w': duplicate name"):
        read_encodings(path)


@pytest.mark.parametrize("fields,message", [
    ({"bitwidth": 8, "scale": f32([0.1]), "offset": np.array(0)}, "scale shape"),
    ({"bitwidth": 8, "scale": f32(0.1), "offset": np.array(0), "axis": 0}, "per-tensor encoding has no axis"),
    ({"bitwidth": 8, "scale": f32([[0.1]]), "offset": np.array([[0]])}, "needs block_size"),
    ({"bitwidth": 0, "scale": f32(0.1), "offset": np.array(0)}, "bitwidth"),
    ({"bitwidth": 8, "scale": f32(0.0), "offset": np.array(0)}, "finite and positive"),
    ({"bitwidth": 8, "scale": np.float64(1e300), "offset": np.array(0)}, "finite and positive"),
    ({"bitwidth": 8, "scale": f32([0.1, 0.2]), "offset": np.array([-1, -2]), "block_size": 4}, "block_size"),
    ({"dtype": "float", "bitwidth": 16, "symmetric": True}, "only a bitwidth"),
    ({"dtype": "float", "bitwidth": 8}, "bitwidth 16 or 32"),
    ({"bitwidth": 8, "symmetric": False, "scale": f32([0.1]), "offset": np.array([-128]), "block_size": 4,
      "compressed_bitwidth": 4, "per_block_int_scale": np.array([[1, 2]])}, "LPBQ encodings are symmetric"),
])
def test_constructor_refusals(fields, message):
    with pytest.raises(InputError, match=message):
        TensorEncoding(name="t", **fields)


# ---------------------------------------------------------------- ONNX <-> AIMET through onnxruntime

def make_model(nodes, initializers, inputs, outputs) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def aimet_grid(enc: TensorEncoding, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Scale and offset of every element of a tensor, straight from AIMET's per-channel/per-block definition."""
    index = np.indices(shape)
    if enc.kind == EncodingKind.PER_TENSOR:
        pick = ()
    elif enc.kind == EncodingKind.PER_CHANNEL:
        pick = (index[enc.axis],)
    else:
        pick = (index[enc.axis], index[enc.block_axis] // enc.block_size)
    if enc.kind == EncodingKind.LPBQ:
        return enc.block_scale[pick], np.zeros(shape, dtype=np.int64) - 2 ** (enc.compressed_bitwidth - 1)
    return enc.scale[pick], enc.offset[pick]


def aimet_dequantize(enc: TensorEncoding, q_unsigned: np.ndarray) -> np.ndarray:
    """x = (q + offset) * scale in float32, q the unsigned code."""
    scale, offset = aimet_grid(enc, q_unsigned.shape)
    return (q_unsigned + offset).astype(np.float32) * scale


def aimet_quantize_dequantize(enc: TensorEncoding, x: np.ndarray) -> np.ndarray:
    scale, offset = aimet_grid(enc, x.shape)
    top = 2**enc.bitwidth - 1
    q_unsigned = np.clip(np.rint(x / scale) - offset, 0, top)
    return (q_unsigned + offset).astype(np.float32) * scale


LAYOUTS = {  # tensor shape, ONNX axis, block size
    "per_tensor": ((6, 8), None, None),
    "per_channel": ((6, 8), 1, None),
    "blocked": ((8, 6), 0, 4),
}
ONNX_TYPES = {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4, (8, True): TensorProto.INT8,
              (8, False): TensorProto.UINT8, (16, True): TensorProto.INT16, (16, False): TensorProto.UINT16}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_onnx_aimet_equivalence(bits, signed, layout):
    rng = np.random.default_rng(RNG_SEED + bits)
    shape, axis, block_size = LAYOUTS[layout]
    elem_type = ONNX_TYPES[bits, signed]
    np_type = helper.tensor_dtype_to_np_dtype(elem_type)
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    scale_shape = {"per_tensor": (), "per_channel": (shape[1],), "blocked": (shape[0] // 4, shape[1])}[layout]
    scale = (rng.uniform(0.5, 2.0, scale_shape) / 2 ** (bits - 2)).astype(np.float32)
    zero_point = rng.integers(low, high + 1, scale_shape).astype(np_type)

    enc = TensorEncoding.from_qdq("t", scale, zero_point, elem_type, axis, block_size)
    assert enc.symmetric is signed
    back = enc.to_qdq()  # ONNX -> AIMET -> ONNX is exact
    assert back.scale.dtype == np.float32 and np.array_equal(back.scale, scale)
    assert back.zero_point.dtype == np_type and np.array_equal(back.zero_point.astype(np.int64),
                                                               zero_point.astype(np.int64))
    assert (back.elem_type, back.axis, back.block_size) == (elem_type, axis, block_size)
    assert TensorEncoding.from_qdq("t", *back) == enc

    codes = rng.integers(low, high + 1, shape).astype(np_type)
    attributes = {k: v for k, v in (("axis", axis), ("block_size", block_size)) if v is not None}
    initializers = [numpy_helper.from_array(codes, "q"), numpy_helper.from_array(back.scale, "s"),
                    numpy_helper.from_array(back.zero_point, "z")]
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(shape)) for n in ("from_codes", "qdq")]
    model = make_model(
        [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["from_codes"], **attributes),
         helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], **attributes),
         helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["qdq"], **attributes)],
        initializers, [x_info], outputs)
    x = (rng.standard_normal(shape) * scale.max() * 2 ** (bits - 1)).astype(np.float32)
    from_codes, qdq = run(model, {"x": x})
    q_unsigned = codes.astype(np.int64) + (2 ** (bits - 1) if signed else 0)
    np.testing.assert_array_equal(from_codes, aimet_dequantize(enc, q_unsigned))
    np.testing.assert_array_equal(qdq, aimet_quantize_dequantize(enc, x))


@pytest.mark.parametrize("signed_zero_point", [0, 5])
def test_symmetric_means_signed_codes(signed_zero_point):
    enc = TensorEncoding.from_qdq("t", f32(0.5), np.int8(signed_zero_point), TensorProto.INT8)
    assert enc.symmetric and int(enc.offset) == -128 - signed_zero_point
    uint = TensorEncoding.from_qdq("t", f32(0.5), np.uint8(128), TensorProto.UINT8)
    assert not uint.symmetric and int(uint.offset) == -128


def test_lpbq_two_level_dequantize_matches_aimet():
    enc = lpbq()  # 3 channels on axis 0, blocks of 32 along axis 1
    shape = (3, 64)
    two_level = enc.to_lpbq_qdq()
    assert two_level.per_block_int_scale.dtype == np.uint8 and two_level.elem_type == TensorProto.INT4
    codes = np.random.default_rng(RNG_SEED).integers(-8, 8, shape)
    model = make_model(
        [helper.make_node("DequantizeLinear", ["ints", "channel_scale"], ["block_scale"], axis=two_level.channel_axis),
         helper.make_node("DequantizeLinear", ["q", "block_scale", "z"], ["w"], axis=two_level.axis,
                          block_size=two_level.block_size)],
        [numpy_helper.from_array(codes.astype(two_level.zero_point.dtype), "q"),
         numpy_helper.from_array(two_level.per_block_int_scale, "ints"),
         numpy_helper.from_array(two_level.per_channel_scale, "channel_scale"),
         numpy_helper.from_array(two_level.zero_point, "z")],
        [], [helper.make_tensor_value_info("w", TensorProto.FLOAT, list(shape))])
    (w,) = run(model, {})
    np.testing.assert_array_equal(w, aimet_dequantize(enc, codes + 8))
    single = enc.to_qdq()
    assert np.array_equal(single.scale, enc.block_scale) and single.axis == 1 and single.block_size == 32
    assert TensorEncoding.from_lpbq_qdq("lm_head.weight", two_level.per_block_int_scale, two_level.per_channel_scale,
                                        two_level.elem_type, two_level.axis, two_level.block_size) == enc


def test_blocked_layout_of_a_conv_weight():
    enc = dataclasses.replace(int4_per_block(), axis=0, block_axis=1)  # Conv [O=4, I=32, 3, 3], blocks of 16
    qdq = enc.to_qdq(shape=(4, 32, 3, 3))
    assert qdq.scale.shape == (4, 2, 3, 3) and np.all(qdq.scale == enc.scale[:, :, None, None])
    assert TensorEncoding.from_qdq(enc.name, *qdq) == enc
    varying = qdq.scale.copy()
    varying[0, 0, 1, 1] *= 2
    with pytest.raises(InputError, match="cannot express"):
        TensorEncoding.from_qdq(enc.name, varying, qdq.zero_point, qdq.elem_type, qdq.axis, qdq.block_size)
    with pytest.raises(InputError, match="pass the tensor's shape"):
        dataclasses.replace(enc, axis=0, block_axis=2).to_qdq()
    with pytest.raises(InputError, match="do not fit shape"):
        enc.to_qdq(shape=(5, 32, 3, 3))


def test_to_qdq_refusals():
    with pytest.raises(InputError, match="set axis first"):
        without_axes(int4_per_channel()).to_qdq()
    with pytest.raises(InputError, match="no QuantizeLinear form"):
        float16().to_qdq()
    six_bit = TensorEncoding(name="t", bitwidth=6, scale=f32(0.5), offset=np.array(-3))
    with pytest.raises(InputError, match="ONNX has no type for unsigned 6-bit codes"):
        six_bit.to_qdq()
    with pytest.raises(InputError, match="not LPBQ"):
        int4_per_block().to_lpbq_qdq()
    with pytest.raises(InputError, match="zero points must lie in"):
        TensorEncoding.from_qdq("t", f32(0.5), np.array(3), TensorProto.INT32)


# ---------------------------------------------------------------- QDQ models

def qdq_model() -> tuple[onnx.ModelProto, dict[str, dict[str, TensorEncoding]]]:
    """x -> Q/DQ (uint16) -> MatMul(W, int8 per-channel) -> MatMul(W2, int4 blocked) -> MatMul(W3, LPBQ)
    -> If(cond) whose branches dequantize a Constant weight; and the expected encodings."""
    act = TensorEncoding(name="x", bitwidth=16, scale=f32(1 / 4096), offset=np.array(-32768))
    w1 = TensorEncoding.from_qdq("W", f32([0.01, 0.02, 0.03, 0.04]), np.zeros(4, np.int8), TensorProto.INT8, axis=1)
    w2 = dataclasses.replace(int4_per_block(), name="w2_dq")  # [in=32, out=4], blocks of 16 along axis 0
    w3 = dataclasses.replace(lpbq(), name="W3", axis=1, block_axis=0)  # [in=64, out=3]
    w4 = TensorEncoding(name="W4", bitwidth=8, symmetric=True, scale=f32(0.05), offset=np.array(-128))
    rng = np.random.default_rng(RNG_SEED)

    def weight(name, enc, shape):
        qdq = enc.to_qdq(shape)
        codes = rng.integers(-8, 8, shape).astype(qdq.zero_point.dtype)
        return [numpy_helper.from_array(codes, name), numpy_helper.from_array(qdq.scale, f"{name}_scale"),
                numpy_helper.from_array(qdq.zero_point, f"{name}_zp")], qdq

    inits, q1 = weight("W_quantized", w1, (8, 4))
    more, q2 = weight("w2_codes", w2, (4 * 8, 4))
    inits += more
    two = w3.to_lpbq_qdq((64, 3))
    inits += [numpy_helper.from_array(rng.integers(-8, 8, (64, 3)).astype(two.zero_point.dtype), "W3_quantized"),
              numpy_helper.from_array(two.per_block_int_scale, "W3_ints"),
              numpy_helper.from_array(two.per_channel_scale, "W3_channel_scale")]
    a = act.to_qdq()
    inits += [numpy_helper.from_array(a.scale, "x_scale"), numpy_helper.from_array(a.zero_point, "x_zp")]
    w4_qdq = w4.to_qdq()

    def branch(name):
        return helper.make_graph(
            [helper.make_node("Constant", [], ["W4_quantized"],
                              value=numpy_helper.from_array(np.ones((3, 3), np.int8), "W4_quantized")),
             helper.make_node("Constant", [], [f"{name}_s"], value=numpy_helper.from_array(w4_qdq.scale, "s")),
             helper.make_node("DequantizeLinear", ["W4_quantized", f"{name}_s"], [f"{name}_w"]),
             helper.make_node("MatMul", ["h3", f"{name}_w"], [f"{name}_out"])],
            name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [2, 3])])

    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["W_quantized", "W_quantized_scale", "W_quantized_zp"], ["W_dq"], axis=-1),
        helper.make_node("MatMul", ["x_dq", "W_dq"], ["h1"]),
        helper.make_node("Tile", ["h1", "reps"], ["h1_tiled"]),
        helper.make_node("DequantizeLinear", ["w2_codes", "w2_codes_scale", "w2_codes_zp"], ["w2_dq"], axis=0,
                         block_size=16),
        helper.make_node("MatMul", ["h1_tiled", "w2_dq"], ["h2"]),
        helper.make_node("Tile", ["h2", "reps16"], ["h2_tiled"]),
        helper.make_node("DequantizeLinear", ["W3_ints", "W3_channel_scale"], ["W3_block_scale"], axis=1),
        helper.make_node("DequantizeLinear", ["W3_quantized", "W3_block_scale"], ["W3_dq"], axis=0, block_size=32),
        helper.make_node("MatMul", ["h2_tiled", "W3_dq"], ["h3"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch("then"), else_branch=branch("else")),
    ]
    inits += [numpy_helper.from_array(np.array([1, 8], np.int64), "reps"),
              numpy_helper.from_array(np.array([1, 16], np.int64), "reps16")]
    model = make_model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
                                      helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    expected = {"params": {"W": w1, "w2_dq": w2, "W3": w3, "W4": w4}, "activations": {"x": act}}
    return model, expected


def test_encodings_from_qdq_model(tmp_path):
    model, expected = qdq_model()
    (y,) = run(model, {"x": np.ones((2, 8), np.float32), "cond": np.array(True)})
    assert y.shape == (2, 3) and np.all(np.isfinite(y))
    got = encodings_from_qdq_model(model)
    assert got.params == expected["params"]
    assert got.activations == expected["activations"]
    path = tmp_path / "qdq.encodings"
    write_encodings(path, got)
    again = read_encodings(path, block_channels={"w2_dq": 4})
    assert again.params == {name: without_axes(e) for name, e in expected["params"].items()}


def test_qdq_model_conflicts_and_non_constant_scales():
    model, _ = qdq_model()
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(f32(0.5), "other_scale"))
    graph.node.append(helper.make_node("QuantizeLinear", ["x", "other_scale", "x_zp"], ["x_q2"], name="second_q"))
    with pytest.raises(InputError, match="activations 'x': nodes .*'second_q' quantize it differently"):
        encodings_from_qdq_model(model)
    graph.node.pop()
    graph.node.append(helper.make_node("QuantizeLinear", ["h1", "h2", "x_zp"], ["h1_q"], name="dynamic"))
    with pytest.raises(InputError, match="QuantizeLinear 'dynamic': 'h2' is not a constant"):
        encodings_from_qdq_model(model)


def test_encodings_from_onnxruntime_quantize_static(tmp_path):
    """A QDQ model from a real producer: params keyed by the float initializers' names (``*_quantized``
    stripped), activations by the tensors before quantization or the graph output; every encoding reproduces
    the node's inputs."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(RNG_SEED)
    model = make_model(
        [helper.make_node("MatMul", ["x", "fc.weight"], ["mm"]), helper.make_node("Add", ["mm", "fc.bias"], ["y"])],
        [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "fc.weight"),
         numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "fc.bias")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    onnx.save(model, tmp_path / "float.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.samples = iter([{"x": rng.standard_normal((2, 8)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.samples, None)

    quantize_static(tmp_path / "float.onnx", tmp_path / "qdq.onnx", Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt16, weight_type=QuantType.QInt8)
    qdq = onnx.load(tmp_path / "qdq.onnx")
    got = encodings_from_qdq_model(qdq)
    # onnxruntime renames Add's output to y_QuantizeLinear_Input and lets the DequantizeLinear produce y.
    assert set(got.params) == {"fc.weight", "fc.bias"} and set(got.activations) == {"x", "mm", "y"}
    weight = got.params["fc.weight"]
    assert (weight.kind, weight.bitwidth, weight.symmetric, weight.axis) == (EncodingKind.PER_CHANNEL, 8, True, 1)
    initializers = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    for name, enc in [("fc.weight", weight), ("x", got.activations["x"]), ("y", got.activations["y"])]:
        params = enc.to_qdq()
        assert np.array_equal(params.scale, initializers[f"{name}_scale"])
        assert np.array_equal(params.zero_point, initializers[f"{name}_zero_point"])
    write_encodings(tmp_path / "qdq.encodings", got, version="0.6.1")
    assert read_encodings(tmp_path / "qdq.encodings").params["fc.weight"] == without_axes(weight)
