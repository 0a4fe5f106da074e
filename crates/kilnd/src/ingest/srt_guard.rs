//! The SRT port's guard: a UDP relay between the public port and `srt-tokio`'s listener on loopback, so that no
//! datagram reaches the library that would make it panic.
//!
//! srt-protocol 0.4.4 panics (`unimplemented!`, `panic!`) on some packets a peer controls: a handshake extension it
//! does not know (type 7 is libsrt's FEC `packetfilter`), a malformed loss list, a conclusion carrying a key-material
//! *response*. A panic ends its listener task and with it every SRT connection on the port. The guard parses each
//! datagram with the library's own parser first, inside `catch_unwind`, and drops what does not parse, panics, or
//! is a handshake the listener would panic on; the rest goes to the listener unchanged.
//!
//! Each peer gets its own loopback socket (the listener tells its connections apart by source address), whose
//! answers go back out of the public port. Peers are capped at [`MAX_PEERS`] and forgotten after the idle time, so
//! spoofed source addresses cannot grow memory: the listener, too, only ever sees these loopback addresses.

use std::collections::HashMap;
use std::io::Cursor;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use srt_protocol::packet::{
    ControlPacket, ControlTypes, HandshakeVsInfo, Packet, SrtControlPacket,
};
use tokio::net::UdpSocket;
use tokio::sync::watch;

/// Peers relayed at once; datagrams from further new peers are dropped until one is forgotten.
pub const MAX_PEERS: usize = 1024;

/// Loopback address of a relay → the public address of its peer (what the listener reports as "remote").
pub type PeerMap = Arc<Mutex<HashMap<SocketAddr, SocketAddr>>>;

/// Whether `bytes` may go to the listener: it parses (without panicking), and a handshake carries no
/// key-material response (srt-protocol's listener panics on one).
pub fn admissible(bytes: &[u8], ipv6: bool) -> bool {
    quiet_library_panics();
    let parsed = std::panic::catch_unwind(|| Packet::parse(&mut Cursor::new(bytes), ipv6));
    match parsed {
        Ok(Ok(Packet::Control(ControlPacket {
            control_type: ControlTypes::Handshake(hs),
            ..
        }))) => match &hs.info {
            HandshakeVsInfo::V5(v5) => matches!(
                v5.ext_km,
                None | Some(SrtControlPacket::KeyRefreshRequest(_))
            ),
            HandshakeVsInfo::V4(_) => true,
        },
        Ok(Ok(_)) => true,
        Ok(Err(_)) | Err(_) => false,
    }
}

/// The library's panics on hostile input are expected and caught: they go to the debug log, not to stderr.
fn quiet_library_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let from_srt = info
                .location()
                .is_some_and(|l| l.file().contains("srt-protocol"));
            if from_srt {
                tracing::debug!(%info, "srt-protocol panicked on a datagram (dropped)");
            } else {
                default(info);
            }
        }));
    });
}

struct Relay {
    sock: Arc<UdpSocket>,
    /// Unix ms of the last datagram either way.
    last: Arc<AtomicU64>,
}

fn now_ms(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

/// Relays datagrams between `public` and the listener at `*inner` until `public` fails.
pub async fn run(
    public: UdpSocket,
    inner: watch::Receiver<SocketAddr>,
    peers: PeerMap,
    idle: Duration,
) {
    let public = Arc::new(public);
    let ipv6 = public.local_addr().is_ok_and(|a| a.is_ipv6());
    let relays: Arc<Mutex<HashMap<SocketAddr, Relay>>> = Arc::new(Mutex::new(HashMap::new()));
    let start = Instant::now();
    let mut buf = vec![0u8; 2048];
    let mut dropped = 0u64;
    loop {
        let (n, peer) = match public.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "SRT port: receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if !admissible(&buf[..n], ipv6) {
            dropped += 1;
            if dropped.is_power_of_two() {
                tracing::warn!(%peer, dropped, "SRT port: dropped datagrams that are not SRT the listener can take");
            }
            continue;
        }
        let existing = relays
            .lock()
            .get(&peer)
            .map(|r| (r.sock.clone(), r.last.clone()));
        let (sock, last) = match existing {
            Some(r) => r,
            None => {
                if relays.lock().len() >= MAX_PEERS {
                    continue;
                }
                let target = *inner.borrow();
                match open_relay(&public, peer, target, &relays, &peers, idle, start).await {
                    Some(r) => r,
                    None => continue,
                }
            }
        };
        last.store(now_ms(start), Ordering::Relaxed);
        // never wait on one peer: a full loopback buffer drops, as the network would
        let _ = sock.try_send(&buf[..n]);
    }
}

/// A loopback socket for `peer`, connected to the listener, and the task that sends its answers back to `peer`.
async fn open_relay(
    public: &Arc<UdpSocket>,
    peer: SocketAddr,
    target: SocketAddr,
    relays: &Arc<Mutex<HashMap<SocketAddr, Relay>>>,
    peers: &PeerMap,
    idle: Duration,
    start: Instant,
) -> Option<(Arc<UdpSocket>, Arc<AtomicU64>)> {
    let local: IpAddr = match target {
        SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
        SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
    };
    let sock = UdpSocket::bind(SocketAddr::new(local, 0)).await.ok()?;
    sock.connect(target).await.ok()?;
    let here = sock.local_addr().ok()?;
    let sock = Arc::new(sock);
    let last = Arc::new(AtomicU64::new(now_ms(start)));
    relays.lock().insert(
        peer,
        Relay {
            sock: sock.clone(),
            last: last.clone(),
        },
    );
    peers.lock().insert(here, peer);
    let (public, relays, peers) = (public.clone(), relays.clone(), peers.clone());
    let (s, l) = (sock.clone(), last.clone());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        loop {
            let quiet = now_ms(start).saturating_sub(l.load(Ordering::Relaxed));
            let left = idle.saturating_sub(Duration::from_millis(quiet));
            if left.is_zero() {
                break;
            }
            match tokio::time::timeout(left, s.recv(&mut buf)).await {
                Ok(Ok(n)) => {
                    l.store(now_ms(start), Ordering::Relaxed);
                    let _ = public.send_to(&buf[..n], peer).await;
                }
                Ok(Err(_)) => break,
                Err(_) => {} // re-check the idle time (the peer may have sent meanwhile)
            }
        }
        relays.lock().remove(&peer);
        peers.lock().remove(&here);
    });
    Some((sock, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_the_library_panics_on_are_not_admitted() {
        // a conclusion handshake with a config extension of type 6: srt-protocol 0.4.4 hits `unimplemented!`
        let mut crafted = vec![0x80, 0, 0, 0];
        crafted.extend_from_slice(&[0; 12]);
        for w in [5u32, 4, 1234, 1500, 8192, u32::MAX, 0x1111, 0, 0, 0, 0, 0] {
            crafted.extend_from_slice(&w.to_be_bytes());
        }
        crafted.extend_from_slice(&[0, 6, 0, 1, b'l', b'i', b'v', b'e']);
        assert!(!admissible(&crafted, false));
        // too short, and random bytes
        assert!(!admissible(&[0x80, 0, 0], false));
        // a keep-alive control packet parses and goes through
        let keepalive = [0x80, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert!(admissible(&keepalive, false));
    }
}
