//! `elite-ort serve` on loopback: concurrent clients get exactly the CLI's images while their
//! rows share UNet calls; cancellation, overload, deadlines, authentication, malformed input,
//! the concept store and draining. Every loop is bounded in count and time, and every wait is
//! for an event (the server's readiness line, a response, an SSE event), not a sleep.

mod cpu_bf16;
mod server_support;

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use cpu_bf16::{bf16_here, Bf16Here};
use serde_json::{json, Value};
use server_support::{
    client, elite, fresh_client, golden_image, metric, read_events, root, Server,
};

/// One server at a time: the machine has two cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn b64(path: &Path) -> String {
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap())
}

fn png_pixels(bytes: &[u8]) -> image::RgbImage {
    image::load_from_memory(bytes).expect("a PNG").to_rgb8()
}

fn max_level_diff(a: &image::RgbImage, b: &image::RgbImage) -> i32 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| (i32::from(*x) - i32::from(*y)).abs())
        .max()
        .unwrap_or(0)
}

/// Uploads chelsea with its mask; returns the concept id.
fn upload_chelsea(server: &Server) -> String {
    let form = reqwest::blocking::multipart::Form::new()
        .file("image", golden_image("chelsea.png"))
        .unwrap()
        .file("mask", golden_image("chelsea_mask.png"))
        .unwrap();
    let r = client()
        .post(server.url("/v1/concepts"))
        .multipart(form)
        .send()
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    r.json::<Value>().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The settings of one client thread; `stored` uses the uploaded chelsea concept, otherwise
/// the request carries coffee (with its mask) inline.
#[derive(Clone)]
struct Setting {
    height: usize,
    width: usize,
    steps: usize,
    lambda: f32,
    guidance: f32,
    seed: u64,
    stored: bool,
}

const PROMPT: &str = "a photo of S";

fn settings() -> Vec<Setting> {
    let s = |height, width, steps, lambda, guidance, seed, stored| Setting {
        height,
        width,
        steps,
        lambda,
        guidance,
        seed,
        stored,
    };
    vec![
        s(64, 64, 2, 0.8, 5.0, 1, true),
        s(64, 64, 3, 0.0, 5.0, 2, true),
        s(128, 64, 2, 0.6, 7.5, 3, false),
        s(64, 128, 4, 0.8, 5.0, 4, false),
        s(64, 64, 2, 0.8, 3.0, 5, true),
        s(128, 128, 2, 0.8, 5.0, 6, true),
        s(64, 64, 3, 0.6, 5.0, 7, false),
        s(64, 64, 2, 0.8, 5.0, 8, true),
    ]
}

/// The CLI's image for a setting.
fn cli_image(s: &Setting, dir: &Path, i: usize) -> image::RgbImage {
    let out = dir.join(format!("cli-{i}.png"));
    let (image, mask) = if s.stored {
        ("chelsea.png", "chelsea_mask.png")
    } else {
        ("coffee.png", "coffee_mask.png")
    };
    let status = elite()
        .args(["run", "--quiet", "--bundle"])
        .arg(root().join("onnx/tiny"))
        .arg("--image")
        .arg(golden_image(image))
        .arg("--mask")
        .arg(golden_image(mask))
        .args(["--prompt", PROMPT])
        .args(["--steps", &s.steps.to_string()])
        .args([
            "--height",
            &s.height.to_string(),
            "--width",
            &s.width.to_string(),
        ])
        .args(["--lambda", &s.lambda.to_string()])
        .args(["--guidance", &s.guidance.to_string()])
        .args(["--seed", &s.seed.to_string()])
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    image::open(&out).unwrap().to_rgb8()
}

#[test]
fn concurrent_clients_get_the_cli_images_and_share_unet_calls() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("concepts"),
        &["--max-batch", "8", "--call-sizing", "fixed"],
    );
    let chelsea = upload_chelsea(&server);
    let coffee = (
        b64(&golden_image("coffee.png")),
        b64(&golden_image("coffee_mask.png")),
    );
    let settings = settings();
    let results: Vec<Vec<Vec<u8>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = settings
            .iter()
            .map(|s| {
                let (server, chelsea, coffee) = (&server, &chelsea, &coffee);
                scope.spawn(move || {
                    let http = client();
                    let mut body = json!({
                        "prompt": PROMPT, "steps": s.steps, "height": s.height,
                        "width": s.width, "lambda": s.lambda, "guidance": s.guidance,
                        "seed": s.seed,
                    });
                    if s.stored {
                        body["concept"] = json!(chelsea);
                    } else {
                        body["image"] = json!(coffee.0);
                        body["mask"] = json!(coffee.1);
                    }
                    (0..4)
                        .map(|_| {
                            let r = http
                                .post(server.url("/v1/generate"))
                                .header("accept", "image/png")
                                .json(&body)
                                .send()
                                .unwrap();
                            assert_eq!(r.status(), 200, "{}", r.text().unwrap_or_default());
                            assert_eq!(r.headers()["content-type"], "image/png");
                            r.bytes().unwrap().to_vec()
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let metrics = client()
        .get(server.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let calls = metric(&metrics, "elite_unet_batch_rows_count");
    let small = metric(&metrics, "elite_unet_batch_rows_bucket{le=\"2\"}");
    println!("UNet calls: {calls}, of which {small} with at most 2 rows");
    assert!(calls > small, "no UNet call held more than one job's rows");
    assert_eq!(metric(&metrics, "elite_jobs_total{outcome=\"done\"}"), 32.0);
    drop(server);

    for (i, (s, pngs)) in settings.iter().zip(&results).enumerate() {
        let want = cli_image(s, dir.path(), i);
        for png in pngs {
            let got = png_pixels(png);
            let d = max_level_diff(&got, &want);
            assert!(d <= 1, "setting {i}: {d} levels from the CLI's image");
        }
    }
}

/// Posts a streaming generation and reads until its first `step` event.
fn stream_until_step(
    server: &Server,
    concept: &str,
    steps: usize,
) -> std::io::BufReader<reqwest::blocking::Response> {
    let r = fresh_client()
        .post(server.url("/v1/generate"))
        .json(&json!({
            "prompt": PROMPT, "concept": concept, "steps": steps,
            "height": 64, "width": 64, "stream": true,
        }))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let (events, reader) = read_events(r, |event, _| event == "step");
    assert_eq!(
        events.last().map(|e| e.0.as_str()),
        Some("step"),
        "{events:?}"
    );
    reader
}

/// Polls the metrics (each poll a response; bounded) until `sample` reaches `value`.
fn wait_for_metric(server: &Server, sample: &str, value: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = client()
            .get(server.url("/metrics"))
            .send()
            .unwrap()
            .text()
            .unwrap();
        if metric(&text, sample) >= value {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{sample} never reached {value}:\n{text}"
        );
    }
}

#[test]
fn a_client_that_disconnects_cancels_its_job_and_the_next_request_is_served() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("concepts"), &[]);
    let concept = upload_chelsea(&server);
    let stream = stream_until_step(&server, &concept, 1000);
    drop(stream); // the connection closes mid-run
    let text = wait_for_metric(&server, "elite_jobs_total{outcome=\"cancelled\"}", 1.0);
    assert_eq!(metric(&text, "elite_jobs_total{outcome=\"done\"}"), 0.0);
    let r = client()
        .post(server.url("/v1/generate"))
        .json(&json!({"prompt": PROMPT, "concept": concept, "steps": 2, "height": 64, "width": 64}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = client()
        .get(server.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert_eq!(
        metric(&text, "elite_active_rows"),
        0.0,
        "the cancelled rows were freed"
    );
    assert_eq!(metric(&text, "elite_active_jobs"), 0.0);
}

#[test]
fn a_full_queue_answers_429_and_a_deadline_504() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("concepts"),
        &["--queue", "1", "--request-timeout", "2"],
    );
    let concept = upload_chelsea(&server);
    // The queue's one place is taken by a long run (cancelled by its 2 s deadline).
    let body =
        json!({"prompt": PROMPT, "concept": concept, "steps": 1000, "height": 128, "width": 128});
    let stream = stream_until_step(&server, &concept, 1000);
    let r = client()
        .post(server.url("/v1/generate"))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let e: Value = r.json().unwrap();
    assert!(
        e["error"].as_str().unwrap().contains("queue is full"),
        "{e}"
    );
    drop(stream);
    // Once the place is free, a long run ends at its deadline: 504, and the job is cancelled.
    let deadline = Instant::now() + Duration::from_secs(60);
    let r = loop {
        let r = client()
            .post(server.url("/v1/generate"))
            .json(&body)
            .send()
            .unwrap();
        if r.status() != 429 || Instant::now() > deadline {
            break r;
        }
    };
    assert_eq!(r.status(), 504, "{}", r.text().unwrap_or_default());
    wait_for_metric(&server, "elite_jobs_total{outcome=\"cancelled\"}", 2.0);
}

#[test]
fn every_route_but_health_needs_the_token() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").unwrap();
    let server = Server::start(
        &dir.path().join("concepts"),
        &["--auth-token-file", token.to_str().unwrap()],
    );
    let http = client();
    for path in ["/v2/health/live", "/v2/health/ready"] {
        assert_eq!(
            http.get(server.url(path)).send().unwrap().status(),
            200,
            "{path}"
        );
    }
    for header in [
        None,
        Some("Bearer wrong"),
        Some("0123456789abcdef0123456789abcdef"),
    ] {
        let mut req = http.get(server.url("/v2"));
        if let Some(h) = header {
            req = req.header("authorization", h);
        }
        let r = req.send().unwrap();
        assert_eq!(r.status(), 401, "{header:?}");
        let e: Value = r.json().unwrap();
        assert!(e["error"].as_str().unwrap().contains("bearer token"), "{e}");
    }
    let ok = http
        .get(server.url("/metrics"))
        .header("authorization", "Bearer 0123456789abcdef0123456789abcdef")
        .send()
        .unwrap();
    assert_eq!(ok.status(), 200);
}

/// Sends a raw JSON body to /v1/generate and returns (status, error JSON).
fn post_raw(server: &Server, body: &str) -> (u16, Value) {
    let r = client()
        .post(server.url("/v1/generate"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

#[test]
fn malformed_requests_get_4xx_json_naming_the_field_and_the_server_goes_on() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("concepts"),
        &["--max-body-bytes", "1000000"],
    );
    let concept = upload_chelsea(&server);
    let cases: Vec<(String, u16, &str)> = vec![
        ("{not json".into(), 400, "body"),
        (r#"{"concept": "x"}"#.into(), 400, "prompt"),
        (
            json!({"prompt": 7, "concept": concept}).to_string(),
            400,
            "prompt",
        ),
        (
            json!({"prompt": PROMPT, "concept": concept, "steps": "many"}).to_string(),
            400,
            "steps",
        ),
        (
            json!({"prompt": PROMPT, "concept": concept, "colour": 1}).to_string(),
            400,
            "colour",
        ),
        (
            json!({"prompt": PROMPT, "concept": concept, "steps": 0}).to_string(),
            422,
            "steps",
        ),
        (
            json!({"prompt": PROMPT, "concept": concept, "height": 100}).to_string(),
            422,
            "height",
        ),
        (
            json!({"prompt": PROMPT, "concept": concept, "n": 0}).to_string(),
            422,
            "n",
        ),
        (
            json!({"prompt": "no placeholder", "concept": concept}).to_string(),
            422,
            "prompt",
        ),
        (
            json!({"prompt": PROMPT, "image": "%%%not base64"}).to_string(),
            400,
            "image",
        ),
        (
            json!({"prompt": PROMPT, "concept": "0".repeat(64)}).to_string(),
            404,
            "concept",
        ),
        (
            json!({"prompt": PROMPT, "concept": "../../etc/passwd"}).to_string(),
            400,
            "concept",
        ),
        (json!({"prompt": PROMPT}).to_string(), 400, "concept"),
        (
            json!({"prompt": PROMPT, "image": "x".repeat(2_000_000)}).to_string(),
            413,
            "body",
        ),
    ];
    for (body, status, field) in &cases {
        let (got, e) = post_raw(&server, body);
        let shown: String = body.chars().take(80).collect();
        assert_eq!(got, *status, "{shown}: {e}");
        assert_eq!(e["field"].as_str(), Some(*field), "{shown}: {e}");
        assert!(
            e["error"].as_str().is_some_and(|m| !m.is_empty()),
            "{shown}: {e}"
        );
    }
    // An image bomb: a PNG header declaring 100000² pixels, refused before decoding.
    let bomb = png_claiming(100_000, 100_000);
    let b = base64::engine::general_purpose::STANDARD.encode(&bomb);
    let (got, e) = post_raw(&server, &json!({"prompt": PROMPT, "image": b}).to_string());
    assert_eq!(got, 422, "{e}");
    assert_eq!(e["field"].as_str(), Some("image"), "{e}");
    assert!(e["error"].as_str().unwrap().contains("pixels"), "{e}");
    // Path-like ids in the URL.
    for path in ["/v1/concepts/..%2F..%2Fetc", "/v1/concepts/ABC"] {
        let r = client().get(server.url(path)).send().unwrap();
        assert_eq!(r.status(), 400, "{path}");
    }
    // The server still answers.
    let (got, _) = post_raw(
        &server,
        &json!({"prompt": PROMPT, "concept": concept, "steps": 1, "height": 64, "width": 64})
            .to_string(),
    );
    assert_eq!(got, 200);
}

/// A small PNG whose IHDR declares `width × height`: a header, one short IDAT, IEND.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [
        (&b"IHDR"[..], ihdr),
        (
            &b"IDAT"[..],
            vec![0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
        ),
        (&b"IEND"[..], Vec::new()),
    ] {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut chunk = kind.to_vec();
        chunk.extend_from_slice(&data);
        png.extend_from_slice(&chunk);
        png.extend_from_slice(&crc32(&chunk).to_be_bytes());
    }
    png
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn the_concept_store_is_content_addressed_and_survives_kill_9() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("concepts");
    let mut server = Server::start(&store, &[]);
    // Concurrent uploads of one image: one id, one file.
    let ids: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| upload_chelsea(&server)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(ids.iter().all(|id| id == &ids[0]), "{ids:?}");
    let files = |dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(files(&store), vec![format!("{}.safetensors", ids[0])]);
    // An `encode`d concept file uploaded as such is stored too.
    let encoded = dir.path().join("coffee.safetensors");
    let status = elite()
        .args(["encode", "--quiet", "--bundle"])
        .arg(root().join("onnx/tiny"))
        .arg("--image")
        .arg(golden_image("coffee.png"))
        .arg("--out")
        .arg(&encoded)
        .status()
        .unwrap();
    assert!(status.success());
    let form = reqwest::blocking::multipart::Form::new()
        .file("concept", &encoded)
        .unwrap();
    let r = client()
        .post(server.url("/v1/concepts"))
        .multipart(form)
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    let file_id = r.json::<Value>().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let meta: Value = client()
        .get(server.url(&format!("/v1/concepts/{file_id}")))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(meta["image"], "coffee.png", "{meta}");

    // SIGKILL, with a temporary of a dead process in the store as a killed upload leaves it.
    server.signal(libc::SIGKILL);
    server.wait();
    std::fs::write(store.join(".elite-4194305-0.tmp"), b"half a concept").unwrap();
    let server = Server::start(&store, &[]);
    assert!(
        !files(&store).iter().any(|n| n.ends_with(".tmp")),
        "temporaries of dead processes are removed at start: {:?}",
        files(&store)
    );
    for id in [&ids[0], &file_id] {
        let r = client()
            .get(server.url(&format!("/v1/concepts/{id}")))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{id}");
    }
    let r = client()
        .delete(server.url(&format!("/v1/concepts/{file_id}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = client()
        .get(server.url(&format!("/v1/concepts/{file_id}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[test]
fn sigterm_drains_in_flight_jobs_and_exits_0() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("concepts"), &[]);
    let concept = upload_chelsea(&server);
    let streams: Vec<_> = (0..3)
        .map(|_| {
            fresh_client()
                .post(server.url("/v1/generate"))
                .json(&json!({
                    "prompt": PROMPT, "concept": concept, "steps": 30,
                    "height": 64, "width": 64, "stream": true,
                }))
                .send()
                .unwrap()
        })
        .map(|r| read_events(r, |event, _| event == "step"))
        .collect();
    server.signal(libc::SIGTERM);
    for (seen, mut reader) in streams {
        assert_eq!(seen.last().map(|e| e.0.as_str()), Some("step"));
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut reader, &mut rest).unwrap();
        assert!(
            rest.contains("event: done"),
            "a drained job did not finish: {rest}"
        );
    }
    // New requests are refused while draining (or find the port closed once it stopped).
    if let Ok(r) = client().get(server.url("/v2")).send() {
        assert_eq!(r.status(), 503);
    }
    assert_eq!(server.wait(), Some(0), "exit status after a drain");
}

/// `elite-ort run` on chelsea and its mask with the settings these tests send the server (4
/// steps, 128 × 192, seed 7), writing `out`, plus `extra` arguments.
fn cli_chelsea(out: &Path, extra: &[&OsStr]) -> std::process::ExitStatus {
    elite()
        .args(["run", "--quiet", "--bundle"])
        .arg(root().join("onnx/tiny"))
        .arg("--image")
        .arg(golden_image("chelsea.png"))
        .arg("--mask")
        .arg(golden_image("chelsea_mask.png"))
        .args(["--prompt", PROMPT, "--steps", "4", "--height", "128"])
        .args(["--width", "192", "--seed", "7", "--out"])
        .arg(out)
        .args(extra)
        .status()
        .unwrap()
}

#[test]
fn attention_maps_come_back_as_the_cli_writes_them() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("concepts"), &[]);
    let chelsea = upload_chelsea(&server);
    let body = json!({
        "prompt": PROMPT, "concept": chelsea, "steps": 4, "height": 128, "width": 192,
        "seed": 7, "attention_maps": true, "attention_steps": "2..3",
    });
    let r = client()
        .post(server.url("/v1/generate"))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let result: Value = r.json().unwrap();
    // The rules, each answered 400 naming its field, before anything is queued.
    let refused = [
        (json!({"attention_steps": "2..3"}), 400, "attention_steps"),
        (
            json!({"attention_maps": true, "attention_steps": "two"}),
            400,
            "attention_steps",
        ),
        (
            json!({"attention_maps": true, "attention_steps": "5..9"}),
            422,
            "attention_steps",
        ),
        (json!({"attention_maps": "yes"}), 400, "attention_maps"),
    ];
    for (extra, want, field) in refused {
        let mut bad = json!({"prompt": PROMPT, "concept": chelsea, "steps": 4});
        for (k, v) in extra.as_object().unwrap() {
            bad[k] = v.clone();
        }
        let (status, err) = post_raw(&server, &bad.to_string());
        assert_eq!(
            (status, err["field"].as_str()),
            (want, Some(field)),
            "{bad}: {err}"
        );
    }
    let png_only = client()
        .post(server.url("/v1/generate"))
        .header("accept", "image/png")
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(png_only.status(), 400);
    drop(server);

    // The CLI with the same settings, on the same concept's image and mask.
    let out = dir.path().join("cli.png");
    let maps_dir = dir.path().join("maps");
    std::fs::create_dir(&maps_dir).unwrap();
    let status = cli_chelsea(
        &out,
        &[
            OsStr::new("--attention-maps"),
            maps_dir.as_os_str(),
            OsStr::new("--attention-steps"),
            OsStr::new("2..3"),
        ],
    );
    assert!(status.success());
    let decode = |v: &Value| {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64 text"))
            .unwrap();
        png_pixels(&bytes)
    };
    let maps = &result["attention_maps"][0];
    assert_eq!(maps["steps"], json!([2, 3]));
    let tokens = maps["tokens"].as_array().unwrap();
    // <start> a photo of s <end>
    assert_eq!(tokens.len(), 6, "{:?}", tokens.iter().map(|t| &t["token"]));
    let mut pictures = vec![
        (
            decode(&maps["placeholder"]),
            "cli-placeholder.png".to_string(),
        ),
        (decode(&maps["sheet"]), "cli-sheet.png".to_string()),
    ];
    let mut names: Vec<String> = std::fs::read_dir(&maps_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for t in tokens {
        let index = t["index"].as_u64().unwrap() as usize;
        let prefix = format!("cli-{index:02}-");
        let name = names
            .iter()
            .find(|n| n.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no CLI picture {prefix}* in {names:?}"));
        pictures.push((decode(&t["png"]), name.clone()));
    }
    assert_eq!(names.len(), pictures.len(), "{names:?}");
    for (got, name) in pictures {
        let want = image::open(maps_dir.join(&name)).unwrap().to_rgb8();
        // Alone on the server as in the CLI: the same UNet calls, so the same pictures.
        assert_eq!(max_level_diff(&got, &want), 0, "{name}");
    }
    let image = decode(&result["images"][0]);
    assert_eq!(
        max_level_diff(&image, &image::open(&out).unwrap().to_rgb8()),
        0
    );
}

/// `--precision bf16` in the server: the UNet and decoder through OpenVINO give the CLI's bf16
/// image for the same settings (within a level; both run the same graphs at the same batch).
#[test]
fn bf16_serves_the_cli_bf16_image() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    if let Bf16Here::Refused(why) = bf16_here() {
        // Refused at start, before readiness, with the reason (tests/precision.rs checks the
        // engine's message; this checks that the server exits with it rather than serving).
        let (status, stderr) =
            Server::fails_to_start(&dir.path().join("concepts"), &["--precision", "bf16"]);
        assert!(
            !status.success() && stderr.contains(why),
            "{status}: {stderr}"
        );
        println!("bf16 is not available on this CPU ({why}): checked the refusal only");
        return;
    }
    let server = Server::start(&dir.path().join("concepts"), &["--precision", "bf16"]);
    let chelsea = upload_chelsea(&server);
    let body = json!({
        "prompt": PROMPT, "concept": chelsea, "steps": 4, "height": 128, "width": 192, "seed": 7,
    });
    let r = client()
        .post(server.url("/v1/generate"))
        .header("accept", "image/png")
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let served = png_pixels(&r.bytes().unwrap());
    drop(server);

    let out = dir.path().join("cli.png");
    let status = cli_chelsea(&out, &[OsStr::new("--precision"), OsStr::new("bf16")]);
    assert!(status.success());
    let cli = image::open(&out).unwrap().to_rgb8();
    let diff = max_level_diff(&served, &cli);
    assert!(diff <= 1, "server vs CLI, bf16: {diff} levels");
}
