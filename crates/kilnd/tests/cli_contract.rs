//! The command-line contract other tools rely on: `kilnd --listen HOST:PORT [--demo]` prints its bound address,
//! serves `/live/demo/master.m3u8` (≥ 2 video renditions + audio) with `--demo`, accepts
//! `PUT /v1/streams/{id}` with `{"source": "test:"}`, and exits cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_flag_serves_a_live_stream_and_sigterm_exits_cleanly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kilnd"))
        // the small preset keeps this test light; the default ladder is exercised by the demo command
        .args([
            "--listen",
            "127.0.0.1:0",
            "--demo",
            "--demo-preset",
            "live-360p-abr",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kilnd starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let base = line
        .trim()
        .strip_prefix("kilnd listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_string();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();

    let master = http
        .get(format!("{base}/live/demo/master.m3u8"))
        .send()
        .await
        .unwrap();
    assert_eq!(master.status(), 200);
    let text = master.text().await.unwrap();
    let parsed = m3u8_rs::parse_master_playlist_res(text.as_bytes()).unwrap();
    assert!(parsed.variants.len() >= 2, "{text}");
    assert!(parsed.variants.iter().all(|v| v.audio.is_some()));
    assert_eq!(parsed.alternatives.len(), 1, "one audio rendition");

    let put = http
        .put(format!("{base}/v1/streams/extra"))
        .body(r#"{"source": "test:", "preset": "live-360p-abr"}"#)
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.status());
    let list = http
        .get(format!("{base}/v1/streams"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["demo", "extra"]);
    let page = http
        .get(format!("{base}/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("lowLatencyMode: true"));

    // SIGTERM: streams get EOS, the server drains and the process exits 0
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "kilnd exited with {status}");
}
