//! Who may join the fleet, and where a node that joined may point the scheduler and its viewers.
//!
//! A heartbeat is more than a report: the URL in it receives the leader's commands (with the fleet token), the
//! VOD requests a scheduler passes on, and the viewers `/play` redirects. So `POST /v1/nodes/{id}/heartbeat` is
//! admitted only when all of these hold, checked in this order:
//!
//! 1. **Credential** ([`NodeAdmission::authenticate`]). `Authorization: Bearer <join token>` (`--node-token-env`),
//!    or the fleet token (`--api-token-env`), compared in constant time; missing or wrong: 401. The join token
//!    admits heartbeats and nothing else, so a node (or whoever takes a node's token) cannot create or delete
//!    streams. With neither token configured every heartbeat is refused (403 `fleet_closed`) unless the operator
//!    passes `--open-fleet` (a trusted network: demos, tests). In an open fleet anyone who reaches the port joins,
//!    but a live node's URL does not change until its heartbeat expires (409 `node_url_conflict`), so a forged
//!    heartbeat cannot re-point a running node.
//! 2. **Id** ([`NodeAdmission::check_id`]). With `--nodes ID,…`, only those ids (403 `node_not_allowed`).
//! 3. **Address** ([`parse_url`], then [`NodeAdmission::check_addresses`]). The URL is `http(s)://host[:port][/path]`
//!    without credentials, query or fragment (400). Its host must be a public or private (RFC 1918, fc00::/7)
//!    address, or in a network `--node-networks` adds (422 `node_url_refused`, naming the flag): loopback,
//!    link-local, the cloud metadata services (169.254.169.254, fd00:ec2::254), unspecified, multicast, broadcast
//!    and the other special-purpose ranges are refused by default ([`NodeNetworks`], on
//!    [`kiln_model::net::UrlPolicy`]). A host name is resolved when
//!    the node joins and every address must pass (the verdict is kept [`NAME_TTL`]); the daemon client resolves
//!    names through the same policy when it connects ([`PolicyResolver`]), so a name moved later to a refused
//!    address gets no commands.
//!
//! A holder of the join token is trusted like a node: it may join under any id and move a node's URL. Rotate the
//! token (restart the schedulers and the daemons with a new one) when a node is retired or compromised.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_model::net::{Cidr, UrlPolicy};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Networks a node URL may reach besides public addresses, without any flag: the private ranges nodes live in.
pub fn private_networks() -> Vec<Cidr> {
    [
        (IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)), 8),
        (IpAddr::V4(Ipv4Addr::new(172, 16, 0, 0)), 12),
        (IpAddr::V4(Ipv4Addr::new(192, 168, 0, 0)), 16),
        (IpAddr::V6(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0)), 7),
    ]
    .into_iter()
    .map(|(a, p)| Cidr::new(a, p).expect("valid prefix"))
    .collect()
}

/// Cloud metadata services that sit inside an allowed range (AWS's IPv6 endpoint is unique-local): refused unless
/// `--node-networks` names a network that holds them. The IPv4 endpoint (169.254.169.254) is link-local, refused
/// anyway.
const METADATA: [IpAddr; 1] = [IpAddr::V6(Ipv6Addr::new(
    0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254,
))];

/// The addresses a node URL may point at: public ones, [`private_networks`] (but not the cloud metadata
/// services), and the networks `--node-networks` adds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeNetworks {
    /// `--node-networks` (`any` turns the check off).
    pub extra: UrlPolicy,
}

impl NodeNetworks {
    /// `Ok` if a node URL may point at `ip`; the reason otherwise (`169.254.169.254 is a link-local address`).
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        let canonical = ip.to_canonical();
        if self.extra.allow.iter().any(|c| c.contains(ip)) {
            return Ok(());
        }
        if METADATA.contains(&canonical) {
            return Err(format!("{ip} is a cloud metadata service address"));
        }
        if private_networks().iter().any(|c| c.contains(canonical)) {
            return Ok(());
        }
        self.extra.check(ip).map_err(|d| d.to_string())
    }
}

/// How long a host name's verdict is kept before it is resolved again.
pub const NAME_TTL: Duration = Duration::from_secs(60);
/// A name that does not resolve within this is refused.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest advertised URL accepted.
const MAX_URL_LEN: usize = 2048;

