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
    ControlPacket, ControlTypes, HandshakeVsInfo, Packet, ShakeType, SrtControlPacket,
};
use tokio::net::UdpSocket;
use tokio::sync::watch;

/// Peers relayed at once; datagrams from further new peers are dropped until one is forgotten.
pub const MAX_PEERS: usize = 1024;
/// Peers relayed at once from one IP address (one host cannot fill the table).
pub const MAX_PEERS_PER_IP: usize = 16;

/// Loopback address of a relay → the public address of its peer (what the listener reports as "remote").
pub type PeerMap = Arc<Mutex<HashMap<SocketAddr, SocketAddr>>>;

/// What a datagram is, for the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Drop it: it does not parse, makes the parser panic, or is a packet the library panics or stalls on later.
    Refuse,
    /// The first packet of a connection (an induction handshake): it may open a relay for a new peer.
    Induction,
    /// Anything else the library takes: it goes to an existing relay only.
    Pass,
}

/// Classifies a datagram (see [`Verdict`]). Refused, besides what does not parse:
/// - control packets srt-protocol 0.4.4's connections panic on (`todo!`, `unimplemented!`): congestion warnings,
///   peer errors, SRT control packets other than key-material refreshes;
/// - a v5 conclusion without an SRT handshake request (the listener then never answers, and the stream would stay
///   claimed until the accept times out), or with a key-material *response* (the listener panics);
/// - rendezvous handshakes and rejections (not for a listener).
pub fn classify(bytes: &[u8], ipv6: bool) -> Verdict {
    quiet_classify_panics();
    let parsed = QUIET.with(|q| {
        q.set(true);
        let r = std::panic::catch_unwind(|| Packet::parse(&mut Cursor::new(bytes), ipv6));
        q.set(false);
        r
    });
    let control = match parsed {
        Ok(Ok(Packet::Control(ControlPacket { control_type, .. }))) => control_type,
        Ok(Ok(Packet::Data(_))) => return Verdict::Pass,
        Ok(Err(_)) | Err(_) => return Verdict::Refuse,
    };
    match control {
        ControlTypes::Handshake(hs) => match (&hs.shake_type, &hs.info) {
            (ShakeType::Induction, _) => Verdict::Induction,
            (ShakeType::Conclusion, HandshakeVsInfo::V5(v5)) => {
                let request = matches!(v5.ext_hs, Some(SrtControlPacket::HandshakeRequest(_)));
                let km = matches!(
                    v5.ext_km,
                    None | Some(SrtControlPacket::KeyRefreshRequest(_))
                );
                if request && km {
                    Verdict::Pass
                } else {
                    Verdict::Refuse
                }
            }
            (ShakeType::Conclusion, HandshakeVsInfo::V4(_)) => Verdict::Pass,
            _ => Verdict::Refuse,
        },
        ControlTypes::CongestionWarning | ControlTypes::PeerError(_) => Verdict::Refuse,
        ControlTypes::Srt(
            SrtControlPacket::KeyRefreshRequest(_) | SrtControlPacket::KeyRefreshResponse(_),
        ) => Verdict::Pass,
        ControlTypes::Srt(_) => Verdict::Refuse,
        _ => Verdict::Pass,
    }
}

std::thread_local! {
    /// Set while [`classify`] parses: the panics it catches are expected and must not reach stderr.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Panics that [`classify`] catches go to the debug log; every other panic keeps the default hook.
fn quiet_classify_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET.with(|q| q.get()) {
                tracing::debug!(%info, "srt-protocol panicked on a datagram (dropped)");
            } else {
                default(info);
            }
        }));
    });
}

struct Relay {
    sock: Arc<UdpSocket>,
    /// The listener address it relays to (a re-bound listener gets new relays).
    target: SocketAddr,
    /// Milliseconds (since the guard started) of the last datagram either way.
    last: Arc<AtomicU64>,
}

type Relays = Arc<Mutex<HashMap<SocketAddr, Relay>>>;

