"""CPU inference of exported swinlab models with onnxruntime or OpenVINO, in fp32, bf16 or INT8.

``write_deployable`` turns an fp32 ``.onnx`` graph into the file a runtime and precision run:

=============  =========  ==================================================================================
runtime        precision  written file
=============  =========  ==================================================================================
onnxruntime    fp32       the ``.onnx`` graph (external weights folded in)
onnxruntime    int8       static QDQ ``.onnx`` (``onnxruntime.quantization.quantize_static``), calibrated
openvino       fp32       OpenVINO IR ``.xml`` + ``.bin`` (fp32 weights)
openvino       bf16       the same IR with ``INFERENCE_PRECISION_HINT`` bf16 in its ``runtime_options``
openvino       int8       IR quantized by NNCF post-training quantization (``ModelType.TRANSFORMER``), calibrated
=============  =========  ==================================================================================

``ExportedModel`` loads any of them and runs it on float32 arrays. OpenVINO's CPU plugin runs in bf16 by default
on CPUs with bf16 instructions (``avx512_bf16``, AMX), so every OpenVINO model here is compiled with an explicit
``INFERENCE_PRECISION_HINT``: fp32 is fp32. The CPU plugin of OpenVINO 2026.4 does not apply an IR's
``runtime_options`` ``INFERENCE_PRECISION_HINT`` itself (it applies the KV-cache ones), so ``ExportedModel`` reads
the recorded precision and passes it; a plain ``openvino.Core().compile_model("m.xml")`` runs the CPU's default.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from swinlab.validation import ConfigError

Runtime = Literal["onnxruntime", "openvino"]
Precision = Literal["fp32", "bf16", "int8"]
Batch = np.ndarray | Mapping[str, np.ndarray]

SUFFIXES: dict[str, Runtime] = {".onnx": "onnxruntime", ".xml": "openvino"}
# OpenVINO's names for the floating-point inference precisions. INT8 graphs run their other operations in f32: on
# Swin-T 224 (batch 1, one thread, this repository's avx512_bf16 CPU) bf16 there was no faster (44 ms both).
_OV_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
_PRECISION_KEY = ["runtime_options", "INFERENCE_PRECISION_HINT"]
# Operators the quantizers insert: onnxruntime's QDQ pairs, OpenVINO's FakeQuantize (NNCF, or a QDQ .onnx read).
_QUANTIZED_ONNX_OPS = {"QuantizeLinear", "DequantizeLinear"}
_QUANTIZED_OV_OPS = {"FakeQuantize"}


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def _check_model_file(path: Path) -> Runtime:
    """The runtime a model file's suffix belongs to; a missing file or another suffix is named."""
    if path.suffix not in SUFFIXES:
        raise ConfigError(
            f"{path}: a model file must be an ONNX graph (.onnx) or an OpenVINO IR (.xml next to its .bin), "
            f"not {path.suffix or 'a file without suffix'}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    return SUFFIXES[path.suffix]


def _openvino() -> Any:
    """The ``openvino`` module, or a one-line error saying how to get it."""
    try:
        import openvino
    except ImportError as err:
        raise ConfigError(
            "OpenVINO is not installed: pip install -e '.[export]', or use --runtime onnxruntime"
        ) from err
    return openvino


def _openvino_core() -> Any:
    return _openvino().Core()


def cpu_has_bf16(core: Any | None = None) -> bool:
    """Whether OpenVINO's CPU plugin can run bf16 here (``BF16`` in its ``OPTIMIZATION_CAPABILITIES``)."""
    core = core or _openvino_core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _check_bf16(core: Any) -> None:
    if not cpu_has_bf16(core):
        raise ConfigError(
            "--precision bf16: this CPU has no bf16 instructions (OpenVINO's CPU OPTIMIZATION_CAPABILITIES lists "
            "no BF16; they need avx512_bf16 or AMX), so OpenVINO would emulate it slower than fp32; use --precision "
            "fp32, or int8"
        )


def _onnx_is_quantized(path: Path) -> bool:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(node.op_type in _QUANTIZED_ONNX_OPS for node in graph.node)


def _ov_is_quantized(model: Any) -> bool:
    return any(op.get_type_name() in _QUANTIZED_OV_OPS for op in model.get_ops())


# The sizes a graph serves, recorded by swinlab.deploy.onnx_graph ("H,W"): an .onnx file's metadata, an IR's rt_info.
SIZE_KEYS = ("swinlab.min_size", "swinlab.input_size")


def _onnx_size_records(path: Path) -> dict[str, str]:
    import onnx

    props = onnx.load(str(path), load_external_data=False).metadata_props
    return {p.key: p.value for p in props if p.key in SIZE_KEYS}


def _ir_size_records(model: Any) -> dict[str, str]:
    return {key: model.get_rt_info([key]).astype(str) for key in SIZE_KEYS if model.has_rt_info([key])}


def _record_sizes_in_onnx(path: Path, records: dict[str, str]) -> None:
    """Add ``records`` to the metadata of the (single-file) ONNX graph at ``path``."""
    import onnx

    if not records:
        return
    model = onnx.load(str(path), load_external_data=False)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **records})
    onnx.save_model(model, str(path))