/// Who may join, and where nodes may point (the scheduler's `--node-token-env`, `--open-fleet`, `--nodes`,
/// `--node-networks`).
#[derive(Clone)]
pub struct NodeAdmission {
    /// The join token heartbeats must carry (`--node-token-env`); the fleet token is accepted too.
    pub token: Option<String>,
    /// Admit heartbeats without a credential when no token is configured (`--open-fleet`).
    pub open: bool,
    /// Only these node ids may join (`--nodes`); `None`: any id.
    pub ids: Option<BTreeSet<String>>,
    /// Addresses a node URL may point at.
    pub networks: NodeNetworks,
}

impl std::fmt::Debug for NodeAdmission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeAdmission")
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("open", &self.open)
            .field("ids", &self.ids)
            .field("networks", &self.networks)
            .finish()
    }
}

/// Closed (no token, not open: nobody joins), any id, public and private addresses.
impl Default for NodeAdmission {
    fn default() -> Self {
        Self {
            token: None,
            open: false,
            ids: None,
            networks: NodeNetworks::default(),
        }
    }
}

/// How a heartbeat got in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// With the join token or the fleet token.
    Token,
    /// Without a credential, in an open fleet (`--open-fleet`).
    Open,
}

/// Why a heartbeat was not admitted. `api` maps each to its status and envelope code ([`JoinError::code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// 401: no or a wrong bearer token.
    #[error("heartbeats need `Authorization: Bearer <token>`: the join token (--node-token-env on the scheduler and on kilnd){}", if *.fleet_token { " or the fleet token (--api-token-env)" } else { "" })]
    Unauthorized { fleet_token: bool },
    /// 403: no token is configured and the fleet is not open.
    #[error("this scheduler admits no nodes: start it (and kilnd) with --node-token-env VAR, or with --api-token-env VAR; --open-fleet admits any node without a token (a trusted network only)")]
    Closed,
    /// 403: `--nodes` does not list the id.
    #[error("node `{0}` is not in this scheduler's --nodes list")]
    NotListed(String),
    /// 400: the URL is not `http(s)://host[:port][/path]`.
    #[error("url: {0}")]
    BadUrl(String),
    /// 422: the URL's host is (or resolves to) an address the policy refuses.
    #[error("{0}")]
    Refused(String),
    /// 409: an unauthenticated heartbeat would move a live node.
    #[error("node `{id}` is live at {url}: in an open fleet a node's URL changes only once its heartbeat has expired (three intervals); with a join token (--node-token-env) it changes at once")]
    Repoint { id: String, url: String },
}

impl JoinError {
    /// The envelope's `code`.
    pub fn code(&self) -> &'static str {
        match self {
            JoinError::Unauthorized { .. } => "unauthorized",
            JoinError::Closed => "fleet_closed",
            JoinError::NotListed(_) => "node_not_allowed",
            JoinError::BadUrl(_) => "bad_request",
            JoinError::Refused(_) => "node_url_refused",
            JoinError::Repoint { .. } => "node_url_conflict",
        }
    }
}

impl NodeAdmission {
    /// Whether the `Authorization` header admits a heartbeat. `fleet_token` is `--api-token-env`'s token.
    pub fn authenticate(
        &self,
        fleet_token: Option<&str>,
        authorization: Option<&str>,
    ) -> Result<Joined, JoinError> {
        let tokens: Vec<&str> = self
            .token
            .as_deref()
            .into_iter()
            .chain(fleet_token)
            .collect();
        if tokens.is_empty() {
            return if self.open {
                Ok(Joined::Open)
            } else {
                Err(JoinError::Closed)
            };
        }
        // every configured token is compared (each in constant time), so timing does not tell which one is set
        let ok = tokens
            .iter()
            .fold(false, |ok, t| kiln_http::bearer_ok(authorization, t) | ok);
        if ok {
            Ok(Joined::Token)
        } else {
            Err(JoinError::Unauthorized {
                fleet_token: fleet_token.is_some(),
            })
        }
    }

    /// Whether `--nodes` lets `id` join.
    pub fn check_id(&self, id: &str) -> Result<(), JoinError> {
        match &self.ids {
            Some(ids) if !ids.contains(id) => Err(JoinError::NotListed(id.to_string())),
            _ => Ok(()),
        }
    }