fn now_ms(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

/// Relays datagrams between `public` and the listener at `*inner`, for good.
pub async fn run(
    public: UdpSocket,
    inner: watch::Receiver<SocketAddr>,
    peers: PeerMap,
    idle: Duration,
) {
    let public = Arc::new(public);
    let ipv6 = public.local_addr().is_ok_and(|a| a.is_ipv6());
    let relays: Relays = Arc::new(Mutex::new(HashMap::new()));
    let start = Instant::now();
    let mut buf = vec![0u8; 2048];
    let (mut dropped, mut opened) = (0u64, 0u32);
    loop {
        let (n, peer) = match public.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "SRT port: receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let verdict = classify(&buf[..n], ipv6);
        if verdict == Verdict::Refuse {
            dropped += 1;
            if dropped.is_power_of_two() {
                tracing::warn!(%peer, dropped, "SRT port: dropped datagrams the SRT listener cannot take");
            }
            continue;
        }
        let target = *inner.borrow();
        let existing = relays
            .lock()
            .get(&peer)
            .filter(|r| r.target == target)
            .map(|r| (r.sock.clone(), r.last.clone()));
        let (sock, last) = match existing {
            Some(r) => r,
            // only a connection's first packet opens a relay, within the caps
            None if verdict != Verdict::Induction => continue,
            None => {
                {
                    let r = relays.lock();
                    let same_ip = r.keys().filter(|a| a.ip() == peer.ip()).count();
                    if r.len() >= MAX_PEERS || same_ip >= MAX_PEERS_PER_IP {
                        continue;
                    }
                }
                opened = opened.wrapping_add(1);
                let relay = RelayTo {
                    public: public.clone(),
                    peer,
                    target,
                    n: opened,
                };
                match relay.open(&relays, &peers, idle, start).await {
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

/// A relay to open: for `peer`, to the listener at `target`, the `n`th opened.
struct RelayTo {
    public: Arc<UdpSocket>,
    peer: SocketAddr,
    target: SocketAddr,
    n: u32,
}

impl RelayTo {
    /// A loopback socket for the peer, connected to the listener, and the task that sends the listener's answers
    /// back to the peer until both sides have been quiet for `idle`. IPv4 relays take a different address of
    /// 127/8 each time, so a relay's address does not come back soon: the listener never forgets an address that
    /// once started a handshake, and would answer a new peer there with an old connection's state.
    async fn open(
        self,
        relays: &Relays,
        peers: &PeerMap,
        idle: Duration,
        start: Instant,
    ) -> Option<(Arc<UdpSocket>, Arc<AtomicU64>)> {
        let local: IpAddr = match self.target {
            // 127.1.0.1 … 127.254.255.255
            SocketAddr::V4(_) => {
                let host = self.n % (254 * 65_536 - 1) + 1;
                Ipv4Addr::new(127, 1 + (host >> 16) as u8, (host >> 8) as u8, host as u8).into()
            }
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        };
        let sock = UdpSocket::bind(SocketAddr::new(local, 0)).await.ok()?;
        sock.connect(self.target).await.ok()?;
        let here = sock.local_addr().ok()?;
        let sock = Arc::new(sock);
        let last = Arc::new(AtomicU64::new(now_ms(start)));
        relays.lock().insert(
            self.peer,
            Relay {
                sock: sock.clone(),
                target: self.target,
                last: last.clone(),
            },
        );
        peers.lock().insert(here, self.peer);
        let (relays, peers) = (relays.clone(), peers.clone());
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
                        let _ = self.public.send_to(&buf[..n], self.peer).await;
                    }
                    Ok(Err(_)) => break, // e.g. the listener's port is gone
                    Err(_) => {} // re-check the idle time (the peer may have sent meanwhile)
                }
            }
            // a newer relay for the same peer (after a re-bind) stays
            {
                let mut r = relays.lock();
                if r.get(&self.peer).is_some_and(|r| Arc::ptr_eq(&r.sock, &s)) {
                    r.remove(&self.peer);
                }
            }
            peers.lock().remove(&here);
        });
        Some((sock, last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshake(words: [u32; 12], extensions: &[u8]) -> Vec<u8> {
        let mut p = vec![0x80, 0, 0, 0];
        p.extend_from_slice(&[0; 12]);
        for w in words {
            p.extend_from_slice(&w.to_be_bytes());
        }
        p.extend_from_slice(extensions);
        p
    }

    #[test]
    fn datagrams_the_library_panics_or_stalls_on_are_refused() {
        // a conclusion with a config extension of type 6: srt-protocol 0.4.4's parser hits `unimplemented!`
        let crafted = handshake(
            [5, 4, 1234, 1500, 8192, u32::MAX, 0x1111, 0, 0, 0, 0, 0],
            &[0, 6, 0, 1, b'l', b'i', b'v', b'e'],
        );
        assert_eq!(classify(&crafted, false), Verdict::Refuse);
        // a v5 conclusion without any extension: the listener would never answer it
        let bare = handshake(
            [5, 0, 1234, 1500, 8192, u32::MAX, 0x1111, 0, 0, 0, 0, 0],
            &[],
        );
        assert_eq!(classify(&bare, false), Verdict::Refuse);
        // an induction opens a relay
        let induction = handshake([4, 2, 1234, 1500, 8192, 1, 0x1111, 0, 0, 0, 0, 0], &[]);
        assert_eq!(classify(&induction, false), Verdict::Induction);
        assert_eq!(classify(&[0x80, 0, 0], false), Verdict::Refuse, "too short");
        let keepalive = [0x80, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(classify(&keepalive, false), Verdict::Pass);
        // a congestion warning (type 4) parses, but a connection would hit `todo!`
        let warning = [0x80, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(classify(&warning, false), Verdict::Refuse);
    }
}
