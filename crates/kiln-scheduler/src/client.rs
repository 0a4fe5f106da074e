//! The scheduler's client for kilnd's control API: the two commands the leader sends (`PUT` and `DELETE
//! /v1/streams/{id}`, each carrying the leader's epoch in [`EPOCH_HEADER`] and the fleet token when one is
//! configured), and the typed outcome of each.
//!
//! A daemon answers errors with the JSON envelope `{"error": {"code": "...", "message": "..."}}`. The outcome is
//! decided by the HTTP status and that `code`, never by the message text ([`classify`]):
//!
//! | answer                              | outcome                                                  |
//! |-------------------------------------|----------------------------------------------------------|
//! | 2xx                                 | done                                                     |
//! | 409 with code `stale_epoch`         | [`CommandError::Fenced`]: a newer leader exists          |
//! | 400                                 | [`CommandError::Rejected`]: the spec itself is bad       |
//! | 404                                 | [`CommandError::NotFound`] (a `DELETE` counts it as done) |
//! | any other status (422, 429, 5xx, …) | [`CommandError::Refused`]: try another node             |
//! | no answer                           | [`CommandError::Unreachable`]: try another node         |

use std::sync::Arc;
use std::time::Duration;

use kiln_model::node::EPOCH_HEADER;
use kiln_model::StreamRequest;
use prometheus::IntCounter;

use crate::admit::{NodeNetworks, PolicyResolver};

/// The error `code` kilnd sends when a command carries an epoch lower than the highest it has seen.
pub const STALE_EPOCH: &str = "stale_epoch";

/// Why a daemon did not carry out a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// 409 `stale_epoch`: the daemon follows a newer leader; this process is deposed.
    #[error("the daemon follows a newer epoch: {message}")]
    Fenced { message: String },
    /// 400: the spec itself is bad; no other node would take it either.
    #[error("{message}")]
    Rejected {
        code: Option<String>,
        message: String,
    },
    /// 404: the daemon does not know the stream.
    #[error("404 {message}")]
    NotFound { message: String },
    /// Any other error status (422 cannot run here, 429 no room, 5xx, 401, a 409 other than `stale_epoch`):
    /// another node may take it.
    #[error("{status} {message}")]
    Refused {
        status: u16,
        code: Option<String>,
        message: String,
    },
    /// No HTTP answer (connection refused, timeout): another node may take it.
    #[error("unreachable: {0}")]
    Unreachable(String),
}

impl CommandError {
    pub fn is_fenced(&self) -> bool {
        matches!(self, CommandError::Fenced { .. })
    }
}

/// The `error` object of kilnd's envelope.
#[derive(Debug, serde::Deserialize)]
struct Envelope {
    error: EnvelopeError,
}

#[derive(Debug, serde::Deserialize)]
struct EnvelopeError {
    code: String,
    #[serde(default)]
    message: String,
}

/// The outcome of an answer with `status` and `body`: by the status code, and for a 409 by the envelope's `code`.
/// A body that is not the envelope is kept whole as the message, with no code.
pub fn classify(status: u16, body: &str) -> Result<(), CommandError> {
    if (200..300).contains(&status) {
        return Ok(());
    }
    let (code, message) = match serde_json::from_str::<Envelope>(body) {
        Ok(e) => (Some(e.error.code), e.error.message),
        Err(_) => (None, body.to_string()),
    };
    Err(match status {
        409 if code.as_deref() == Some(STALE_EPOCH) => CommandError::Fenced { message },
        400 => CommandError::Rejected { code, message },
        404 => CommandError::NotFound { message },
        _ => CommandError::Refused {
            status,
            code,
            message,
        },
    })
}

/// HTTP client for daemons: adds the fleet token to every request, and counts fenced commands.
#[derive(Debug, Clone)]
pub struct DaemonClient {
    http: reqwest::Client,
    token: Option<String>,
    /// `kiln_scheduler_fenced_total` (shared with the scheduler's registry).
    fenced: IntCounter,
}

