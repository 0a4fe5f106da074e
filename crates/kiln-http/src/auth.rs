//! The fleet's bearer token (RFC 6750) on control routes.
//!
//! One token is shared by the scheduler, the daemons and `kilnctl`. It is read from an environment variable (never
//! a flag: flags show in `ps`), must be at least [`MIN_TOKEN_LEN`] bytes without white space, and is compared in
//! constant time. Routes behind [`require_bearer`] answer 401 with a `WWW-Authenticate: Bearer` challenge and the
//! JSON envelope when the header is missing or wrong.

use std::sync::Arc;

use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use utoipa_axum::router::OpenApiRouter;

/// The shortest token accepted (128 bits of a random hex or base64 string is longer than this).
pub const MIN_TOKEN_LEN: usize = 16;

/// Whether an `Authorization` header value carries `token` as a bearer token (RFC 6750). The comparison takes the
/// same time wherever the first difference is, so response timing does not reveal a token prefix.
pub fn bearer_ok(header: Option<&str>, token: &str) -> bool {
    let Some(h) = header else { return false };
    let Some((scheme, given)) = h.trim().split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return false;
    }
    let (a, b) = (given.trim().as_bytes(), token.as_bytes());
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    !token.is_empty() && diff == 0
}

/// Why a token could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("environment variable {0} (API token) is not set")]
    Unset(String),
    #[error("the API token in {0} must be at least {MIN_TOKEN_LEN} bytes, without spaces")]
    Weak(String),
}

/// Reads the fleet token from environment variable `var`.
pub fn token_from_env(var: &str) -> Result<String, TokenError> {
    let t = std::env::var(var).map_err(|_| TokenError::Unset(var.to_string()))?;
    check_token(var, t)
}

fn check_token(var: &str, t: String) -> Result<String, TokenError> {
    if t.len() < MIN_TOKEN_LEN || t.chars().any(char::is_whitespace) {
        return Err(TokenError::Weak(var.to_string()));
    }
    Ok(t)
}

/// Puts every route of `router` behind the bearer token when one is configured; `None` leaves them open. `hint`
/// ends the 401 message and says where the token comes from (e.g. "the token kilnd was started with:
/// --api-token-env"). Either way the routes' document entries gain the token's security requirement and the 401.
pub fn require_bearer<S>(
    router: OpenApiRouter<S>,
    token: Option<&str>,
    hint: &'static str,
) -> OpenApiRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    let router = crate::openapi::document_bearer(router);
    let Some(token) = token else { return router };
    let token: Arc<str> = token.into();
    router.route_layer(axum::middleware::from_fn(
        move |req: Request, next: Next| {
            let token = token.clone();
            async move {
                let given = req
                    .headers()
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok());
                if bearer_ok(given, &token) {
                    next.run(req).await
                } else {
                    unauthorized(hint)
                }
            }
        },
    ))
}

/// 401 with a `WWW-Authenticate` challenge (RFC 6750) and the JSON envelope.
pub fn unauthorized(hint: &str) -> Response {
    let mut r = crate::json_error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        format!("this API needs `Authorization: Bearer <token>` ({hint})"),
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer realm=\"kiln\""),
    );
    r.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::Router;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    #[test]
    fn only_the_exact_bearer_token_passes() {
        assert!(bearer_ok(Some("Bearer s3cret-token"), "s3cret-token"));
        assert!(bearer_ok(Some("bearer s3cret-token"), "s3cret-token"));
        for bad in [
            None,
            Some(""),
            Some("Bearer"),
            Some("Bearer s3cret-toke"),
            Some("Bearer s3cret-token2"),
            Some("Basic s3cret-token"),
            Some("s3cret-token"),
        ] {
            assert!(!bearer_ok(bad, "s3cret-token"), "{bad:?}");
        }
        assert!(
            !bearer_ok(Some("Bearer "), ""),
            "an empty token never matches"
        );
    }

    #[test]
    fn weak_tokens_are_refused() {
        assert_eq!(
            check_token("T", "short".into()),
            Err(TokenError::Weak("T".into()))
        );
        assert_eq!(
            check_token("T", "sixteen bytes ok".into()),
            Err(TokenError::Weak("T".into())),
            "white space"
        );
        assert_eq!(
            check_token("T", "0123456789abcdef".into()).as_deref(),
            Ok("0123456789abcdef")
        );
        assert_eq!(
            token_from_env("KILN_HTTP_TEST_SURELY_UNSET"),
            Err(TokenError::Unset("KILN_HTTP_TEST_SURELY_UNSET".into()))
        );
    }

    async fn call(app: Router, auth: Option<&str>) -> (StatusCode, Option<String>, String) {
        let mut req = axum::http::Request::get("/x");
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        let res = app.oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
        let status = res.status();
        let challenge = res
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .map(|v| v.to_str().unwrap().to_string());
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, challenge, String::from_utf8(body.to_vec()).unwrap())
    }

    #[utoipa::path(get, path = "/x", responses((status = 200, description = "in")))]
    async fn x() -> &'static str {
        "in"
    }

    fn gated(token: Option<&str>) -> (Router, utoipa::openapi::OpenApi) {
        require_bearer(
            OpenApiRouter::new().routes(utoipa_axum::routes!(x)),
            token,
            "test",
        )
        .split_for_parts()
    }

    #[tokio::test]
    async fn the_gate_answers_401_with_a_challenge_and_passes_the_token() {
        let app = || gated(Some("0123456789abcdef")).0;
        let (st, ch, body) = call(app(), None).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        assert_eq!(ch.as_deref(), Some("Bearer realm=\"kiln\""));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "unauthorized");
        let (st, _, _) = call(app(), Some("Bearer wrong-token-000000")).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        let (st, _, body) = call(app(), Some("Bearer 0123456789abcdef")).await;
        assert_eq!((st, body.as_str()), (StatusCode::OK, "in"));
        // no token configured: open
        let (open, doc) = gated(None);
        assert_eq!(call(open, None).await.0, StatusCode::OK);
        // documented either way: the requirement (or none) and the 401
        let op = serde_json::to_value(&doc.paths.paths["/x"]).unwrap();
        assert!(op["get"]["responses"]["401"].is_object(), "{op}");
        assert_eq!(
            op["get"]["security"][0],
            serde_json::json!({"fleet_token": []})
        );
        assert_eq!(op["get"]["security"][1], serde_json::json!({}));
    }
}
