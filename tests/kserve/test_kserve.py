"""`elite-ort serve` through the official Triton HTTP client (KServe Open Inference Protocol v2).

Runs after `cargo test` in scripts/test, against the binary cargo built: it starts the server
on the tiny bundle on an ephemeral loopback port, waits for its readiness line, and checks the
health, metadata and infer routes with binary and JSON tensors. Images must equal the CLI's for
the same settings (both run the same engine; measured identical, allowed one uint8 level).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as http
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "tests/golden/images"
MODEL = "elite-tiny"
PROMPT = "a photo of S"
SETTINGS = {"steps": 2, "height": 64, "width": 64, "seed": 42, "lambda": 0.8}


def binary() -> Path:
    meta = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--no-deps"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    path = Path(json.loads(meta.stdout)["target_directory"]) / "debug" / "elite-ort"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: run `cargo test` (or `cargo build`) first")
    return path


def cache_env() -> dict[str, str]:
    env = dict(os.environ)
    env["ELITE_ORT_CACHE_DIR"] = str(ROOT / "target" / "kserve-test-cache")
    env["RUST_LOG"] = "warn"
    return env


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """The server's `host:port`, ready."""
    with tempfile.TemporaryDirectory() as store:
        proc = subprocess.Popen(
            [str(binary()), "serve", "--bundle", str(ROOT / "onnx/tiny")]
            + ["--listen", "127.0.0.1:0", "--concept-dir", store],
            stdout=subprocess.PIPE,
            text=True,
            env=cache_env(),
        )
        assert proc.stdout is not None
        address = ""
        for line in proc.stdout:  # ends when the process does: bounded
            if line.startswith("listening on http://"):
                address = line.strip().removeprefix("listening on http://")
            if line.startswith("ready after"):
                break
        assert address, "the server did not announce its address"
        try:
            yield address
        finally:
            proc.terminate()
            assert proc.wait(timeout=120) == 0, "exit status after SIGTERM"


def cli_image(out: Path) -> np.ndarray:
    """The CLI's image for PROMPT / chelsea + mask / SETTINGS."""
    args = [str(binary()), "run", "--quiet", "--bundle", str(ROOT / "onnx/tiny")]
    args += ["--image", str(IMAGES / "chelsea.png"), "--mask", str(IMAGES / "chelsea_mask.png")]
    args += ["--prompt", PROMPT, "--out", str(out)]
    for key, value in SETTINGS.items():
        args += [f"--{key}", str(value)]
    subprocess.run(args, check=True, env=cache_env())
    with Image.open(out) as img:
        return np.asarray(img.convert("RGB"))


def bytes_input(name: str, value: bytes, binary_data: bool = True) -> http.InferInput:
    tensor = http.InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([value], dtype=np.object_), binary_data=binary_data)
    return tensor


def test_health_and_metadata(server: str) -> None:
    client = http.InferenceServerClient(server)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.get_server_metadata()["name"] == "elite-ort"
    assert client.is_model_ready(MODEL)
    meta = client.get_model_metadata(MODEL)
    assert [i["name"] for i in meta["inputs"]] == ["prompt", "image", "mask", "concept"]
    assert meta["outputs"][0]["datatype"] == "UINT8"
    assert not client.is_model_ready("no-such-model")


def test_infer_with_binary_tensors_gives_the_cli_image(server: str, tmp_path: Path) -> None:
    client = http.InferenceServerClient(server, network_timeout=300.0)
    inputs = [
        bytes_input("prompt", PROMPT.encode()),
        bytes_input("image", (IMAGES / "chelsea.png").read_bytes()),
        bytes_input("mask", (IMAGES / "chelsea_mask.png").read_bytes()),
    ]
    outputs = [http.InferRequestedOutput("image", binary_data=True)]
    result = client.infer(MODEL, inputs, outputs=outputs, parameters=SETTINGS)
    pixels = result.as_numpy("image")
    assert pixels is not None and pixels.dtype == np.uint8
    assert pixels.shape == (1, 64, 64, 3)
    want = cli_image(tmp_path / "cli.png")
    diff = np.abs(pixels[0].astype(int) - want.astype(int)).max()
    print(f"OIP v2 binary vs CLI: max level difference {diff}")
    assert diff <= 1


def test_infer_with_json_tensors_and_a_stored_concept(server: str, tmp_path: Path) -> None:
    body = json.dumps(
        {
            "image": base64.b64encode((IMAGES / "chelsea.png").read_bytes()).decode(),
            "mask": base64.b64encode((IMAGES / "chelsea_mask.png").read_bytes()).decode(),
        }
    ).encode()
    request = urllib.request.Request(
        f"http://{server}/v1/concepts", data=body, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        concept = json.load(response)["id"]
    client = http.InferenceServerClient(server, network_timeout=300.0)
    inputs = [
        bytes_input("prompt", PROMPT.encode(), binary_data=False),
        bytes_input("concept", concept.encode(), binary_data=False),
    ]
    outputs = [http.InferRequestedOutput("image", binary_data=False)]
    result = client.infer(MODEL, inputs, outputs=outputs, parameters=SETTINGS)
    pixels = result.as_numpy("image")
    assert pixels is not None and pixels.shape == (1, 64, 64, 3)
    want = cli_image(tmp_path / "cli.png")
    assert np.abs(pixels[0].astype(int) - want.astype(int)).max() <= 1


def test_bad_inputs_are_named(server: str) -> None:
    client = http.InferenceServerClient(server)
    with pytest.raises(Exception, match="inputs") as error:
        client.infer(MODEL, [bytes_input("prompt", PROMPT.encode())], parameters=SETTINGS)
    print(error.value)
    with pytest.raises(Exception, match="steps"):
        client.infer(
            MODEL,
            [bytes_input("prompt", PROMPT.encode()), bytes_input("concept", b"0" * 64)],
            parameters={"steps": 0},
        )