impl DaemonClient {
    /// A client that connects only to addresses `networks` allows (a node's name is resolved through it on every
    /// connection) and follows no redirect (a daemon never redirects its control API; a redirect would lead the
    /// scheduler, and what it passes on from VOD routes, to an address nobody checked).
    pub fn new(token: Option<String>, fenced: IntCounter, networks: NodeNetworks) -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .redirect(reqwest::redirect::Policy::none())
                .dns_resolver(Arc::new(PolicyResolver {
                    networks: Arc::new(networks),
                }))
                .build()
                .expect("building the HTTP client"),
            token,
            fenced,
        }
    }

    /// A request to a daemon with the fleet token, when one is configured (also used to pass VOD requests on).
    pub fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, url);
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    /// `PUT {url}/v1/streams/{id}` under `epoch`: starts the stream (idempotent on the daemon).
    pub async fn put(
        &self,
        epoch: u64,
        url: &str,
        id: &str,
        spec: &StreamRequest,
    ) -> Result<(), CommandError> {
        let sent = self
            .request(reqwest::Method::PUT, &format!("{url}/v1/streams/{id}"))
            .header(EPOCH_HEADER, epoch.to_string())
            .json(spec)
            .send()
            .await;
        self.outcome(sent).await
    }

    /// `DELETE {url}/v1/streams/{id}` under `epoch`: stops the stream. A daemon that does not know it (404) has
    /// nothing to stop, which is what was asked.
    pub async fn delete(&self, epoch: u64, url: &str, id: &str) -> Result<(), CommandError> {
        let sent = self
            .request(reqwest::Method::DELETE, &format!("{url}/v1/streams/{id}"))
            .header(EPOCH_HEADER, epoch.to_string())
            .send()
            .await;
        match self.outcome(sent).await {
            Err(CommandError::NotFound { .. }) => Ok(()),
            other => other,
        }
    }

    async fn outcome(&self, sent: reqwest::Result<reqwest::Response>) -> Result<(), CommandError> {
        let r = sent.map_err(|e| CommandError::Unreachable(e.to_string()))?;
        let status = r.status().as_u16();
        if r.status().is_success() {
            return Ok(());
        }
        let body = capped(r, ERROR_BODY_CAP).await.unwrap_or_default();
        let out = classify(status, &String::from_utf8_lossy(&body));
        if matches!(&out, Err(e) if e.is_fenced()) {
            self.fenced.inc();
        }
        out
    }
}

/// The most of a daemon's error answer read (its JSON envelope is a few hundred bytes).
const ERROR_BODY_CAP: usize = 64 << 10;

