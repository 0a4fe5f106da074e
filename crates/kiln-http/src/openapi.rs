//! The OpenAPI 3.1 documents of kilnd's and kiln-scheduler's APIs, built from the same registrations as the routers
//! (utoipa-axum's `routes!`), so a route cannot exist without its document entry or the reverse.
//!
//! Each handler carries `#[utoipa::path]` with every status it answers; request and response bodies are the wire
//! types' own schemas (`#[derive(utoipa::ToSchema)]` next to their serde derives). What is shared lives here: the
//! error envelope's schema, the bearer-token gate that also documents itself on the routes it guards (the
//! security requirement and the 401), routes whose last parameter spans several path segments, and
//! `GET /v1/openapi.json`, which serves the document.

use std::sync::Arc;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, ResponseBuilder};
use utoipa::ToSchema;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};

/// The name of the fleet token's security scheme (HTTP bearer, RFC 6750).
pub const BEARER_SCHEME: &str = "fleet_token";

/// `{"error": {"code", "message", …}}`: every error either API answers (see [`crate::error`]).
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct ErrorEnvelope {
    pub error: ErrorDetail,
}

/// The inside of [`ErrorEnvelope`]. Some codes add fields beside these (e.g. `insufficient_capacity`:
/// `dimension`, `requested`, `free`).
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable word clients branch on: `bad_request`, `not_found`, `conflict`, `stale_epoch`,
    /// `insufficient_capacity`, `unauthorized`, `not_leader`, …
    pub code: String,
    /// What went wrong and what to do about it.
    pub message: String,
}

/// Every operation of a path item.
fn operations_mut(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.options,
        &mut item.head,
        &mut item.patch,
        &mut item.trace,
    ]
    .into_iter()
    .filter_map(Option::as_mut)
}

/// A response with the error envelope as its JSON body.
fn error_response(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorEnvelope")))
                .build(),
        )
        .build()
}

/// Documents that every route of `router` takes the fleet token (when the process has one: the requirement lists
/// the empty alternative too) and may answer 401.
pub(crate) fn document_bearer<S>(mut router: OpenApiRouter<S>) -> OpenApiRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    for item in router.get_openapi_mut().paths.paths.values_mut() {
        for op in operations_mut(item) {
            op.security = Some(vec![
                SecurityRequirement::new(BEARER_SCHEME, Vec::<String>::new()),
                SecurityRequirement::default(),
            ]);
            op.responses.responses.insert(
                "401".into(),
                error_response("The fleet token is required and was missing or wrong (`WWW-Authenticate: Bearer`)")
                    .into(),
            );
        }
    }
    router
}

/// Registers handlers (a `routes!` list) whose path ends in a parameter that spans the rest of the path
/// (`/vod/{id}/{path}` documented, `/vod/{id}/{*path}` routed): OpenAPI has no multi-segment parameter, axum
/// needs the `*`. Everything else is what [`OpenApiRouter::routes`] does.
pub fn routes_with_rest<S>(
    mut router: OpenApiRouter<S>,
    (schemas, paths, method_router): UtoipaMethodRouter<S>,
    rest: &str,
) -> OpenApiRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    let (documented, routed) = (format!("{{{rest}}}"), format!("{{*{rest}}}"));
    for path in paths.paths.keys() {
        assert!(
            path.ends_with(&documented),
            "{path} does not end in {documented}"
        );
        let axum_path = format!("{}{routed}", &path[..path.len() - documented.len()]);
        router = router.route(&axum_path, method_router.clone());
    }
    let api = router.get_openapi_mut();
    for (path, item) in paths.paths {
        match api.paths.paths.get_mut(&path) {
            Some(it) => it.merge_operations(item),
            None => {
                api.paths.paths.insert(path, item);
            }
        }
    }
    api.components
        .get_or_insert_with(Default::default)
        .schemas
        .extend(schemas);
    router
}

