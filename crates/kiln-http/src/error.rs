//! The JSON error envelope of every kiln control API: `{"error": {"code": "...", "message": "...", …}}`.
//!
//! `code` is a stable machine-readable word (`bad_request`, `stale_epoch`, `insufficient_capacity`, …) that clients
//! branch on; `message` says what to fix. Extra fields (e.g. the short capacity dimension) sit beside them.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

/// The error body for `code` and `message`, plus `extra` fields inside the `error` object.
pub fn envelope<'a>(
    code: &str,
    message: impl Into<String>,
    extra: impl IntoIterator<Item = (&'a str, Value)>,
) -> Value {
    let mut inner = Map::new();
    inner.insert("code".into(), Value::from(code));
    inner.insert("message".into(), Value::from(message.into()));
    inner.extend(extra.into_iter().map(|(k, v)| (k.to_string(), v)));
    json!({ "error": inner })
}

/// A JSON error response: `status` with `{"error": {"code", "message"}}`.
pub fn json_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    json_error_with(status, code, message, [])
}

/// [`json_error`] with extra fields in the `error` object.
pub fn json_error_with<'a>(
    status: StatusCode,
    code: &str,
    message: impl Into<String>,
    extra: impl IntoIterator<Item = (&'a str, Value)>,
) -> Response {
    (status, Json(envelope(code, message, extra))).into_response()
}

/// The fallback of every router: a path no route serves (an id with a `/` in it, a typo) gets 404 with the envelope.
pub async fn no_route(uri: axum::http::Uri) -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no route serves {}",
            uri.path().chars().take(200).collect::<String>()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_envelope_carries_code_message_and_extras() {
        let v = envelope(
            "insufficient_capacity",
            "no room",
            [("dimension", Value::from("cpu_millicores"))],
        );
        assert_eq!(v["error"]["code"], "insufficient_capacity");
        assert_eq!(v["error"]["message"], "no room");
        assert_eq!(v["error"]["dimension"], "cpu_millicores");
        assert_eq!(v.as_object().map(|o| o.len()), Some(1));
    }

    #[tokio::test]
    async fn an_unknown_route_is_a_json_404() {
        let res = no_route("/v1/streams/a/b".parse().unwrap()).await;
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
        let body = http_body_util::BodyExt::collect(res.into_body())
            .await
            .unwrap()
            .to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "not_found");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v1/streams/a/b"));
    }

    #[test]
    fn the_plain_envelope_has_exactly_code_and_message() {
        let v = envelope("not_found", "no such stream", []);
        assert_eq!(v["error"].as_object().map(|o| o.len()), Some(2));
    }
}
