//! Where a call may go: the hosts the allow-list names, and internal addresses (loopback,
//! private, link-local) only when it names them, judged on the address the egress
//! connects to.

use super::*;

/// Whether `ip` is an address inside a network rather than on the internet: loopback,
/// private, link-local (where cloud metadata services answer), shared (CGNAT),
/// unspecified, multicast or broadcast. The egress calls these only when the allow-list
/// names the host.
pub(super) fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || (a == 100 && (64..128).contains(&b)) // shared (CGNAT)
                || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
                || (a == 198 && (18..20).contains(&b)) // benchmarking
                || a >= 240 // reserved
                || a == 0
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let segments = v6.segments();
            // NAT64 (64:ff9b::/96) and IPv4-compatible (::a.b.c.d) forms of an IPv4 address.
            let embedded = std::net::Ipv4Addr::new(
                (segments[6] >> 8) as u8,
                segments[6] as u8,
                (segments[7] >> 8) as u8,
                segments[7] as u8,
            );
            let nat64 = segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
            let compatible = segments[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified();
            if nat64 || compatible {
                return is_internal(IpAddr::V4(embedded));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link-local
                || (first & 0xffc0) == 0xfec0 // site-local
        }
    }
}

/// Resolves the egress's target names, keeping internal addresses only for hosts the
/// allow-list names: the check is made on the address the call connects to, so a public
/// name that resolves to 127.0.0.1 (or is made to, later) reaches nothing inside.
pub(super) struct GuardedResolver {
    /// Hosts named in the allow-list (wildcards excluded), lower case.
    pub(super) named: Vec<String>,
}

/// Marks the resolver's refusal, so that the egress can answer 403 for it.
pub(super) const INTERNAL_REFUSED: &str = "resolves only to internal addresses";

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_ascii_lowercase();
        let named = self.named.contains(&host);
        Box::pin(async move {
            let addresses: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|address| named || !is_internal(address.ip()))
                .collect();
            if addresses.is_empty() {
                return Err(format!(
                    "{host} {INTERNAL_REFUSED} (loopback, private or link-local); name it in --egress-allow to let handlers call it"
                )
                .into());
            }
            Ok(Box::new(addresses.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Whether the allow-list `allow` lets handlers call `url`'s host. An internal address
/// written as an IP literal must be named; a name is checked again, on the addresses it
/// resolves to, when the call connects ([`GuardedResolver`]).
pub(super) fn allowed_by(allow: &[String], url: &reqwest::Url) -> bool {
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    let bare = host.trim_matches(['[', ']']).to_owned();
    let port = url.port_or_known_default().unwrap_or(0);
    // Entries that name this host decide alone (a wildcard does not widen them): `host`
    // allows every port, `host:port` that port only.
    let naming: Vec<String> = allow
        .iter()
        .filter(|pattern| !pattern.starts_with("*."))
        .map(|pattern| pattern.to_ascii_lowercase())
        .filter(|pattern| split_entry(pattern).0 == bare)
        .collect();
    if !naming.is_empty() {
        return naming.iter().any(|pattern| {
            let (_, named_port) = split_entry(pattern);
            named_port.is_none_or(|p| p == port)
        });
    }
    // An internal address is called only when named.
    if bare.parse::<IpAddr>().is_ok_and(is_internal) {
        return false;
    }
    if allow.is_empty() {
        return true;
    }
    allow.iter().any(|pattern| {
        let pattern = pattern.to_ascii_lowercase();
        pattern
            .strip_prefix("*.")
            .is_some_and(|domain| host.ends_with(&format!(".{domain}")))
    })
}

/// An allow-list entry's host (lower case, IPv6 without brackets) and port, if it names one:
/// `[::1]:8080`, `host:8080`, `host`, `::1`.
pub(super) fn split_entry(pattern: &str) -> (String, Option<u16>) {
    let pattern = pattern.to_ascii_lowercase();
    match pattern.strip_prefix('[') {
        Some(rest) => {
            let (host, after) = rest.split_once(']').unwrap_or((rest, ""));
            (
                host.to_owned(),
                after.strip_prefix(':').and_then(|p| p.parse().ok()),
            )
        }
        None if pattern.matches(':').count() == 1 => {
            let (host, port) = pattern.split_once(':').unwrap_or((&pattern, ""));
            (host.to_owned(), port.parse().ok())
        }
        None => (pattern, None),
    }
}

/// The hosts an allow-list names explicitly (`host` or `host:port`; not `*.domain`).
pub(super) fn named_hosts(allow: &[String]) -> Vec<String> {
    allow
        .iter()
        .filter(|pattern| !pattern.starts_with("*."))
        .map(|pattern| split_entry(pattern).0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_called_only_on_the_ports_the_allow_list_names() {
        let allowed = |allow: &[&str], url: &str| {
            let allow: Vec<String> = allow.iter().map(|s| (*s).to_owned()).collect();
            allowed_by(&allow, &reqwest::Url::parse(url).unwrap())
        };
        assert!(allowed(&["127.0.0.1:9101"], "http://127.0.0.1:9101/charge"));
        assert!(!allowed(
            &["127.0.0.1:9101"],
            "http://127.0.0.1:9070/v1/deployments"
        ));
        assert!(allowed(&["127.0.0.1"], "http://127.0.0.1:9070/"));
        assert!(!allowed(&[], "http://10.1.2.3/"));
        assert!(!allowed(&[], "http://169.254.169.254/latest/"));
        assert!(!allowed(&[], "http://[::ffff:127.0.0.1]:80/"));
        assert!(!allowed(&[], "http://[64:ff9b::a01:203]/"));
        assert!(!allowed(&[], "http://192.0.0.192/"));
        assert!(allowed(&[], "http://93.184.216.34/"));
        assert!(allowed(&[], "http://example.com/"));
        assert!(allowed(&["[::1]:8080"], "http://[::1]:8080/"));
        assert!(!allowed(&["[::1]:8080"], "http://[::1]:8081/"));
        // A wildcard does not widen what an entry naming the host allows.
        let corp = ["*.corp", "db.corp:5432"];
        assert!(allowed(&corp, "http://db.corp:5432/"));
        assert!(!allowed(&corp, "http://db.corp:9999/"));
        assert!(allowed(&corp, "http://api.corp/"));
        assert!(!allowed(&corp, "http://example.com/"));
    }
}