    /// Whether every address of a node's host is allowed: `addrs` are what `name` resolves to, or (no name) the
    /// literal address.
    pub fn check_addresses(&self, name: Option<&str>, addrs: &[IpAddr]) -> Result<(), JoinError> {
        if addrs.is_empty() {
            return Err(JoinError::Refused(format!(
                "node URL host {} resolves to no address",
                name.unwrap_or("?")
            )));
        }
        for ip in addrs {
            if let Err(why) = self.networks.check(*ip) {
                let what = match name {
                    Some(n) => format!("node URL host {n} resolves to {why}"),
                    None => format!("node URL host {why}"),
                };
                return Err(JoinError::Refused(format!("{what}; {}", hint(*ip))));
            }
        }
        Ok(())
    }
}

/// What a refusal says about the flag that would allow the address.
pub fn hint(ip: IpAddr) -> String {
    let net = match ip {
        IpAddr::V4(_) => format!("{ip}/32"),
        IpAddr::V6(_) => format!("{ip}/128"),
    };
    format!(
        "node URLs may point only at public and private (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, fc00::/7) \
         addresses unless the scheduler runs with --node-networks (e.g. {net})"
    )
}

/// A node URL's host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeHost {
    /// A literal address.
    Addr(IpAddr),
    /// A name (lower case), resolved against the policy before the node is admitted.
    Name(String),
}

/// Checks a node's advertised URL: `http(s)://host[:port][/path]`, no credentials, query, fragment, white space
/// or control characters (the URL is pasted into `Location` headers and daemon command URLs as it is).
pub fn parse_url(raw: &str) -> Result<NodeHost, JoinError> {
    let bad = |m: &str| Err(JoinError::BadUrl(m.to_string()));
    if raw.len() > MAX_URL_LEN {
        return bad("longer than 2048 bytes");
    }
    if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("must not contain white space or control characters");
    }
    let url = match reqwest::Url::parse(raw) {
        Ok(u) => u,
        Err(e) => {
            return Err(JoinError::BadUrl(format!(
                "not a URL ({e}); want http(s)://host:port"
            )))
        }
    };
    if !matches!(url.scheme(), "http" | "https") {
        return bad("must be http(s)://host:port");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return bad("must not carry credentials");
    }
    if url.query().is_some() || url.fragment().is_some() {
        return bad("must not have a query or a fragment");
    }
    let Some(host) = url.host_str() else {
        return bad("has no host");
    };
    // IPv6 literals come bracketed; the URL parser has already normalised IPv4 spellings (0x7f.1 → 127.0.0.1)
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    Ok(match bare.parse::<IpAddr>() {
        Ok(ip) => NodeHost::Addr(ip),
        Err(_) => NodeHost::Name(host.to_ascii_lowercase()),
    })
}

/// When a name was checked, and the outcome.
type Verdict = (Instant, Result<(), JoinError>);

/// Host-name verdicts, kept [`NAME_TTL`] so that a node's heartbeats do not resolve its name every interval.
#[derive(Debug, Default)]
pub struct Names {
    seen: parking_lot::Mutex<HashMap<String, Verdict>>,
}

/// Most names remembered (only authenticated heartbeats get this far).
const MAX_NAMES: usize = 4096;

impl Names {
    /// Whether a node URL host passes `policy`: a literal address is checked at once, a name is resolved (no lock
    /// is held while it resolves).
    pub async fn check(&self, admission: &NodeAdmission, host: &NodeHost) -> Result<(), JoinError> {
        let name = match host {
            NodeHost::Addr(ip) => return admission.check_addresses(None, &[*ip]),
            NodeHost::Name(n) => n,
        };
        if let Some((at, verdict)) = self.seen.lock().get(name) {
            if at.elapsed() < NAME_TTL {
                return verdict.clone();
            }
        }
        let verdict = match tokio::time::timeout(
            RESOLVE_TIMEOUT,
            tokio::net::lookup_host((name.as_str(), 0)),
        )
        .await
        {
            Err(_) => Err(JoinError::Refused(format!(
                "resolving node URL host {name} timed out"
            ))),
            Ok(Err(e)) => Err(JoinError::Refused(format!(
                "cannot resolve node URL host {name}: {e}"
            ))),
            Ok(Ok(addrs)) => {
                let addrs: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
                admission.check_addresses(Some(name), &addrs)
            }
        };
        let mut seen = self.seen.lock();
        if seen.len() >= MAX_NAMES {
            seen.retain(|_, (at, _)| at.elapsed() < NAME_TTL);
            if seen.len() >= MAX_NAMES {
                seen.clear();
            }
        }
        seen.insert(name.clone(), (Instant::now(), verdict.clone()));
        verdict
    }
}

