use super::*;
use crate::admit::NodeAdmission;
use crate::store::{Store, StoreError, StreamRecord};
use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use kiln_model::node::{CapacityReport, HostReport};
use std::time::Duration;
use tower::ServiceExt;

const JOIN: &str = "join-token-0123456789";
const FLEET: &str = "fleet-token-0123456789";

fn scheduler(api_token: Option<&str>, nodes: NodeAdmission) -> Arc<Scheduler> {
    let config = crate::Config {
        instance_id: "a".into(),
        advertise_url: "http://sched".into(),
        interval: Duration::from_secs(1),
        presets: kiln_config::Presets::builtin(),
        strategy: kiln_binpack::Strategy::Kiln,
        api_token: api_token.map(str::to_string),
        nodes,
        relieve: None,
    };
    Arc::new(Scheduler::new(config, Store::memory(5)))
}

fn tokens() -> NodeAdmission {
    NodeAdmission {
        token: Some(JOIN.into()),
        ..Default::default()
    }
}

fn open() -> NodeAdmission {
    NodeAdmission {
        open: true,
        ..Default::default()
    }
}

fn report(id: &str, url: &str) -> Heartbeat {
    Heartbeat {
        url: url.into(),
        capacity: CapacityReport {
            node_id: id.into(),
            epoch: 1,
            fence_epoch: 0,
            host: HostReport::default(),
            gpus: vec![],
            gpu_inventory: Default::default(),
            streams: vec![],
            headroom: Default::default(),
            demands: Default::default(),
            vod: None,
            draining: false,
        },
    }
}

/// Sends one request through the router: status, headers and the body as JSON (`Null` when it is not JSON).
async fn send(
    s: &Arc<Scheduler>,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, axum::http::HeaderMap, Value) {
    let mut rb = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        rb = rb.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = match body {
        Some(v) => rb
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(v.to_string())),
        None => rb.body(Body::empty()),
    }
    .unwrap();
    let res = router(s.clone()).oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (parts.status, parts.headers, v)
}

async fn beat(
    s: &Arc<Scheduler>,
    id: &str,
    url: &str,
    token: Option<&str>,
) -> (StatusCode, axum::http::HeaderMap, Value) {
    let hb = serde_json::to_value(report(id, url)).unwrap();
    send(
        s,
        "POST",
        &format!("/v1/nodes/{id}/heartbeat"),
        token,
        Some(hb),
    )
    .await
}

async fn node_urls(s: &Scheduler) -> Vec<(String, String)> {
    s.store
        .nodes()
        .await
        .unwrap()
        .into_iter()
        .filter_map(|n| Some((n.id, n.heartbeat?.url)))
        .collect()
}

/// A placed record for `id` on `node`, written the way the leader writes it.
async fn placed(s: &Scheduler, id: &str, node: &str) {
    let rec = StreamRecord {
        id: id.into(),
        request: StreamRequest::default(),
        phase: Phase::Placed,
        node: Some(node.into()),
        gpu: None,
        demand: None,
        alternatives: vec![],
        epoch: 5,
        created_unix_ms: 1,
        placed_unix_ms: 1,
        moves: 0,
        handover_from: None,
    };
    s.store.save(5, &rec, None).await.unwrap();
}

async fn play_location(s: &Arc<Scheduler>, stream: &str) -> String {
    let (st, h, _) = send(s, "GET", &format!("/play/{stream}/master.m3u8"), None, None).await;
    assert_eq!(st, StatusCode::FOUND);
    h[header::LOCATION].to_str().unwrap().to_string()
}

