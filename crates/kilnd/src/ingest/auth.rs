//! `--publish-auth-url`: for a key or stream id kilnd does not know, ask the platform (the nginx-rtmp
//! `on_publish` model). kilnd POSTs `{"protocol", "name", "client_addr"}` and waits at most the auth timeout
//! (2 s); a 2xx answer `{"stream_id", "preset"?, "passphrase"?}` creates the `publish:` stream and the publisher
//! goes on, any 4xx refuses it, anything else (5xx, timeout, an answer that does not parse) refuses it as an
//! auth error. The answer's stream id becomes the playback path, so the key never shows in a URL viewers see.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kiln_model::ingest::{IngestRequest, Protocol};
use serde::{Deserialize, Serialize};

use crate::supervisor::{Refusal, StreamHandle, Supervisor};

/// What kilnd sends.
#[derive(Debug, Serialize)]
pub struct AuthRequest<'a> {
    pub protocol: &'a str,
    /// The RTMP stream key, or the SRT stream id's resource.
    pub name: &'a str,
    pub client_addr: String,
}

/// What a 2xx answer holds.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthAnswer {
    /// The stream to create (its playback path). SRT publishers name their stream, so for SRT it must be the
    /// name asked about (or absent).
    #[serde(default)]
    pub stream_id: Option<String>,
    #[serde(default)]
    pub preset: Option<String>,
    /// The SRT passphrase (required for SRT: the publisher has encrypted with it).
    #[serde(default)]
    pub passphrase: Option<String>,
}

/// Largest answer read.
const MAX_ANSWER: usize = 16 << 10;

/// Asks `url` about `name` and creates the stream it allows.
pub(super) async fn create_from(
    sup: &Arc<Supervisor>,
    url: &str,
    timeout: Duration,
    protocol: Protocol,
    name: &str,
    addr: SocketAddr,
) -> Result<Arc<StreamHandle>, (Refusal, String)> {
    let answer = ask(url, timeout, protocol, name, addr).await?;
    let err = |m: String| (Refusal::AuthError, m);
    let id = match (protocol, answer.stream_id) {
        (Protocol::Rtmp, Some(id)) => id,
        (Protocol::Rtmp, None) => {
            return Err(err("the auth answer has no stream_id".into()));
        }
        (Protocol::Srt, Some(id)) if id != name => {
            return Err(err(format!(
                "the auth answer names stream `{id}`, but the SRT publisher asked for `{name}`"
            )))
        }
        (Protocol::Srt, _) => name.to_string(),
    };
    if protocol == Protocol::Srt && answer.passphrase.is_none() {
        return Err(err(
            "the auth answer has no passphrase: SRT publishers must encrypt".into(),
        ));
    }
    let request = kiln_model::StreamRequest {
        source: "publish:".into(),
        preset: answer.preset,
        ingest: Some(IngestRequest {
            key: (protocol == Protocol::Rtmp).then(|| name.to_string()),
            passphrase: answer.passphrase,
            backup_key: None,
        }),
        ..Default::default()
    };
    let (h, _) = sup
        .create(&id, request)
        .await
        .map_err(|e| err(format!("creating stream `{id}` from the auth answer: {e}")))?;
    tracing::info!(stream = %id, protocol = protocol.as_str(), %addr, "publish authorized by the auth URL");
    Ok(h)
}

async fn ask(
    url: &str,
    timeout: Duration,
    protocol: Protocol,
    name: &str,
    addr: SocketAddr,
) -> Result<AuthAnswer, (Refusal, String)> {
    let err = |m: String| (Refusal::AuthError, m);
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| err(e.without_url().to_string()))?;
    let body = AuthRequest {
        protocol: protocol.as_str(),
        name,
        client_addr: addr.to_string(),
    };
    let res = client
        .post(url)
        .json(&body)
        .send()
        .await
        // without the URL: it may carry the platform's credentials, and this text reaches logs and the status
        .map_err(|e| err(format!("the auth URL did not answer: {}", e.without_url())))?;
    let status = res.status();
    if status.is_client_error() {
        return Err((
            Refusal::AuthDenied,
            format!("the auth URL refused the publisher ({status})"),
        ));
    }
    if !status.is_success() {
        return Err(err(format!("the auth URL answered {status}")));
    }
    let bytes = tokio::time::timeout(timeout, res.bytes())
        .await
        .map_err(|_| err("the auth URL's answer was too slow".into()))?
        .map_err(|e| err(e.without_url().to_string()))?;
    if bytes.len() > MAX_ANSWER {
        return Err(err(format!(
            "the auth URL's answer is over {MAX_ANSWER} bytes"
        )));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| err(format!("the auth URL's answer does not parse: {e}")))
}
