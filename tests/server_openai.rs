//! The real `openai` Python client (PyPI) against the server: runs
//! tests/server_openai_client.py against a random-weights server and a scripted tool-calling
//! one. Skips visibly when python3 or the `openai` package is missing.

mod chat_support;
mod server_support;

use std::process::Command;

use r1_runtime::text::Tokenizer;
use server_support::{scripted_engine, TestServer, MODEL};

#[test]
fn openai_python_client() {
    let has_client = Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_client {
        println!("skipped: the openai Python package is not installed (pip install openai)");
        return;
    }
    let Some((_tmp, dir)) = server_support::checkpoint(4096, false) else {
        return;
    };
    let random = TestServer::start(&dir);
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let script = tok
        .encode(
            "<think>\nCall the tools.\n</think>\n\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\", \"unit\": \"celsius\"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{\"tz\": \"Europe/Paris\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        )
        .unwrap();
    let d = dir.clone();
    let scripted = TestServer::with_engine(&dir, move || Ok(scripted_engine(&d, 128804, script)));
    let script_path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/server_openai_client.py");
    let out = Command::new("python3")
        .arg(script_path)
        .arg(format!("http://{}/v1", random.addr))
        .arg(MODEL)
        .arg(format!("http://{}/v1", scripted.addr))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("all checks passed"));
    let m = random.wait_idle();
    assert_eq!(m.kv_pages_in_use, 0);
}