/// The daemon client's resolver: the system resolver, keeping only the addresses the node policy allows, so a
/// node name that moves to a refused address after it joined is not connected to.
#[derive(Debug)]
pub struct PolicyResolver {
    pub networks: Arc<NodeNetworks>,
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.networks.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| format!("cannot resolve {host}: {e}"))?
                .collect();
            let ok: Vec<SocketAddr> = all
                .iter()
                .copied()
                .filter(|a| policy.check(a.ip()).is_ok())
                .collect();
            if ok.is_empty() {
                let why = all
                    .first()
                    .and_then(|a| policy.check(a.ip()).err())
                    .unwrap_or_else(|| "no address".to_string());
                return Err(
                    format!("node host {host} resolves to {why} (see --node-networks)").into(),
                );
            }
            let addrs: Addrs = Box::new(ok.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOIN: &str = "join-token-0123456789";
    const FLEET: &str = "fleet-token-0123456789";

    fn with(token: Option<&str>, open: bool) -> NodeAdmission {
        NodeAdmission {
            token: token.map(str::to_string),
            open,
            ..Default::default()
        }
    }

    #[test]
    fn a_heartbeat_joins_only_with_a_configured_token_or_in_an_open_fleet() {
        let bearer = |t: &str| format!("Bearer {t}");
        // the join token, or the fleet token: either admits
        let a = with(Some(JOIN), false);
        assert_eq!(
            a.authenticate(Some(FLEET), Some(&bearer(JOIN))),
            Ok(Joined::Token)
        );
        assert_eq!(
            a.authenticate(Some(FLEET), Some(&bearer(FLEET))),
            Ok(Joined::Token)
        );
        assert_eq!(a.authenticate(None, Some(&bearer(JOIN))), Ok(Joined::Token));
        for bad in [None, Some("Bearer join-token-012345678"), Some(JOIN)] {
            assert_eq!(
                a.authenticate(Some(FLEET), bad),
                Err(JoinError::Unauthorized { fleet_token: true }),
                "{bad:?}"
            );
        }
        // the fleet token alone (no join token) keeps working as before
        let fleet_only = with(None, false);
        assert_eq!(
            fleet_only.authenticate(Some(FLEET), Some(&bearer(FLEET))),
            Ok(Joined::Token)
        );
        assert!(fleet_only.authenticate(Some(FLEET), None).is_err());
        // no token at all: closed, unless open; an open fleet ignores whatever header comes
        assert_eq!(
            with(None, false).authenticate(None, None),
            Err(JoinError::Closed)
        );
        assert_eq!(
            with(None, false).authenticate(None, Some(&bearer(JOIN))),
            Err(JoinError::Closed)
        );
        assert_eq!(with(None, true).authenticate(None, None), Ok(Joined::Open));
        // a configured token wins over --open-fleet (the CLI refuses the pair; the type stays safe anyway)
        assert!(with(Some(JOIN), true).authenticate(None, None).is_err());
        assert!(JoinError::Closed.to_string().contains("--node-token-env"));
        assert!(JoinError::Unauthorized { fleet_token: false }
            .to_string()
            .contains("--node-token-env"));
    }

    #[test]
    fn the_allow_list_names_the_ids_that_may_join() {
        let a = NodeAdmission {
            ids: Some(["n1".to_string(), "n2".to_string()].into()),
            ..Default::default()
        };
        assert_eq!(a.check_id("n1"), Ok(()));
        assert_eq!(a.check_id("evil"), Err(JoinError::NotListed("evil".into())));
        assert_eq!(NodeAdmission::default().check_id("evil"), Ok(()));
    }

    #[test]
    fn node_urls_are_plain_http_urls() {
        let ip = |s: &str| NodeHost::Addr(s.parse().unwrap());
        assert_eq!(parse_url("http://10.0.0.7:8080"), Ok(ip("10.0.0.7")));
        assert_eq!(parse_url("https://[fd00::7]:8443/edge"), Ok(ip("fd00::7")));
        assert_eq!(
            parse_url("http://0x7f.1:80"),
            Ok(ip("127.0.0.1")),
            "normalised"
        );
        assert_eq!(
            parse_url("https://GPU-17.example:8443"),
            Ok(NodeHost::Name("gpu-17.example".into()))
        );
        for bad in [
            "ftp://10.0.0.7",
            "file:///etc/passwd",
            "gopher://10.0.0.7:70",
            "http://user:pw@10.0.0.7:8080",
            "http://10.0.0.7:8080/?x=1",
            "http://10.0.0.7:8080/#f",
            "http://10.0.0.7\n:8080",
            "http://10.0.0.7 :8080",
            "10.0.0.7:8080",
            "http://",
        ] {
            assert!(
                matches!(parse_url(bad), Err(JoinError::BadUrl(_))),
                "{bad:?}: {:?}",
                parse_url(bad)
            );
        }
    }

    fn networks(extra: &str) -> NodeAdmission {
        NodeAdmission {
            networks: NodeNetworks {
                extra: UrlPolicy::parse(extra).unwrap(),
            },
            ..Default::default()
        }
    }

    #[test]
    fn node_addresses_are_public_or_private_unless_node_networks_adds_more() {
        let a = NodeAdmission::default();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for ok in [
            "10.1.2.3",
            "172.20.0.1",
            "192.168.1.9",
            "fd00::9",
            "8.8.8.8",
            "2a00:1450::1",
        ] {
            assert_eq!(a.check_addresses(None, &[ip(ok)]), Ok(()), "{ok}");
        }
        for bad in [
            "169.254.169.254",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "127.0.0.1",
            "::1",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "255.255.255.255",
            "fe80::1",
            "100.64.0.1",
            "240.0.0.1",
        ] {
            let e = a.check_addresses(None, &[ip(bad)]);
            let Err(JoinError::Refused(m)) = e else {
                panic!("{bad} admitted: {e:?}");
            };
            assert!(m.contains(bad) && m.contains("--node-networks"), "{m}");
        }
        let Err(JoinError::Refused(m)) = a.check_addresses(None, &[ip("169.254.169.254")]) else {
            panic!()
        };
        assert!(
            m.starts_with("node URL host 169.254.169.254 is a link-local address; "),
            "{m}"
        );
        // one refused address among a name's addresses refuses the name
        let e = a.check_addresses(Some("n.example"), &[ip("10.0.0.1"), ip("fd00:ec2::254")]);
        let Err(JoinError::Refused(m)) = e else {
            panic!("{e:?}")
        };
        assert!(
            m.contains("n.example resolves to fd00:ec2::254 is a cloud metadata service address"),
            "{m}"
        );
        assert!(a.check_addresses(Some("n.example"), &[]).is_err());
        // --node-networks 127.0.0.0/8 opens loopback (a one-host test fleet) and nothing else
        let lo = networks("127.0.0.0/8");
        assert_eq!(lo.check_addresses(None, &[ip("127.0.0.1")]), Ok(()));
        assert_eq!(lo.check_addresses(None, &[ip("::ffff:127.0.0.1")]), Ok(()));
        assert!(lo.check_addresses(None, &[ip("169.254.169.254")]).is_err());
        assert!(lo.check_addresses(None, &[ip("fd00:ec2::254")]).is_err());
        assert_eq!(lo.check_addresses(None, &[ip("10.0.0.1")]), Ok(()));
        // only a network that holds the metadata address opens it
        assert_eq!(
            networks("fd00:ec2::/32").check_addresses(None, &[ip("fd00:ec2::254")]),
            Ok(())
        );
    }

    #[tokio::test]
    async fn names_are_resolved_and_every_address_must_pass() {
        let names = Names::default();
        let a = NodeAdmission::default();
        // localhost resolves to loopback: refused by default, with the name in the message
        let e = names
            .check(&a, &NodeHost::Name("localhost".into()))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, JoinError::Refused(m) if m.contains("localhost") && m.contains("--node-networks")),
            "{e:?}"
        );
        // the verdict is kept per name: a second heartbeat does not resolve it again
        assert_eq!(
            names.check(&a, &NodeHost::Name("localhost".into())).await,
            Err(e)
        );
        let lo = networks("127.0.0.0/8,::1");
        assert_eq!(
            Names::default()
                .check(&lo, &NodeHost::Name("localhost".into()))
                .await,
            Ok(())
        );
        assert!(names
            .check(&a, &NodeHost::Addr("169.254.169.254".parse().unwrap()))
            .await
            .is_err());
        // a name that does not resolve is refused
        assert!(names
            .check(&a, &NodeHost::Name("no-such-node.invalid".into()))
            .await
            .is_err());
    }
}