def _recorded_precision(model: Any) -> Precision:
    """The precision an OpenVINO model was written for: int8 when quantized, else its recorded inference hint."""
    if _ov_is_quantized(model):
        return "int8"
    if model.has_rt_info(_PRECISION_KEY) and model.get_rt_info(_PRECISION_KEY).astype(str) == "bf16":
        return "bf16"
    return "fp32"


class ExportedModel:
    """An exported model on the CPU: ``.onnx`` with onnxruntime or OpenVINO, or an OpenVINO IR ``.xml``.

    ``runtime`` defaults to the suffix's (``.onnx``: onnxruntime, ``.xml``: openvino); ``precision`` to the file's
    (int8 when it is quantized; for an IR the precision it was written for; else fp32). A float graph runs in fp32
    or, with OpenVINO, bf16; a quantized graph runs in int8. ``threads``: intra-op threads (default: the
    runtime's choice). ``session``: the onnxruntime ``InferenceSession`` or OpenVINO ``CompiledModel``.
    """

    def __init__(
        self,
        path: str | Path,
        runtime: Runtime | None = None,
        precision: Precision | None = None,
        threads: int | None = None,
    ) -> None:
        self.path = Path(path)
        native = _check_model_file(self.path)
        self.runtime: Runtime = runtime or native
        _check_choice("runtime", self.runtime, get_args(Runtime))
        if precision is not None:
            _check_choice("precision", precision, get_args(Precision))
        if threads is not None and threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        if self.runtime == "onnxruntime" and self.path.suffix != ".onnx":
            raise ConfigError(f"{self.path} is an OpenVINO IR: run it with runtime openvino, or pass the .onnx file")
        self.size_records: dict[str, str] = {}
        if self.path.suffix == ".onnx":
            self.size_records = _onnx_size_records(self.path)
        if self.runtime == "onnxruntime":
            self._load_onnxruntime(precision, threads)
        else:
            self._load_openvino(precision, threads)
        min_size = self.size_records.get("swinlab.min_size")
        #: The smallest (H, W) a graph of any image size serves (None: no such bound recorded).
        self.min_size = tuple(int(side) for side in min_size.split(",")) if min_size else None

    def _resolve(self, quantized: bool, recorded: Precision, requested: Precision | None) -> Precision:
        if quantized and requested not in (None, "int8"):
            raise ConfigError(f"{self.path} is an INT8 (quantized) graph: its precision is int8, not {requested}")
        if not quantized and requested == "int8":
            raise ConfigError(
                f"{self.path} is not quantized: write an INT8 copy first (write_deployable(..., precision='int8'), "
                "export --precision int8) and load that"
            )
        return requested or recorded

    def _load_onnxruntime(self, precision: Precision | None, threads: int | None) -> None:
        import onnxruntime as ort

        quantized = _onnx_is_quantized(self.path)
        self.precision = self._resolve(quantized, "int8" if quantized else "fp32", precision)
        if self.precision == "bf16":
            raise ConfigError("onnxruntime's CPU provider has no bf16 kernels: use --runtime openvino")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: a traced detector's mask loop warns on every run
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.input_shapes = [
            tuple(d if isinstance(d, int) else None for d in i.shape) for i in self.session.get_inputs()
        ]
        self._run = lambda feeds: self.session.run(None, feeds)

    def _load_openvino(self, precision: Precision | None, threads: int | None) -> None:
        core = _openvino_core()
        model = core.read_model(str(self.path))
        self.size_records |= _ir_size_records(model)
        self.precision = self._resolve(_ov_is_quantized(model), _recorded_precision(model), precision)
        if self.precision == "bf16":
            _check_bf16(core)
        # One stream: one caller at a time, all threads on each inference (what onnxruntime and torch do too).
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": _OV_HINTS[self.precision],
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        }
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        self.session = core.compile_model(model, "CPU", config)
        self.input_names = [port.get_any_name() for port in self.session.inputs]
        self.input_shapes = [
            tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
            for port in self.session.inputs
        ]
        request = self.session.create_infer_request()
        # share_outputs False (the default): each call returns its own arrays, not views of the request's buffers.
        self._run = lambda feeds: list(request.infer(feeds).to_tuple())

    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]:
        """``inputs`` in the file's input order (``input_names``; ``input_shapes`` gives each one's dimensions, None
        where any size goes), e.g. images (B, C, H, W), float32 -> the outputs
        in the file's output order (a classifier: [(B, num_classes) logits])."""
        if len(inputs) != len(self.input_names):
            raise ValueError(f"{self.path} takes {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        for name, shape, x in zip(self.input_names, self.input_shapes, inputs):
            if len(shape) != x.ndim or any(d is not None and d != n for d, n in zip(shape, x.shape)):
                wanted = ", ".join("any" if d is None else str(d) for d in shape)
                raise ValueError(
                    f"{self.path} takes {name} of shape ({wanted}), got {tuple(x.shape)}: resize the input, or export "
                    "again for this size (--input_size H W) or for any size (no --input_size)"
                )
            if (
                self.min_size is not None
                and x.ndim == 4
                and (x.shape[2] < self.min_size[0] or x.shape[3] < self.min_size[1])
            ):
                raise ValueError(
                    f"{self.path} serves images of at least {self.min_size[0]}x{self.min_size[1]}, got "
                    f"{x.shape[2]}x{x.shape[3]}: there a stage's map is smaller than its window, which the official "
                    "rule shrinks; export again for this size with --input_size H W"
                )
        feeds = {name: np.ascontiguousarray(x, dtype=np.float32) for name, x in zip(self.input_names, inputs)}
        return [np.asarray(output) for output in self._run(feeds)]

    def __repr__(self) -> str:
        return f"ExportedModel({str(self.path)!r}, runtime={self.runtime!r}, precision={self.precision!r})"


class _BatchReader:
    """onnxruntime's CalibrationDataReader protocol over (B, C, H, W) float32 batches (or name -> array dicts)."""

    def __init__(self, batches: Iterable[Batch], input_name: str) -> None:
        self.batches = iter(batches)
        self.input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        if batch is None:
            return None
        return dict(batch) if isinstance(batch, Mapping) else {self.input_name: batch}


def _onnx_input_name(path: Path) -> str:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    return next(i.name for i in graph.input if i.name not in weights)


def quantize_int8(fp32_path: str | Path, output: str | Path, calibration: Iterable[Batch]) -> None:
    """INT8 copy of an exported fp32 model: static QDQ (per-channel 7-bit weights, uint8 activations, min/max
    ranges seen on the ``calibration`` batches)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        # Shape inference and graph fusions first, as onnxruntime recommends before quantizing.
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(fp32_path), str(prepared))
        except Exception as err:  # onnxruntime raises a bare Exception where its symbolic shape inference gives up
            if "symbolic shape inference" not in str(err):
                raise
            # A segmenter's graph of any size defeats it (its resizes to the input size); ONNX's own shape
            # inference and the fusions still run.
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            prepared,
            output,
            _BatchReader(calibration, _onnx_input_name(prepared)),
            quant_format=QuantFormat.QDQ,
            # onnxruntime's CPU kernels run these in int8; a LayerNorm or Softmax between QDQ pairs would run
            # in fp32 anyway, paying only the extra rounding.
            op_types_to_quantize=["MatMul", "Gemm", "Conv"],
            per_channel=True,
            # 7-bit weights: on CPUs without VNNI the u8 x s8 kernels sum pairs of products in int16, which
            # 8-bit weights can saturate (onnxruntime's quantization docs).
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )


def _calibration_list(calibration: Iterable[Batch] | None, what: str) -> list[Batch]:
    batches = list(calibration) if calibration is not None else []
    if not batches:
        raise ConfigError(f"{what} is calibrated on sample inputs: pass at least one calibration batch")
    return batches


def write_deployable(
    onnx_path: str | Path,
    output: str | Path,
    runtime: Runtime,
    precision: Precision,
    calibration: Iterable[Batch] | None = None,
) -> dict[str, Any]:
    """Write the fp32 graph ``onnx_path`` as the file ``runtime`` runs in ``precision`` (see the module's table).

    ``calibration``: INT8 only, the inputs whose activation ranges set the quantization scales: (B, C, H, W)
    float32 batches for a single-input model, or input name -> array dicts. Returns what was written:
    ``output``, ``runtime``, ``precision`` and, for INT8, ``calibration_batches`` and ``quantized_ops``.
    """
    onnx_path, output = Path(onnx_path), Path(output)
    _check_choice("runtime", runtime, get_args(Runtime))
    _check_choice("precision", precision, get_args(Precision))
    if _check_model_file(onnx_path) != "onnxruntime":
        raise ConfigError(f"{onnx_path}: write_deployable converts an fp32 ONNX graph (.onnx), not an IR")
    suffix = {"onnxruntime": ".onnx", "openvino": ".xml"}[runtime]
    if output.suffix != suffix:
        raise ConfigError(
            f"--output {output}: runtime {runtime} writes a {suffix} file, e.g. {output.with_suffix(suffix)}"
        )
    if runtime == "onnxruntime" and precision == "bf16":
        raise ConfigError("onnxruntime's CPU provider has no bf16 kernels: use --runtime openvino")
    output.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"output": str(output), "runtime": runtime, "precision": precision}
    sizes = _onnx_size_records(onnx_path)
    if runtime == "onnxruntime":
        if precision == "fp32":
            _save_onnx(onnx_path, output)
        else:
            batches = _calibration_list(calibration, "onnxruntime INT8 (static QDQ)")
            quantize_int8(onnx_path, output, batches)
            _record_sizes_in_onnx(output, sizes)  # the quantizer writes a new graph without them
            report["calibration_batches"] = len(batches)
            report["quantized_ops"] = _count_onnx_ops(output, {"QuantizeLinear"})
        return report

    ov = _openvino()

    if precision == "bf16":
        _check_bf16(_openvino_core())
    model = ov.convert_model(str(onnx_path))
    if precision == "int8":
        import nncf

        batches = _calibration_list(calibration, "OpenVINO INT8 (NNCF)")
        try:
            # TRANSFORMER: NNCF's scheme for attention models (keeps e.g. LayerNorm/Softmax inputs in float).
            quantized = nncf.quantize(
                model, nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(batches)
            )
            report["nncf_model_type"] = "transformer"
        except nncf.InternalError as err:
            # UperNet's concatenations: the TRANSFORMER scheme asks one scale of inputs it quantizes differently
            # ("QConfigs for unified scale group ... are not equal"); the default scheme quantizes them alike.
            if "unified scale group" not in str(err):
                raise
            quantized = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches))
            report["nncf_model_type"] = "default"
        model = quantized
        report["calibration_batches"] = len(batches)
        report["quantized_ops"] = sum(op.get_type_name() in _QUANTIZED_OV_OPS for op in model.get_ops())
    model.set_rt_info(_OV_HINTS[precision], _PRECISION_KEY)
    for key, value in sizes.items():
        model.set_rt_info(value, [key])
    # compress_to_fp16=False: fp16 weights would round fp32 ones; bf16 inference converts them when compiling.
    ov.save_model(model, str(output), compress_to_fp16=False)
    return report


def _save_onnx(source: Path, output: Path) -> None:
    """Copy an ONNX graph as one file: weights the exporter wrote beside it (``.onnx.data``) are folded in."""
    import onnx

    if source.resolve() == output.resolve():
        return
    model = onnx.load(str(source))
    # Past protobuf's 2 GiB limit the weights must stay in a file of their own.
    large = model.ByteSize() > 2**31 - 1
    onnx.save_model(model, str(output), save_as_external_data=large, location=f"{output.name}.data")


def _count_onnx_ops(path: Path, ops: set[str]) -> int:
    import onnx

    return sum(node.op_type in ops for node in onnx.load(str(path), load_external_data=False).graph.node)


def fastest_runtime(
    onnx_path: str | Path, example: np.ndarray, threads: int | None = None, runs: int = 5
) -> tuple[Runtime, dict[str, float]]:
    """Times the fp32 graph ``onnx_path`` on ``example`` (B, C, H, W) with onnxruntime and OpenVINO (fp32), one
    warm-up then ``runs`` inferences of each in alternation; returns the faster runtime and each one's median
    seconds per inference."""
    models = {runtime: ExportedModel(onnx_path, runtime, "fp32", threads) for runtime in get_args(Runtime)}
    times: dict[str, list[float]] = {runtime: [] for runtime in models}
    for model in models.values():
        model(example)
    for _ in range(runs):
        for runtime, model in models.items():
            start = time.perf_counter()
            model(example)
            times[runtime].append(time.perf_counter() - start)
    medians = {runtime: statistics.median(seconds) for runtime, seconds in times.items()}
    return min(medians, key=medians.get), medians