/// Every 4xx either API answers is the JSON envelope, including the ones axum's extractors write as plain text
/// (a path parameter that is not UTF-8, a body over the limit, a query that does not parse): their text becomes
/// the message, with a code for the status. Other headers (e.g. `Allow`) are kept.
async fn envelope_rejections(res: Response) -> Response {
    let status = res.status();
    let plain = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("text/plain"));
    if !status.is_client_error() || !plain {
        return res;
    }
    let code = match status.as_u16() {
        400 => "bad_request",
        405 => "method_not_allowed",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        422 => "unprocessable",
        _ => "error",
    };
    let (parts, body) = res.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let mut r = crate::json_error(status, code, text);
    for (k, v) in &parts.headers {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            r.headers_mut().insert(k.clone(), v.clone());
        }
    }
    r
}

/// Documents what every operation with path parameters may also answer: 400 for a parameter that is not UTF-8
/// (percent-encoded bytes) and 404 for a path no route serves as sent (an empty segment), each the envelope.
fn document_path_errors(api: &mut OpenApi) {
    for (path, item) in api.paths.paths.iter_mut() {
        if !path.contains('{') {
            continue;
        }
        for op in operations_mut(item) {
            let responses = &mut op.responses.responses;
            if !responses.contains_key("400") {
                responses.insert(
                    "400".into(),
                    error_response("A path parameter is not valid UTF-8").into(),
                );
            }
            if !responses.contains_key("404") {
                responses.insert(
                    "404".into(),
                    error_response("No route serves the path as sent (e.g. an empty segment)")
                        .into(),
                );
            }
        }
    }
}

/// The served document (`/v1/openapi.json`).
#[derive(Debug, Clone)]
pub struct Document(pub Arc<str>);

/// `GET /v1/openapi.json`: this API's OpenAPI 3.1 document.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "meta",
    responses((status = 200, description = "This API's OpenAPI 3.1 document", content_type = "application/json"))
)]
pub async fn openapi_json(Extension(doc): Extension<Document>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        doc.0.to_string(),
    )
        .into_response()
}

/// Finishes an API: adds `/v1/openapi.json`, the title, version and description, the fleet token's scheme and the
/// error envelope's schema; returns the router (serving the document) and the document.
pub fn finish(router: OpenApiRouter, title: &str, description: &str) -> (Router, OpenApi) {
    let (router, mut api) = router
        .routes(utoipa_axum::routes!(openapi_json))
        .split_for_parts();
    document_path_errors(&mut api);
    api.info.title = title.into();
    api.info.version = env!("CARGO_PKG_VERSION").into();
    api.info.description = Some(description.into());
    api.info.license = None;
    api.info.contact = None;
    let components = api.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        BEARER_SCHEME,
        SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
    );
    let mut schemas = Vec::new();
    <ErrorEnvelope as ToSchema>::schemas(&mut schemas);
    components.schemas.extend(schemas);
    components.schemas.insert(
        "ErrorEnvelope".into(),
        <ErrorEnvelope as utoipa::PartialSchema>::schema(),
    );
    let json = serde_json::to_string(&api).expect("an OpenAPI document serializes");
    let router = router
        .layer(axum::middleware::map_response(envelope_rejections))
        .layer(Extension(Document(json.into())));
    (router, api)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::extract::Path;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    #[utoipa::path(get, path = "/n/{n}", params(("n" = u32, Path)), responses((status = 200, description = "n")))]
    async fn n(Path(n): Path<u32>) -> String {
        n.to_string()
    }

    #[tokio::test]
    async fn extractor_rejections_become_the_envelope_and_path_errors_are_documented() {
        let (router, api) = finish(
            OpenApiRouter::new().routes(utoipa_axum::routes!(n)),
            "t",
            "d",
        );
        let res = router
            .oneshot(Request::get("/n/abc").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST);
        assert_eq!(res.headers()[header::CONTENT_TYPE], "application/json");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "bad_request");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("parse"),
            "{v}"
        );
        let op = serde_json::to_value(&api.paths.paths["/n/{n}"]).unwrap();
        for status in ["200", "400", "404"] {
            assert!(op["get"]["responses"][status].is_object(), "{status}: {op}");
        }
        assert!(api.paths.paths.contains_key("/v1/openapi.json"));
    }
}
