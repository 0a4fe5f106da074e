//! kiln-http: the HTTP plumbing that kilnd and kiln-scheduler share, so their control APIs behave the same.
//!
//! - [`error`]: the one JSON error envelope, `{"error": {"code", "message", …}}`, with its status code.
//! - [`auth`]: the fleet's bearer token: the constant-time check, the route layer that requires it (401 with an
//!   RFC 6750 challenge otherwise) and the reader that takes it from an environment variable.
//! - [`openapi`]: what both OpenAPI documents share (the envelope's schema, the documented token gate, the served
//!   `/v1/openapi.json`).
//! - [`shutdown`]: the process signal handling both binaries use (SIGINT/SIGTERM start a graceful stop; a second
//!   signal exits at once).
//! - [`process`]: the runtime and logging set-up both binaries start with.
//! - [`server`]: the accept loop with a connection cap, header/idle timeouts, h2c/TLS, and a graceful drain.
//! - `http2`: hyper's HTTP/2 connections with a send stall limit per stream and an idle limit per connection;
//!   [`connection_waiting`] counts a connection's parked requests.
//! - [`h1`]: HTTP/1.1 of our own for the requests a service answers from their head alone (kilnd's playback GETs
//!   on plain TCP); every other request, and the rest of its connection, is hyper's.
//! - [`lend`]: a parked request's socket lent to the producer of its answer, which writes it itself.
//!
//! Nothing here knows about streams, jobs or nodes: handlers build their own error codes and call [`error::json_error`].

pub mod auth;
pub mod error;
pub mod h1;
mod http2;
pub mod lend;
pub mod openapi;
pub mod process;
pub mod server;
pub mod shutdown;
mod stall;

pub use auth::{bearer_ok, require_bearer, token_from_env, TokenError};
pub use error::{json_error, json_error_with, no_route};
pub use http2::connection_waiting;
pub use shutdown::shutdown_signal;
