//! The SRT listener: one UDP port for every publisher, routed by SRT stream id (`#!::r=<stream>,m=publish`).
//! `srt-tokio` hands each connection request to this module before it answers, so a request is refused at the
//! protocol level (an SRT reject reason) when its stream does not exist, is busy, or the publisher did not
//! encrypt; otherwise it is accepted with that stream's passphrase, and a publisher with the wrong passphrase
//! fails the key exchange (`BADSECRET`) and never gets a socket. What an accepted publisher sends (MPEG-TS) goes
//! to the stream's pipeline as it arrives.
//!
//! The public port belongs to [`super::srt_guard`], which relays only datagrams the library can take to the
//! listener on a loopback port. `srt-tokio` runs every connection in one listener task; should that task still stop,
//! a new listener is bound (on a new loopback port the guard then relays to) and new publishers can connect.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kiln_model::ingest::{Protocol, SrtStreamId};
use srt_tokio::access::{RejectReason, ServerRejectReason};
use srt_tokio::options::{KeySize, Passphrase};
use srt_tokio::{ConnectionRequest, SrtListener};
use tokio::net::UdpSocket;

use super::srt_guard::{self, PeerMap};
use super::{authorize, reject, Session};
use crate::config::IngestConfig;
use crate::supervisor::{Refusal, Supervisor};

/// A loopback socket for the listener, of the public port's address family.
async fn inner_socket(v6: bool) -> std::io::Result<UdpSocket> {
    let ip: std::net::IpAddr = if v6 {
        Ipv6Addr::LOCALHOST.into()
    } else {
        Ipv4Addr::LOCALHOST.into()
    };
    UdpSocket::bind(SocketAddr::new(ip, 0)).await
}

