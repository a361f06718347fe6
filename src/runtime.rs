//! ONNX Runtime: loading the shared library (provisioned, --ort-lib, ORT_DYLIB_PATH), the one process-wide Environment, execution providers and session construction.
