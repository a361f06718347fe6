//! One IO descriptor per ONNX graph (names, element types, ranks) from DESIGN.md, and the check of a loaded session against it.