pub(super) async fn serve(public: UdpSocket, sup: Arc<Supervisor>, cfg: Arc<IngestConfig>) {
    let Ok(addr) = public.local_addr() else {
        return;
    };
    let peers: PeerMap = Default::default();
    let mut next = match inner_socket(addr.is_ipv6()).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(%addr, error = %e, "SRT ingest: no loopback socket for the listener");
            return;
        }
    };
    let first = next
        .as_ref()
        .and_then(|s| s.local_addr().ok())
        .unwrap_or(addr);
    let (inner_tx, inner_rx) = tokio::sync::watch::channel(first);
    // the guard forgets a peer a little after the listener would (its peer idle timeout)
    let forget = cfg.idle_timeout + Duration::from_secs(5);
    tokio::spawn(srt_guard::run(public, inner_rx, peers.clone(), forget));
    loop {
        let sock = match next.take() {
            Some(s) => s,
            None => match inner_socket(addr.is_ipv6()).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(%addr, error = %e, "SRT listener: no loopback socket");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        let Ok(inner) = sock.local_addr() else {
            continue;
        };
        let bound = SrtListener::builder()
            .latency(cfg.srt_latency)
            .set(|o| o.session.peer_idle_timeout = cfg.idle_timeout)
            .socket(sock)
            .bind(inner)
            .await;
        let (_listener, mut incoming) = match bound {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(%addr, error = %e, "SRT listener failed to start");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let _ = inner_tx.send(inner);
        tracing::info!(%addr, %inner, "SRT ingest listening");
        while let Some(request) = incoming.incoming().next().await {
            let (sup, cfg, peers) = (sup.clone(), cfg.clone(), peers.clone());
            tokio::spawn(handle(request, sup, cfg, peers));
        }
        tracing::error!(%addr, "the SRT listener stopped: binding a new one");
    }
}

/// The SRT reject reason a publisher sees for a refusal.
fn reason(why: Refusal) -> RejectReason {
    RejectReason::Server(match why {
        Refusal::UnknownStream | Refusal::UnknownKey => ServerRejectReason::Notfound,
        Refusal::Busy => ServerRejectReason::Conflict,
        Refusal::AuthDenied => ServerRejectReason::Forbidden,
        Refusal::NoPassphrase => ServerRejectReason::Unauthorized,
        Refusal::Stopping => ServerRejectReason::Down,
        Refusal::AuthError | Refusal::Pipeline => ServerRejectReason::InternalServerError,
        _ => ServerRejectReason::BadRequest,
    })
}

async fn handle(
    request: ConnectionRequest,
    sup: Arc<Supervisor>,
    cfg: Arc<IngestConfig>,
    peers: PeerMap,
) {
    // the listener sees the guard's loopback relay; the publisher is the peer behind it
    let addr = peers
        .lock()
        .get(&request.remote())
        .copied()
        .unwrap_or_else(|| request.remote());
    match admit(&request, &sup, &cfg, addr).await {
        Ok((session, key_size)) => publish(session, request, key_size, &cfg).await,
        Err((why, detail)) => {
            reject(&sup.metrics().ingest, Protocol::Srt, why, addr, &detail);
            let _ = request.reject(reason(why)).await;
        }
    }
}

/// Decides a connection request before it is answered: a stream id naming a publish stream that is free, from a
/// publisher that encrypts. The stream is claimed for it.
async fn admit(
    request: &ConnectionRequest,
    sup: &Arc<Supervisor>,
    cfg: &Arc<IngestConfig>,
    addr: SocketAddr,
) -> Result<(Session, KeySize), (Refusal, String)> {
    let id = match request.stream_id().map(|s| SrtStreamId::parse(s.as_str())) {
        Some(Ok(id)) => id,
        Some(Err(e)) => return Err((Refusal::Protocol, e.to_string())),
        None => {
            return Err((
                Refusal::UnknownStream,
                "no stream id (use streamid=#!::r=<stream>,m=publish)".into(),
            ))
        }
    };
    // srt-tokio's handshake cannot answer a caller whose key size differs from ours, nor one without
    // encryption when we have a passphrase: both are refused here, before it is asked to.
    let key_size = request.key_size();
    if key_size == KeySize::Unspecified {
        return Err((
            Refusal::NoPassphrase,
            "the publisher did not set a passphrase".into(),
        ));
    }
    let (stream, publisher) = authorize(sup, cfg, Protocol::Srt, &id.resource, addr).await?;
    Ok((
        Session::new(sup.clone(), stream, publisher, cfg.clone()),
        key_size,
    ))
}

/// Accepts an admitted request with its stream's passphrase, starts the pipeline and feeds it until the
/// publisher leaves or is cut off.
async fn publish(
    mut session: Session,
    request: ConnectionRequest,
    key_size: KeySize,
    cfg: &IngestConfig,
) {
    let passphrase = session
        .stream
        .secrets
        .as_ref()
        .map(|s| s.passphrase.clone())
        .unwrap_or_default();
    let Ok(passphrase) = Passphrase::try_from(passphrase) else {
        return session.end(Some((
            Refusal::Pipeline,
            "the stream's passphrase is not a valid SRT passphrase".into(),
        )));
    };
    // SRT is one UDP port for everyone: a publisher whose pipeline is behind must not hold the port's
    // listener task, so a send waits at most 1 s (the feed queue and the appsrc hold seconds of media)
    session.max_wait = Duration::from_secs(1);
    let accept = request.accept(Some(srt_protocol::settings::KeySettings {
        key_size,
        passphrase,
    }));
    // the handshake may never complete (a caller that stops half-way): bounded, and a stop cuts it short
    let kick = session.publisher.clone();
    let accepted = tokio::select! {
        // a real caller completes the key exchange in a round trip or two
        r = tokio::time::timeout(cfg.idle_timeout.min(Duration::from_secs(3)), accept) => r,
        _ = kick.kick.notified() => {
            return session.end(Some((Refusal::Stopping, "the stream stopped".into())));
        }
    };
    let mut socket = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            // the key exchange failed: the publisher's passphrase is not the stream's
            return session.end(Some((
                Refusal::BadPassphrase,
                format!(
                    "the key exchange failed: the publisher's passphrase is not the stream's ({e})"
                ),
            )));
        }
        Err(_) => {
            return session.end(Some((
                Refusal::Timeout,
                "the SRT handshake did not complete".into(),
            )));
        }
    };
    if let Err(f) = session.attach().await {
        return session.end(Some(f));
    }
    let result = loop {
        tokio::select! {
            biased;
            _ = kick.kick.notified() => {
                break Some(match kick.kicked_for.lock().clone() {
                    Some(why) => why,
                    None => (Refusal::Stopping, "the stream stopped or its pipeline ended".into()),
                })
            }
            next = socket.next() => match next {
                Some(Ok((_, bytes))) => {
                    if let Err(f) = session.send(bytes).await {
                        break Some(f);
                    }
                }
                Some(Err(e)) => break Some((Refusal::Protocol, format!("receiving: {e}"))),
                None => break None, // the publisher closed (or went silent past the idle timeout)
            },
        }
    };
    session.end(result);
}