/// A daemon's answer body, at most `cap` bytes: `None` past that, or when it fails. A node is trusted like a
/// node, but one (buggy, compromised) must not be able to stream gigabytes into the control plane's memory
/// within the command timeout.
pub(crate) async fn capped(mut r: reqwest::Response, cap: usize) -> Option<bytes::Bytes> {
    if r.content_length().is_some_and(|n| n > cap as u64) {
        return None;
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = r.chunk().await.ok()? {
        if body.len() + chunk.len() > cap {
            return None;
        }
        body.extend_from_slice(&chunk);
    }
    Some(body.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// An answer past the cap is not read into memory, with or without a Content-Length.
    #[tokio::test]
    async fn answers_are_read_up_to_a_cap() {
        let app = axum::Router::new()
            .route("/small", axum::routing::get(|| async { "{}" }))
            .route("/big", axum::routing::get(|| async { vec![b'x'; 1 << 20] }))
            .route(
                "/streamed",
                axum::routing::get(|| async {
                    let chunks = futures_util::stream::iter((0..64).map(|_| {
                        Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'y'; 16 << 10]))
                    }));
                    axum::body::Body::from_stream(chunks)
                }),
            );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", l.local_addr().unwrap());
        let server = tokio::spawn(async move { axum::serve(l, app).await });
        let get = |path: &str| reqwest::get(format!("{base}{path}"));
        assert_eq!(
            capped(get("/small").await.unwrap(), 1024).await.unwrap(),
            "{}"
        );
        assert_eq!(capped(get("/big").await.unwrap(), 64 << 10).await, None);
        assert_eq!(
            capped(get("/streamed").await.unwrap(), 64 << 10).await,
            None
        );
        assert_eq!(
            capped(get("/streamed").await.unwrap(), 1 << 20)
                .await
                .map(|b| b.len()),
            Some(1 << 20)
        );
        server.abort();
    }

    fn envelope(code: &str, message: &str) -> String {
        json!({"error": {"code": code, "message": message}}).to_string()
    }

    #[test]
    fn success_statuses_are_done() {
        for status in [200, 201, 204] {
            assert_eq!(classify(status, ""), Ok(()), "{status}");
        }
    }

    #[test]
    fn only_a_409_with_the_stale_epoch_code_fences() {
        assert_eq!(
            classify(409, &envelope("stale_epoch", "epoch 3 < 4")),
            Err(CommandError::Fenced {
                message: "epoch 3 < 4".into()
            })
        );
        // another 409 (the same id with another spec) is a refusal, even if its text mentions the word
        assert_eq!(
            classify(409, &envelope("conflict", "not a stale_epoch")),
            Err(CommandError::Refused {
                status: 409,
                code: Some("conflict".into()),
                message: "not a stale_epoch".into()
            })
        );
        // the code decides, not the text: a non-envelope body naming it does not fence
        assert!(matches!(
            classify(409, "stale_epoch"),
            Err(CommandError::Refused {
                status: 409,
                code: None,
                ..
            })
        ));
        // the code on another status does not fence either
        assert!(matches!(
            classify(503, &envelope("stale_epoch", "x")),
            Err(CommandError::Refused { status: 503, .. })
        ));
    }

    #[test]
    fn a_400_rejects_the_spec_and_a_404_is_not_found() {
        assert_eq!(
            classify(400, &envelope("bad_request", "unknown preset")),
            Err(CommandError::Rejected {
                code: Some("bad_request".into()),
                message: "unknown preset".into()
            })
        );
        assert_eq!(
            classify(404, &envelope("not_found", "no stream `a`")),
            Err(CommandError::NotFound {
                message: "no stream `a`".into()
            })
        );
    }

    #[test]
    fn other_statuses_are_refusals_that_keep_status_code_and_message() {
        for (status, code) in [
            (422, "cannot_run_here"),
            (429, "insufficient_capacity"),
            (503, "unavailable"),
            (401, "unauthorized"),
        ] {
            let e = classify(status, &envelope(code, "why")).unwrap_err();
            assert_eq!(
                e,
                CommandError::Refused {
                    status,
                    code: Some(code.into()),
                    message: "why".into()
                }
            );
            assert_eq!(e.to_string(), format!("{status} why"));
        }
        let e = classify(502, "<html>bad gateway</html>").unwrap_err();
        assert_eq!(e.to_string(), "502 <html>bad gateway</html>");
    }

    /// A loopback daemon that answers every request with `status` and `body`, and reports each request it got as
    /// `METHOD path epoch-header authorization-header`.
    async fn daemon(status: u16, body: String) -> (String, tokio::sync::mpsc::Receiver<String>) {
        use axum::http::{HeaderMap, Method, StatusCode, Uri};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let app = axum::Router::new().fallback(move |m: Method, u: Uri, h: HeaderMap| {
            let (tx, body) = (tx.clone(), body.clone());
            async move {
                let header = |n: &str| {
                    h.get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_string()
                };
                let seen = format!(
                    "{m} {} {} {}",
                    u.path(),
                    header(EPOCH_HEADER),
                    header("authorization")
                );
                let _ = tx.send(seen).await;
                (StatusCode::from_u16(status).unwrap(), body)
            }
        });
        tokio::spawn(async move { axum::serve(l, app).await });
        (url, rx)
    }

    #[tokio::test]
    async fn commands_carry_epoch_and_token_and_a_delete_of_an_unknown_stream_is_done() {
        let fenced = IntCounter::new("f", "f").unwrap();
        let c = DaemonClient::new(
            Some("t0ken-t0ken-t0ken".into()),
            fenced.clone(),
            Default::default(),
        );
        let (url, mut seen) = daemon(404, envelope("not_found", "gone")).await;
        assert_eq!(c.delete(7, &url, "a").await, Ok(()));
        assert_eq!(
            seen.recv().await.unwrap(),
            "DELETE /v1/streams/a 7 Bearer t0ken-t0ken-t0ken"
        );
        // the same 404 on a PUT is not done: another node may take the stream
        let spec = StreamRequest::default();
        assert!(matches!(
            c.put(7, &url, "a", &spec).await,
            Err(CommandError::NotFound { .. })
        ));
        assert_eq!(fenced.get(), 0);
    }

    #[tokio::test]
    async fn a_stale_epoch_answer_is_fenced_and_counted() {
        let fenced = IntCounter::new("f", "f").unwrap();
        let c = DaemonClient::new(None, fenced.clone(), Default::default());
        let (url, mut seen) = daemon(409, envelope("stale_epoch", "epoch 1 < 2")).await;
        let spec = StreamRequest::default();
        assert!(c.put(1, &url, "a", &spec).await.unwrap_err().is_fenced());
        // no token configured: none sent
        assert_eq!(seen.recv().await.unwrap(), "PUT /v1/streams/a 1 -");
        assert!(c.delete(1, &url, "a").await.unwrap_err().is_fenced());
        assert_eq!(fenced.get(), 2);
        // nobody listening: unreachable, not counted
        let gone = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        assert!(matches!(
            c.delete(1, &gone, "a").await,
            Err(CommandError::Unreachable(_))
        ));
        assert_eq!(fenced.get(), 2);
    }
}
