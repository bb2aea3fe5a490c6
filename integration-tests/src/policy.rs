//! The sample stages' policies in their kernel form, and filling them the
//! way the agent does: the whole desired contents in a new inner map
//! (`policy::build_inner`) swapped in at once (`policy::swap`). The layouts
//! are those of `ebpf/src/ddos.c` and `ebpf/src/l4lb.c`.

use std::net::Ipv4Addr;

use rootlet_dataplane::{
    Dataplane, Result,
    policy::{self, SwapOutcome},
    spec::RootletKey,
};

/// The ddos stage's policy map.
pub const BLOCKLIST: &str = "ddos_blocklist";
/// The ddos stage's per-rule drop counters (a plain per-CPU array).
pub const HITS: &str = "ddos_hits";
/// The l4lb stage's policy map: services with their backends inline.
pub const SERVICES: &str = "l4lb_services";
/// `L4LB_MAX_BACKENDS` in l4lb.c.
pub const MAX_BACKENDS: usize = 64;

/// A `struct ddos_key`: prefix length, then the address in network order.
pub fn ddos_key(addr: Ipv4Addr, prefixlen: u32) -> Vec<u8> {
    let mut k = prefixlen.to_ne_bytes().to_vec();
    k.extend_from_slice(&addr.octets());
    k
}

/// A blocklist entry: `addr/prefixlen` → rule id `rule`.
pub fn block_entry(addr: Ipv4Addr, prefixlen: u32, rule: u32) -> (Vec<u8>, Vec<u8>) {
    (ddos_key(addr, prefixlen), rule.to_ne_bytes().to_vec())
}

/// A `struct l4lb_vip`: VIP, port (network order), protocol, pad.
pub fn vip_key(vip: Ipv4Addr, port: u16, proto: u8) -> Vec<u8> {
    let mut k = vip.octets().to_vec();
    k.extend_from_slice(&port.to_be_bytes());
    k.extend_from_slice(&[proto, 0]);
    k
}

/// A `struct l4lb_service` with `backends` (IP, MAC) inline.
pub fn service_value(backends: &[(Ipv4Addr, [u8; 6])]) -> Vec<u8> {
    assert!(
        backends.len() <= MAX_BACKENDS,
        "at most {MAX_BACKENDS} backends"
    );
    let mut v = (backends.len() as u32).to_ne_bytes().to_vec();
    for i in 0..MAX_BACKENDS {
        match backends.get(i) {
            Some((ip, mac)) => {
                v.extend_from_slice(&ip.octets());
                v.extend_from_slice(mac);
            }
            None => v.extend_from_slice(&[0; 10]),
        }
        v.extend_from_slice(&[0, 0]);
    }
    v
}

/// Replaces the contents of policy map `map` of `stage` with `entries`, as
/// the agent does: a new inner map, filled, then swapped in.
pub fn replace(
    dp: &Dataplane,
    key: RootletKey,
    stage: &str,
    map: &str,
    entries: &[(Vec<u8>, Vec<u8>)],
) -> Result<SwapOutcome> {
    let outer = dp.stage_map_handle(key, stage, map)?;
    let inner = policy::build_inner(&outer, entries)?;
    policy::swap(&outer, &inner)
}

/// Every entry of `map` of `stage` (a policy map: its live inner map).
pub fn entries(
    dp: &Dataplane,
    key: RootletKey,
    stage: &str,
    map: &str,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let handle = dp.stage_map_handle(key, stage, map)?;
    let mut out = vec![];
    let mut after = None;
    // Bounded: a page of 4096 per step, and no sample map holds 2^20.
    for _ in 0..256 {
        let (page, next) = policy::dump(&handle, after.as_deref(), 4096)?;
        out.extend(page);
        match next {
            Some(n) => after = Some(n),
            None => return Ok(out),
        }
    }
    Ok(out)
}
