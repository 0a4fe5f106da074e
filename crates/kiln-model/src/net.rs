//! Which network addresses a URL the daemon fetches on a user's behalf (a VOD job's `http(s)` input) may reach.
//!
//! A job's input URL comes from whoever may submit jobs, and the daemon fetches it from inside the platform's
//! network. Without a rule, `http://169.254.169.254/…` reads the cloud's instance credentials and
//! `http://10.0.0.5:6379/` probes internal services (server-side request forgery). So by default only public
//! unicast addresses are reachable; every special-purpose range (IANA's special-purpose registries, RFC 6890) is
//! refused unless the operator allows it by CIDR ([`UrlPolicy::allow`]).
//!
//! Addresses that embed an IPv4 address (IPv4-mapped `::ffff:a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`)
//! are judged by the embedded address, so `::ffff:127.0.0.1` is loopback. The check is applied to every address a
//! name resolves to and to every redirect hop by the fetcher; this module only decides.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// The special-purpose class of an address; public unicast addresses have none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetClass {
    Unspecified,
    Loopback,
    /// RFC 1918 (10/8, 172.16/12, 192.168/16) and IPv6 unique-local (fc00::/7).
    Private,
    /// 100.64/10 (carrier-grade NAT).
    SharedAddressSpace,
    /// 169.254/16 (cloud metadata services live here) and fe80::/10.
    LinkLocal,
    Multicast,
    Broadcast,
    /// 192.0.2/24, 198.51.100/24, 203.0.113/24, 2001:db8::/32.
    Documentation,
    /// 198.18/15.
    Benchmarking,
    /// Everything else set aside: 192.0.0/24, 240/4, 100::/64, Teredo, IPv4-compatible IPv6, …
    Reserved,
}

impl NetClass {
    pub fn as_str(self) -> &'static str {
        match self {
            NetClass::Unspecified => "unspecified",
            NetClass::Loopback => "loopback",
            NetClass::Private => "private",
            NetClass::SharedAddressSpace => "shared (carrier-grade NAT)",
            NetClass::LinkLocal => "link-local",
            NetClass::Multicast => "multicast",
            NetClass::Broadcast => "broadcast",
            NetClass::Documentation => "documentation",
            NetClass::Benchmarking => "benchmarking",
            NetClass::Reserved => "reserved",
        }
    }
}

impl fmt::Display for NetClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn v4_class(ip: Ipv4Addr) -> Option<NetClass> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        _ if ip == Ipv4Addr::BROADCAST => NetClass::Broadcast,
        (0, ..) => NetClass::Unspecified,
        (10, ..) => NetClass::Private,
        (100, 64..=127, _) => NetClass::SharedAddressSpace,
        (127, ..) => NetClass::Loopback,
        (169, 254, _) => NetClass::LinkLocal,
        (172, 16..=31, _) => NetClass::Private,
        (192, 0, 0) => NetClass::Reserved,
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => NetClass::Documentation,
        (192, 168, _) => NetClass::Private,
        (198, 18..=19, _) => NetClass::Benchmarking,
        (224..=239, ..) => NetClass::Multicast,
        (240..=255, ..) => NetClass::Reserved,
        _ => return None,
    })
}

/// The IPv4 address an IPv6 address carries, for the forms that route to it.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let from = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    match s {
        // ::ffff:a.b.c.d (IPv4-mapped)
        [0, 0, 0, 0, 0, 0xffff, hi, lo] => Some(from(hi, lo)),
        // 64:ff9b::a.b.c.d (NAT64 well-known prefix)
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(from(hi, lo)),
        // 2002:aabb:ccdd::/48 (6to4)
        [0x2002, hi, lo, ..] => Some(from(hi, lo)),
        _ => None,
    }
}