#[tokio::test]
async fn heartbeats_need_the_join_token_which_opens_nothing_else() {
    let s = scheduler(Some(FLEET), tokens());
    // none, a wrong one, one for another realm: 401 with the challenge, before the body is even read
    for token in [None, Some("join-token-0123456780"), Some("nope")] {
        let (st, h, v) = beat(&s, "evil", "http://10.0.0.66:8080", token).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{token:?}");
        assert!(h[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .starts_with("Bearer"));
        assert_eq!(v["error"]["code"], "unauthorized");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(
            m.contains("--node-token-env") && m.contains("--api-token-env"),
            "{m}"
        );
    }
    let (st, _, _) = send(
        &s,
        "POST",
        "/v1/nodes/evil/heartbeat",
        None,
        Some(json!({})),
    )
    .await;
    assert_eq!(
        st,
        StatusCode::UNAUTHORIZED,
        "a malformed body does not get past the token"
    );
    // a body that never comes: answered from the token, without waiting for it
    let never = Body::from_stream(futures_util::stream::pending::<
        Result<bytes::Bytes, std::io::Error>,
    >());
    let req = Request::post("/v1/nodes/evil/heartbeat")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, "262144")
        .body(never)
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(2), router(s.clone()).oneshot(req))
        .await
        .expect("answered before the body")
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    // with the token: a body over the limit is 413 (declared, or counted as it comes), JSON of another shape 422,
    // and what is not JSON 400
    let post = |body: Body, length: Option<&str>| {
        let mut rb = Request::post("/v1/nodes/n9/heartbeat")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, format!("Bearer {JOIN}"));
        if let Some(n) = length {
            rb = rb.header(header::CONTENT_LENGTH, n);
        }
        router(s.clone()).oneshot(rb.body(body).unwrap())
    };
    let big = || vec![b' '; 300 << 10];
    let declared = post(Body::from(big()), Some("307200")).await.unwrap();
    assert_eq!(declared.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let streamed = Body::from_stream(futures_util::stream::iter(
        big()
            .chunks(64 << 10)
            .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    ));
    assert_eq!(
        post(streamed, None).await.unwrap().status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert_eq!(
        post(Body::from("{\"capacity\": 7}"), None)
            .await
            .unwrap()
            .status(),
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(
        post(Body::from("{not json"), None).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    assert!(node_urls(&s).await.is_empty());
    // the join token and the fleet token both admit
    let (st, _, v) = beat(&s, "n1", "http://10.0.0.1:8080", Some(JOIN)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["interval_ms"], 1000);
    let (st, _, _) = beat(&s, "n2", "http://10.0.0.2:8080", Some(FLEET)).await;
    assert_eq!(st, StatusCode::OK);
    // the join token does not open the control API: no listing, no stream, no drain
    let body = json!({"id": "s1", "source": "test:"});
    for (method, path, body) in [
        ("GET", "/v1/nodes", None),
        ("POST", "/v1/streams", Some(body)),
        ("POST", "/v1/nodes/n1/drain", None),
        ("GET", "/v1/fleet/headroom", None),
    ] {
        let (st, _, _) = send(&s, method, path, Some(JOIN), body).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{method} {path}");
    }
    let (st, _, v) = send(&s, "GET", "/v1/nodes", Some(FLEET), None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v.as_array().unwrap().len(), 2, "{v}");
    // a node that has the token may move (a daemon restarted elsewhere): /play follows it
    placed(&s, "s1", "n1").await;
    assert_eq!(
        play_location(&s, "s1").await,
        "http://10.0.0.1:8080/live/s1/master.m3u8"
    );
    let (st, _, _) = beat(&s, "n1", "http://10.0.0.9:8080", Some(JOIN)).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        play_location(&s, "s1").await,
        "http://10.0.0.9:8080/live/s1/master.m3u8"
    );
    // the three tokens, the malformed body and the body that never came
    assert_eq!(s.metrics.refusals.with_label_values(&["join"]).get(), 5);
}

#[tokio::test]
async fn a_closed_fleet_admits_nobody_and_the_allow_list_names_who_joins() {
    // no token and no --open-fleet: nobody joins, and the answer says which flag to use
    let s = scheduler(None, NodeAdmission::default());
    let (st, _, v) = beat(&s, "n1", "http://10.0.0.1:8080", None).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert_eq!(v["error"]["code"], "fleet_closed");
    let m = v["error"]["message"].as_str().unwrap();
    assert!(
        m.contains("--node-token-env") && m.contains("--open-fleet"),
        "{m}"
    );
    let (st, _, _) = beat(&s, "n1", "http://10.0.0.1:8080", Some(JOIN)).await;
    assert_eq!(
        st,
        StatusCode::FORBIDDEN,
        "a token nobody configured opens nothing"
    );
    assert!(node_urls(&s).await.is_empty());
    // --nodes n1: only n1 joins, with the token
    let s = scheduler(
        None,
        NodeAdmission {
            ids: Some(["n1".to_string()].into()),
            ..tokens()
        },
    );
    let (st, _, v) = beat(&s, "evil", "http://10.0.0.66:8080", Some(JOIN)).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert_eq!(v["error"]["code"], "node_not_allowed");
    assert!(v["error"]["message"].as_str().unwrap().contains("--nodes"));
    let (st, _, _) = beat(&s, "n1", "http://10.0.0.1:8080", Some(JOIN)).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        node_urls(&s).await,
        vec![("n1".to_string(), "http://10.0.0.1:8080".to_string())]
    );
}

#[tokio::test]
async fn an_advertised_url_must_be_plain_http_to_an_allowed_address() {
    let s = scheduler(None, tokens());
    for (url, status, code) in [
        ("http://169.254.169.254", 422, "node_url_refused"),
        (
            "http://169.254.169.254:80/latest/meta-data",
            422,
            "node_url_refused",
        ),
        ("http://[fd00:ec2::254]", 422, "node_url_refused"),
        (
            "http://[::ffff:169.254.169.254]:8080",
            422,
            "node_url_refused",
        ),
        ("http://127.0.0.1:8080", 422, "node_url_refused"),
        ("http://0.0.0.0:8080", 422, "node_url_refused"),
        ("http://localhost:8080", 422, "node_url_refused"),
        ("http://224.0.0.1:8080", 422, "node_url_refused"),
        ("ftp://10.0.0.1", 400, "bad_request"),
        ("http://user:pw@10.0.0.1:8080", 400, "bad_request"),
        ("http://10.0.0.1:8080/?a=b", 400, "bad_request"),
        ("10.0.0.1:8080", 400, "bad_request"),
    ] {
        let (st, _, v) = beat(&s, "evil", url, Some(JOIN)).await;
        assert_eq!(st.as_u16(), status, "{url}: {v}");
        assert_eq!(v["error"]["code"], code, "{url}: {v}");
        if status == 422 {
            let m = v["error"]["message"].as_str().unwrap();
            assert!(m.contains("--node-networks"), "{url}: {m}");
        }
    }
    assert!(node_urls(&s).await.is_empty(), "nothing refused was stored");
    // public and private addresses join; --node-networks opens loopback for a one-host fleet
    for url in [
        "http://10.0.0.1:8080",
        "https://[fd12::1]:8443",
        "http://203.0.114.9",
    ] {
        assert_eq!(
            beat(&s, "n1", url, Some(JOIN)).await.0,
            StatusCode::OK,
            "{url}"
        );
    }
    let lo = scheduler(
        None,
        NodeAdmission {
            networks: crate::admit::NodeNetworks {
                extra: kiln_model::net::UrlPolicy::parse("127.0.0.0/8").unwrap(),
            },
            ..tokens()
        },
    );
    assert_eq!(
        beat(&lo, "n1", "http://127.0.0.1:8080", Some(JOIN)).await.0,
        StatusCode::OK
    );
    assert_eq!(
        beat(&lo, "n2", "http://169.254.169.254", Some(JOIN))
            .await
            .0,
        StatusCode::UNPROCESSABLE_ENTITY
    );
}

#[tokio::test]
async fn in_an_open_fleet_a_forged_heartbeat_cannot_re_point_a_live_node() {
    let s = scheduler(None, open());
    assert_eq!(
        beat(&s, "n1", "http://10.0.0.1:8080", None).await.0,
        StatusCode::OK
    );
    placed(&s, "s1", "n1").await;
    // the same node again: fine; somebody else's URL for it while it lives: 409, and viewers stay put
    assert_eq!(
        beat(&s, "n1", "http://10.0.0.1:8080", None).await.0,
        StatusCode::OK
    );
    let (st, _, v) = beat(&s, "n1", "http://10.0.0.66:8080", None).await;
    assert_eq!(st, StatusCode::CONFLICT);
    assert_eq!(v["error"]["code"], "node_url_conflict");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--node-token-env"));
    assert_eq!(
        play_location(&s, "s1").await,
        "http://10.0.0.1:8080/live/s1/master.m3u8"
    );
    // the address policy holds in an open fleet too
    let (st, _, _) = beat(&s, "evil", "http://169.254.169.254", None).await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(node_urls(&s).await.len(), 1);
}

#[tokio::test]
async fn in_an_open_fleet_a_node_moves_once_its_heartbeat_has_expired() {
    let s = scheduler(None, open());
    let hb = report("n1", "http://10.0.0.1:8080");
    // a heartbeat that expires at once: the node is dead, so a new URL for it is a new life
    s.store
        .heartbeat("n1", &hb, Duration::from_millis(0))
        .await
        .unwrap();
    assert_eq!(
        beat(&s, "n1", "http://10.0.0.2:8080", None).await.0,
        StatusCode::OK
    );
    assert_eq!(
        node_urls(&s).await,
        vec![("n1".to_string(), "http://10.0.0.2:8080".to_string())]
    );
}

/// Headroom per preset from the closed form: with nodes that price the preset, it counts what fits, and
/// placing a stream makes it shrink.
#[tokio::test]
async fn headroom_counts_what_fits_and_shrinks_with_bookings() {
    use kiln_model::capacity::Resources;
    use kiln_model::node::PresetDemand;
    let s = scheduler(None, open());
    let mut hb = report("n1", "http://10.0.0.1:8080");
    hb.capacity.host.capacity = Resources {
        cpu_millicores: 10_000,
        memory_mib: 10_000,
        ..Default::default()
    };
    let cpu = Resources {
        cpu_millicores: 1000,
        memory_mib: 100,
        ..Default::default()
    };
    hb.capacity.demands.insert(
        "live-audio-only".into(),
        PresetDemand {
            cpu,
            gpu: None,
            pixel_rate: 0,
        },
    );
    s.store
        .heartbeat("n1", &hb, Duration::from_secs(60))
        .await
        .unwrap();
    let (st, _, v) = send(&s, "GET", "/v1/fleet/headroom", None, None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["nodes"]["alive"], 1);
    assert_eq!(v["presets"]["live-audio-only"]["streams"], 10, "{v}");
    assert_eq!(v["presets"]["live-audio-only"]["on_gpu"], 0);
    let rec = StreamRecord {
        demand: Some(kiln_binpack::Demand {
            host: cpu,
            gpu: None,
            pixel_rate: 0,
        }),
        ..StreamRecord {
            id: "a1".into(),
            request: StreamRequest::default(),
            phase: Phase::Placed,
            node: Some("n1".into()),
            gpu: None,
            demand: None,
            alternatives: vec![],
            epoch: 5,
            created_unix_ms: 1,
            placed_unix_ms: 1,
            moves: 0,
            handover_from: None,
        }
    };
    s.store.save(5, &rec, None).await.unwrap();
    let (_, _, v) = send(&s, "GET", "/v1/fleet/headroom", None, None).await;
    assert_eq!(v["presets"]["live-audio-only"]["streams"], 9, "{v}");
}

#[tokio::test]
async fn a_store_that_does_not_answer_refuses_placements_with_its_reason_and_heartbeats_raise_the_floor(
) {
    let s = scheduler(None, tokens());
    s.tick().await;
    assert_eq!(s.metrics.store_up.get(), 1);
    // a heartbeat reports the epoch its daemon follows: the floor a new epoch must exceed rises to it
    let mut hb = report("n1", "http://10.0.0.1:8080");
    hb.capacity.fence_epoch = 41;
    let (st, _, ack) = send(
        &s,
        "POST",
        "/v1/nodes/n1/heartbeat",
        Some(JOIN),
        Some(serde_json::to_value(&hb).unwrap()),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{ack}");
    assert_eq!(s.fence_floor.load(std::sync::atomic::Ordering::Relaxed), 41);
    s.store_health(Some(&StoreError::Unreachable(
        "no Sentinel named a master".into(),
    )));
    assert_eq!(s.metrics.store_up.get(), 0);
    let spec = json!({"id": "x", "source": "test:", "preset": "live-audio-only"});
    let (st, headers, body) = send(&s, "POST", "/v1/streams", None, Some(spec.clone())).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "store_unavailable");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("no Sentinel named a master") && msg.contains("running streams"),
        "{msg}"
    );
    assert_eq!(headers[header::RETRY_AFTER], "1");
    // the store answers again: the placement is tried; the only node has no room, which just after taking
    // the lease is not yet a verdict (503 `warming`, not 429)
    s.store_health(None);
    let (st, headers, body) = send(&s, "POST", "/v1/streams", None, Some(spec)).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "warming", "{body}");
    assert_eq!(headers[header::RETRY_AFTER], "1");
}
