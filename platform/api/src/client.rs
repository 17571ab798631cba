//! Where a request comes from: the client's address (for per-address limits and the audit log) and
//! its user agent.
//!
//! The address is the TCP peer's, unless the peer is one of the configured trusted proxies
//! (`PLINTH_TRUSTED_PROXIES`): then it is the right-most address in `X-Forwarded-For` that is not a
//! trusted proxy, i.e. the last hop a trusted proxy saw. Everything to the left of it was written by
//! the client and is ignored, so a client cannot pick the address it is limited or audited under.

use std::net::IpAddr;

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpRequest, web};
use futures_util::future::{Ready, ready};
use ipnet::IpNet;
use plinth_store::audit::Who;

use crate::state::AppState;

/// The client of one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    pub address: Option<IpAddr>,
    pub user_agent: Option<String>,
}

impl Origin {
    /// `actor`, acting from here.
    #[must_use]
    pub fn who(&self, actor: &str) -> Who {
        Who {
            actor: actor.to_owned(),
            client_address: self.address.map(|a| a.to_string()),
            user_agent: self.user_agent.clone(),
        }
    }

    /// The key per-address limits count under: the address, or its /64 for IPv6 (one subscriber gets
    /// a whole /64, so single v6 addresses are free to an attacker).
    #[must_use]
    pub fn limit_key(&self) -> String {
        match self.address {
            Some(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => {
                let net =
                    ipnet::Ipv6Net::new(v6, 64).map_or_else(|_| v6.to_string(), |n| n.trunc().to_string());
                format!("v6:{net}")
            }
            Some(IpAddr::V6(v6)) => format!(
                "v4:{}",
                v6.to_ipv4_mapped()
                    .map_or_else(|| v6.to_string(), |v4| v4.to_string())
            ),
            Some(IpAddr::V4(v4)) => format!("v4:{v4}"),
            None => "unknown".to_owned(),
        }
    }

    /// For IPv6, the /48 around the client (one site's allocation, which a tunnel broker hands out
    /// for free): limited too, at a multiple of the per-/64 limit.
    #[must_use]
    pub fn site_limit_key(&self) -> Option<String> {
        match self.address {
            Some(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => ipnet::Ipv6Net::new(v6, 48)
                .ok()
                .map(|n| format!("v6site:{}", n.trunc())),
            _ => None,
        }
    }

    /// The network login attempts at one account are counted under: the address (IPv4), or its /48
    /// (IPv6: anyone can get a /48 of /64s).
    #[must_use]
    pub fn login_network(&self) -> String {
        self.site_limit_key().unwrap_or_else(|| self.limit_key())
    }
}

/// The client's address, given the peer's and the proxies trusted to report it.
#[must_use]
pub fn client_address(
    peer: Option<IpAddr>,
    forwarded_for: Option<&str>,
    trusted: &[IpNet],
) -> Option<IpAddr> {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    let peer = peer?;
    if !is_trusted(&peer) {
        return Some(peer);
    }
    let Some(header) = forwarded_for else {
        return Some(peer);
    };
    // Right to left: the first hop no trusted proxy vouches for is the client. A malformed entry ends
    // the walk, since nothing to its left can be believed; all trusted: the left-most is the client.
    let mut client = peer;
    for hop in header.rsplit(',').map(str::trim) {
        let Ok(ip) = hop.parse::<IpAddr>() else {
            break;
        };
        client = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    Some(client)
}

/// The origin of `req`, under the platform's trusted proxies.
#[must_use]
pub fn origin(req: &HttpRequest) -> Origin {
    let trusted = req
        .app_data::<web::Data<AppState>>()
        .map(|state| state.settings.trusted_proxies.as_slice())
        .unwrap_or_default();
    // Several `X-Forwarded-For` lines are one list, in order (a proxy may add a line of its own
    // rather than append to the client's).
    let forwarded: Vec<&str> = req
        .headers()
        .get_all("x-forwarded-for")
        .filter_map(|v| v.to_str().ok())
        .collect();
    let forwarded = (!forwarded.is_empty()).then(|| forwarded.join(","));
    Origin {
        address: client_address(req.peer_addr().map(|a| a.ip()), forwarded.as_deref(), trusted),
        user_agent: req
            .headers()
            .get(actix_web::http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|ua| ua.chars().take(256).collect()),
    }
}

impl FromRequest for Origin {
    type Error = actix_web::Error;
    type Future = Ready<Result<Self, actix_web::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(Ok(origin(req)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn the_peer_is_the_client_unless_it_is_a_trusted_proxy() {
        let forged = Some("203.0.113.9");
        assert_eq!(
            client_address(Some(ip("198.51.100.7")), forged, &[]),
            Some(ip("198.51.100.7"))
        );
        assert_eq!(
            client_address(Some(ip("198.51.100.7")), forged, &nets(&["10.0.0.0/8"])),
            Some(ip("198.51.100.7")),
            "an untrusted peer's X-Forwarded-For is ignored"
        );
        assert_eq!(
            client_address(Some(ip("10.0.0.2")), forged, &nets(&["10.0.0.0/8"])),
            Some(ip("203.0.113.9"))
        );
    }

    #[test]
    fn what_the_client_wrote_left_of_the_last_untrusted_hop_is_ignored() {
        let trusted = nets(&["10.0.0.0/8"]);
        // The client sent `X-Forwarded-For: 1.2.3.4`; the proxies appended the real address and their own.
        let header = Some("1.2.3.4, 198.51.100.7, 10.0.0.5");
        assert_eq!(
            client_address(Some(ip("10.0.0.2")), header, &trusted),
            Some(ip("198.51.100.7"))
        );
        // Garbage stops the walk at the last good hop.
        let header = Some("1.2.3.4, not-an-ip, 10.0.0.5");
        assert_eq!(
            client_address(Some(ip("10.0.0.2")), header, &trusted),
            Some(ip("10.0.0.5"))
        );
    }

    #[test]
    fn ipv6_clients_are_limited_per_64_and_per_48() {
        let a = Origin {
            address: Some(ip("2001:db8:1:2:aaaa::1")),
            user_agent: None,
        };
        let b = Origin {
            address: Some(ip("2001:db8:1:2:bbbb::2")),
            user_agent: None,
        };
        assert_eq!(a.limit_key(), b.limit_key());
        let neighbour = Origin {
            address: Some(ip("2001:db8:1:3::1")),
            user_agent: None,
        };
        assert_ne!(a.limit_key(), neighbour.limit_key());
        assert_eq!(a.site_limit_key(), neighbour.site_limit_key());
        let v4 = Origin {
            address: Some(ip("::ffff:192.0.2.1")),
            user_agent: None,
        };
        assert_eq!(v4.limit_key(), "v4:192.0.2.1");
        assert_eq!(v4.site_limit_key(), None);
    }
}