fn v6_class(ip: Ipv6Addr) -> Option<NetClass> {
    if let Some(v4) = embedded_v4(ip) {
        return v4_class(v4);
    }
    let s = ip.segments();
    Some(match s {
        [0, 0, 0, 0, 0, 0, 0, 0] => NetClass::Unspecified,
        [0, 0, 0, 0, 0, 0, 0, 1] => NetClass::Loopback,
        // ::a.b.c.d (IPv4-compatible, deprecated) and the rest of ::/8
        [0, ..] => NetClass::Reserved,
        [0x100, 0, 0, 0, ..] => NetClass::Reserved,
        [0x2001, 0xdb8, ..] => NetClass::Documentation,
        // Teredo tunnels reach anything behind them
        [0x2001, 0, ..] => NetClass::Reserved,
        [x, ..] if x & 0xfe00 == 0xfc00 => NetClass::Private,
        [x, ..] if x & 0xffc0 == 0xfe80 => NetClass::LinkLocal,
        // fec0::/10, deprecated site-local
        [x, ..] if x & 0xffc0 == 0xfec0 => NetClass::Private,
        [x, ..] if x & 0xff00 == 0xff00 => NetClass::Multicast,
        _ => return None,
    })
}

/// The special-purpose class of `ip`, `None` for a public unicast address.
pub fn classify(ip: IpAddr) -> Option<NetClass> {
    match ip {
        IpAddr::V4(v4) => v4_class(v4),
        IpAddr::V6(v6) => v6_class(v6),
    }
}

/// `10.0.0.0/8`, `::1/128`, or a bare address (a single host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    /// Whether `ip` is in this network (an IPv4-mapped IPv6 address matches IPv4 networks).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Why a string is not a network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a network (want an address or CIDR such as 10.0.0.0/8 or fd00::/8)")]
pub struct CidrError(pub String);

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let bad = || CidrError(s.chars().take(100).collect());
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().map_err(|_| bad())?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        Cidr::new(addr, prefix).ok_or_else(bad)
    }
}

/// An address the policy refuses, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub ip: IpAddr,
    pub class: NetClass,
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is a {} address", self.ip, self.class)
    }
}

/// Public unicast addresses, plus the networks the operator allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UrlPolicy {
    pub allow: Vec<Cidr>,
}

impl UrlPolicy {
    /// Parses a comma-separated list of networks; `any` allows every address (no protection: tests, labs).
    pub fn parse(list: &str) -> Result<UrlPolicy, CidrError> {
        let mut allow = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if item == "any" {
                allow.push(Cidr::new(Ipv4Addr::UNSPECIFIED.into(), 0).expect("/0"));
                allow.push(Cidr::new(Ipv6Addr::UNSPECIFIED.into(), 0).expect("/0"));
            } else {
                allow.push(item.parse()?);
            }
        }
        Ok(UrlPolicy { allow })
    }

    /// `Ok` if a fetch may connect to `ip`.
    pub fn check(&self, ip: IpAddr) -> Result<(), Denied> {
        match classify(ip) {
            None => Ok(()),
            Some(_) if self.allow.iter().any(|c| c.contains(ip)) => Ok(()),
            Some(class) => Err(Denied { ip, class }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn special_ranges_are_classified_and_public_ones_are_not() {
        let cases = [
            ("127.0.0.1", Some(NetClass::Loopback)),
            ("127.255.1.2", Some(NetClass::Loopback)),
            ("10.1.2.3", Some(NetClass::Private)),
            ("172.16.0.1", Some(NetClass::Private)),
            ("172.31.255.255", Some(NetClass::Private)),
            ("172.32.0.1", None),
            ("192.168.1.1", Some(NetClass::Private)),
            ("169.254.169.254", Some(NetClass::LinkLocal)),
            ("100.64.0.1", Some(NetClass::SharedAddressSpace)),
            ("100.128.0.1", None),
            ("0.0.0.0", Some(NetClass::Unspecified)),
            ("0.1.2.3", Some(NetClass::Unspecified)),
            ("255.255.255.255", Some(NetClass::Broadcast)),
            ("224.0.0.1", Some(NetClass::Multicast)),
            ("240.0.0.1", Some(NetClass::Reserved)),
            ("192.0.2.7", Some(NetClass::Documentation)),
            ("198.18.0.1", Some(NetClass::Benchmarking)),
            ("8.8.8.8", None),
            ("151.101.1.1", None),
            ("::", Some(NetClass::Unspecified)),
            ("::1", Some(NetClass::Loopback)),
            ("::ffff:127.0.0.1", Some(NetClass::Loopback)),
            ("::ffff:169.254.169.254", Some(NetClass::LinkLocal)),
            ("::ffff:8.8.8.8", None),
            ("64:ff9b::10.0.0.1", Some(NetClass::Private)),
            ("2002:7f00:1::", Some(NetClass::Loopback)),
            ("::127.0.0.1", Some(NetClass::Reserved)),
            ("fd00::1", Some(NetClass::Private)),
            ("fe80::1", Some(NetClass::LinkLocal)),
            ("ff02::1", Some(NetClass::Multicast)),
            ("2001:db8::1", Some(NetClass::Documentation)),
            ("2001:0:4136:e378::1", Some(NetClass::Reserved)),
            ("2a00:1450:4001::200e", None),
        ];
        for (a, want) in cases {
            assert_eq!(classify(ip(a)), want, "{a}");
        }
    }

    #[test]
    fn the_default_refuses_internal_addresses_and_allow_lists_open_them() {
        let p = UrlPolicy::default();
        assert_eq!(
            p.check(ip("169.254.169.254")).unwrap_err().to_string(),
            "169.254.169.254 is a link-local address"
        );
        assert!(p.check(ip("8.8.8.8")).is_ok());
        assert!(p.check(ip("::1")).is_err());
        let p = UrlPolicy::parse("127.0.0.0/8, fd00::/8,10.1.2.3").unwrap();
        assert!(p.check(ip("127.0.0.1")).is_ok());
        assert!(p.check(ip("::ffff:127.0.0.1")).is_ok(), "mapped matches v4");
        assert!(p.check(ip("fd00::5")).is_ok());
        assert!(p.check(ip("10.1.2.3")).is_ok());
        assert!(p.check(ip("10.1.2.4")).is_err());
        assert!(p.check(ip("::1")).is_err());
        let any = UrlPolicy::parse("any").unwrap();
        assert!(any.check(ip("169.254.169.254")).is_ok() && any.check(ip("::1")).is_ok());
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "localhost",
            "10.0.0/8",
            "1.2.3.4/x",
        ] {
            assert!(UrlPolicy::parse(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        /// A network contains exactly the addresses that share its first `prefix` bits.
        #[test]
        fn cidr_contains_is_a_prefix_match(n in any::<u32>(), a in any::<u32>(), prefix in 0u8..=32) {
            let c = Cidr::new(Ipv4Addr::from(n).into(), prefix).unwrap();
            let same = prefix == 0 || (n ^ a) >> (32 - u32::from(prefix)) == 0;
            prop_assert_eq!(c.contains(Ipv4Addr::from(a).into()), same);
            prop_assert!(c.contains(Ipv4Addr::from(n).into()));
        }

        /// The v4 ranges a fetch must never reach by default stay refused in every IPv6 spelling.
        #[test]
        fn embedded_forms_inherit_the_ipv4_class(a in any::<u32>()) {
            let v4 = Ipv4Addr::from(a);
            let mapped = IpAddr::V6(v4.to_ipv6_mapped());
            prop_assert_eq!(classify(mapped), classify(v4.into()));
            let o = v4.octets();
            let six_to_four = Ipv6Addr::new(0x2002, u16::from_be_bytes([o[0], o[1]]), u16::from_be_bytes([o[2], o[3]]), 0, 0, 0, 0, 1);
            prop_assert_eq!(classify(six_to_four.into()), classify(v4.into()));
        }
    }
}
