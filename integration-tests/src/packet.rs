//! Ethernet + IPv4 + UDP frames: building, parsing, checksum checks,
//! sequence-numbered payloads, and the L4 load balancer's flow hash.
//!
//! Frames are plain Ethernet II (no VLAN tag, no FCS, no padding to 60
//! bytes: veth does not need it), IPv4 without options when built (options
//! are accepted when parsed), TTL 64, DF set, ID 0.
#![forbid(unsafe_code)]

use std::net::Ipv4Addr;

/// A MAC address, in wire order.
pub type MacAddr = [u8; 6];

/// Length of an Ethernet II header.
pub const ETH_HLEN: usize = 14;
/// Length of an IPv4 header without options.
pub const IPV4_HLEN: usize = 20;
/// Length of a UDP header.
pub const UDP_HLEN: usize = 8;
/// EtherType of IPv4.
pub const ETH_P_IPV4: u16 = 0x0800;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;
/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// TTL of built frames.
pub const DEFAULT_TTL: u8 = 64;

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_to_string(mac: &MacAddr) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// An Ethernet + IPv4 + UDP frame to build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpFrame {
    pub src_mac: MacAddr,
    pub dst_mac: MacAddr,
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: Vec<u8>,
}

impl UdpFrame {
    /// The frame's bytes, with correct IPv4 header and UDP checksums.
    ///
    /// # Panics
    ///
    /// If the payload does not fit in one IPv4 packet (65507 bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.build(true)
    }

    /// The frame's bytes with the UDP checksum left 0 ("not computed",
    /// legal for UDP over IPv4); the IPv4 header checksum is still set.
    ///
    /// # Panics
    ///
    /// As [`UdpFrame::to_bytes`].
    pub fn to_bytes_without_udp_checksum(&self) -> Vec<u8> {
        self.build(false)
    }

    /// Length in bytes of the built frame.
    pub fn frame_len(&self) -> usize {
        ETH_HLEN + IPV4_HLEN + UDP_HLEN + self.payload.len()
    }

    /// A copy with another payload.
    pub fn with_payload(&self, payload: Vec<u8>) -> UdpFrame {
        UdpFrame {
            payload,
            ..self.clone()
        }
    }

    /// [`l4lb_flow_hash`] of this frame's addresses and ports.
    pub fn l4lb_flow_hash(&self) -> u32 {
        l4lb_flow_hash(
            self.src_ip.octets(),
            self.dst_ip.octets(),
            self.src_port,
            self.dst_port,
            IPPROTO_UDP,
        )
    }

    fn build(&self, udp_checksum: bool) -> Vec<u8> {
        let udp_len = UDP_HLEN + self.payload.len();
        let ip_len = IPV4_HLEN + udp_len;
        let (Ok(udp_len16), Ok(ip_len16)) = (u16::try_from(udp_len), u16::try_from(ip_len)) else {
            panic!(
                "UDP payload of {} bytes does not fit in an IPv4 packet",
                self.payload.len()
            );
        };
        let mut f = Vec::with_capacity(ETH_HLEN + ip_len);
        // Ethernet.
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
        // IPv4.
        let ip = ETH_HLEN;
        f.push(0x45); // version 4, IHL 5
        f.push(0); // DSCP/ECN
        f.extend_from_slice(&ip_len16.to_be_bytes());
        f.extend_from_slice(&0u16.to_be_bytes()); // ID
        f.extend_from_slice(&0x4000u16.to_be_bytes()); // DF, offset 0
        f.push(DEFAULT_TTL);
        f.push(IPPROTO_UDP);
        f.extend_from_slice(&[0, 0]); // checksum, below
        f.extend_from_slice(&self.src_ip.octets());
        f.extend_from_slice(&self.dst_ip.octets());
        let ip_sum = internet_checksum(&f[ip..ip + IPV4_HLEN]);
        f[ip + 10..ip + 12].copy_from_slice(&ip_sum.to_be_bytes());
        // UDP.
        let udp = f.len();
        f.extend_from_slice(&self.src_port.to_be_bytes());
        f.extend_from_slice(&self.dst_port.to_be_bytes());
        f.extend_from_slice(&udp_len16.to_be_bytes());
        f.extend_from_slice(&[0, 0]); // checksum, below
        f.extend_from_slice(&self.payload);
        if udp_checksum {
            let mut sum =
                udp_pseudo_header_sum(self.src_ip.octets(), self.dst_ip.octets(), udp_len16);
            sum = ones_complement_add(sum, &f[udp..]);
            let mut check = !fold(sum);
            if check == 0 {
                check = 0xffff; // 0 means "no checksum" in UDP over IPv4
            }
            f[udp + 6..udp + 8].copy_from_slice(&check.to_be_bytes());
        }
        f
    }
}

/// A parsed Ethernet + IPv4 + UDP frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedUdp {
    pub src_mac: MacAddr,
    pub dst_mac: MacAddr,
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: Vec<u8>,
    pub ttl: u8,
    /// The IPv4 identification field.
    pub ip_id: u16,
    /// The IPv4 header checksum as found (not verified).
    pub ip_checksum: u16,
    /// The UDP checksum as found (not verified; 0 means none).
    pub udp_checksum: u16,
}

impl ParsedUdp {
    /// Parses `frame` as Ethernet II / IPv4 / UDP. `None` for anything else
    /// (other EtherType, VLAN tag, IP version or protocol, fragments,
    /// inconsistent lengths, truncation). Bytes after the IPv4 packet
    /// (Ethernet padding) are ignored. Checksums are not verified; see
    /// [`ipv4_checksum_valid`] and [`udp_checksum_valid`].
    pub fn parse(frame: &[u8]) -> Option<ParsedUdp> {
        let l = Layout::of(frame)?;
        let ip = &frame[ETH_HLEN..];
        let udp = &frame[l.udp..];
        Some(ParsedUdp {
            dst_mac: frame[0..6].try_into().ok()?,
            src_mac: frame[6..12].try_into().ok()?,
            src_ip: Ipv4Addr::from(<[u8; 4]>::try_from(&ip[12..16]).ok()?),
            dst_ip: Ipv4Addr::from(<[u8; 4]>::try_from(&ip[16..20]).ok()?),
            src_port: be16(udp, 0),
            dst_port: be16(udp, 2),
            payload: frame[l.udp + UDP_HLEN..l.udp_end].to_vec(),
            ttl: ip[8],
            ip_id: be16(ip, 4),
            ip_checksum: be16(ip, 10),
            udp_checksum: be16(udp, 6),
        })
    }

    /// The sequence number in the payload, if it is a [`seq_payload`].
    pub fn seq(&self) -> Option<u64> {
        payload_seq(&self.payload)
    }

    /// The frame's addressing and payload as a [`UdpFrame`] (to rebuild it,
    /// e.g. with fresh checksums).
    pub fn to_frame(&self) -> UdpFrame {
        UdpFrame {
            src_mac: self.src_mac,
            dst_mac: self.dst_mac,
            src_ip: self.src_ip,
            dst_ip: self.dst_ip,
            src_port: self.src_port,
            dst_port: self.dst_port,
            payload: self.payload.clone(),
        }
    }
}

/// Whether `frame` is an IPv4/UDP frame (as [`ParsedUdp::parse`] accepts)
/// whose IPv4 header checksum is correct.
pub fn ipv4_checksum_valid(frame: &[u8]) -> bool {
    Layout::of(frame)
        .is_some_and(|l| fold(ones_complement_add(0, &frame[ETH_HLEN..l.udp])) == 0xffff)
}

/// Whether `frame` is an IPv4/UDP frame (as [`ParsedUdp::parse`] accepts)
/// whose UDP checksum is correct. A checksum field of 0 means "none" in
/// UDP over IPv4 and counts as valid; check [`ParsedUdp::udp_checksum`] to
/// tell the two apart.
pub fn udp_checksum_valid(frame: &[u8]) -> bool {
    let Some(l) = Layout::of(frame) else {
        return false;
    };
    let udp = &frame[l.udp..l.udp_end];
    if be16(udp, 6) == 0 {
        return true;
    }
    let ip = &frame[ETH_HLEN..];
    let (Ok(src), Ok(dst), Ok(len)) = (
        <[u8; 4]>::try_from(&ip[12..16]),
        <[u8; 4]>::try_from(&ip[16..20]),
        u16::try_from(udp.len()),
    ) else {
        return false;
    };
    fold(ones_complement_add(
        udp_pseudo_header_sum(src, dst, len),
        udp,
    )) == 0xffff
}

/// The Internet checksum (RFC 1071) of `data`: the one's complement of the
/// one's complement sum of its 16-bit big-endian words (odd length padded
/// with a zero byte).
pub fn internet_checksum(data: &[u8]) -> u16 {
    !fold(ones_complement_add(0, data))
}

/// The flow hash of `ebpf/src/l4lb.c`, bit for bit:
///
/// ```c
/// __u32 h = saddr ^ daddr ^ (((__u32)sport << 16) | dport) ^ proto;
/// h *= 0x9e3779b1;
/// h ^= h >> 16;
/// ```
///
/// The C program passes the packet's fields as loaded from it, in network
/// byte order, into native (on x86, little-endian) integers. Here `saddr` and
/// `daddr` are the addresses' wire bytes (`Ipv4Addr::octets()`) and `sport`
/// and `dport` are ordinary port numbers (`5000`, as in [`UdpFrame`]); the
/// function reproduces the C program's loads (`u32::from_ne_bytes` of the
/// address bytes, `u16::from_ne_bytes` of the port's big-endian bytes), so
/// it matches the program on a host of either endianness. The backend the
/// load balancer picks is `hash % num_backends`.
pub fn l4lb_flow_hash(saddr: [u8; 4], daddr: [u8; 4], sport: u16, dport: u16, proto: u8) -> u32 {
    let saddr = u32::from_ne_bytes(saddr);
    let daddr = u32::from_ne_bytes(daddr);
    let sport = u32::from(u16::from_ne_bytes(sport.to_be_bytes()));
    let dport = u32::from(u16::from_ne_bytes(dport.to_be_bytes()));
    let mut h = saddr ^ daddr ^ ((sport << 16) | dport) ^ u32::from(proto);
    h = h.wrapping_mul(0x9e37_79b1);
    h ^= h >> 16;
    h
}

/// Marks a [`seq_payload`].
const SEQ_MAGIC: [u8; 4] = *b"RLSQ";
/// Bytes a [`seq_payload`] needs at least: magic and sequence number.
pub const SEQ_HEADER_LEN: usize = 12;

/// A payload of `len` bytes (at least [`SEQ_HEADER_LEN`]) carrying `seq`:
/// `b"RLSQ"`, `seq` as a big-endian u64, then filler bytes derived from
/// `seq` and the offset, which [`payload_seq`] checks.
pub fn seq_payload(seq: u64, len: usize) -> Vec<u8> {
    let len = len.max(SEQ_HEADER_LEN);
    let mut p = Vec::with_capacity(len);
    p.extend_from_slice(&SEQ_MAGIC);
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend((SEQ_HEADER_LEN..len).map(|i| filler(seq, i)));
    p
}

/// The sequence number of a [`seq_payload`], or `None` if `payload` is not
/// one (wrong magic, too short, or corrupted filler).
pub fn payload_seq(payload: &[u8]) -> Option<u64> {
    if payload.len() < SEQ_HEADER_LEN || payload[..4] != SEQ_MAGIC {
        return None;
    }
    let seq = u64::from_be_bytes(payload[4..SEQ_HEADER_LEN].try_into().ok()?);
    let intact = payload[SEQ_HEADER_LEN..]
        .iter()
        .enumerate()
        .all(|(i, &b)| b == filler(seq, SEQ_HEADER_LEN + i));
    intact.then_some(seq)
}

fn filler(seq: u64, offset: usize) -> u8 {
    (seq as u8).wrapping_mul(31).wrapping_add(offset as u8)
}

/// Offsets of a frame [`ParsedUdp::parse`] accepts.
struct Layout {
    /// Start of the UDP header (end of the IPv4 header).
    udp: usize,
    /// End of the UDP datagram as its length field says.
    udp_end: usize,
}

impl Layout {
    fn of(frame: &[u8]) -> Option<Layout> {
        if frame.len() < ETH_HLEN + IPV4_HLEN || be16(frame, 12) != ETH_P_IPV4 {
            return None;
        }
        let ip = &frame[ETH_HLEN..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(be16(ip, 2));
        let frag = be16(ip, 6);
        if ip[0] >> 4 != 4 || ihl < IPV4_HLEN || ip[9] != IPPROTO_UDP || frag & 0x3fff != 0 {
            return None;
        }
        if total < ihl + UDP_HLEN || total > ip.len() {
            return None;
        }
        let udp_len = usize::from(be16(ip, ihl + 4));
        if udp_len < UDP_HLEN || udp_len > total - ihl {
            return None;
        }
        let udp = ETH_HLEN + ihl;
        Some(Layout {
            udp,
            udp_end: udp + udp_len,
        })
    }
}

/// The big-endian u16 at `at`; callers check the bounds.
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Sum of the UDP/IPv4 pseudo header's words.
fn udp_pseudo_header_sum(src: [u8; 4], dst: [u8; 4], udp_len: u16) -> u32 {
    let mut sum = ones_complement_add(0, &src);
    sum = ones_complement_add(sum, &dst);
    sum + u32::from(IPPROTO_UDP) + u32::from(udp_len)
}

/// Adds `data`'s big-endian 16-bit words (odd length padded with a zero
/// byte) to `sum`, folding carries so it cannot overflow.
fn ones_complement_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        if sum > 0xffff_0000 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
    }
    if let [last] = words.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

/// Folds a 32-bit one's complement sum to 16 bits.
fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(payload: Vec<u8>) -> UdpFrame {
        UdpFrame {
            src_mac: [0x02, 0, 0, 0, 0, 0x02],
            dst_mac: [0x02, 0, 0, 0, 0, 0x01],
            src_ip: Ipv4Addr::new(169, 254, 77, 2),
            dst_ip: Ipv4Addr::new(169, 254, 77, 1),
            src_port: 40000,
            dst_port: 5000,
            payload,
        }
    }

    #[test]
    fn build_parse_round_trip() {
        for len in [0, 1, 2, 11, 12, 13, 64, 1000, 1472] {
            let frame = sample(seq_payload(len as u64 * 7, len));
            let bytes = frame.to_bytes();
            assert_eq!(bytes.len(), frame.frame_len());
            assert!(ipv4_checksum_valid(&bytes), "len {len}");
            assert!(udp_checksum_valid(&bytes), "len {len}");
            let parsed = ParsedUdp::parse(&bytes).expect("parses");
            assert_eq!(parsed.to_frame(), frame);
            assert_eq!(parsed.ttl, DEFAULT_TTL);
            assert_eq!(parsed.seq(), Some(len as u64 * 7));
            assert_ne!(parsed.udp_checksum, 0);
        }
    }

    #[test]
    fn known_frame_bytes() {
        // The IPv4 header, checksum zeroed, written out by hand.
        let bytes = sample(b"hi".to_vec()).to_bytes();
        let expect_ip_header = [
            0x45, 0x00, 0x00, 0x1e, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 169, 254, 77,
            2, 169, 254, 77, 1,
        ];
        let mut ip_header = bytes[14..34].to_vec();
        ip_header[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(ip_header, expect_ip_header);
        assert_eq!(
            internet_checksum(&bytes[14..34]),
            0,
            "a correct header sums to 0"
        );
        // RFC 1071's example words.
        assert_eq!(
            internet_checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
    }

    #[test]
    fn corrupted_checksums_are_detected() {
        let bytes = sample(seq_payload(1, 32)).to_bytes();
        let mut bad_ip = bytes.clone();
        bad_ip[14 + 8] ^= 1; // TTL
        assert!(!ipv4_checksum_valid(&bad_ip));
        assert!(
            udp_checksum_valid(&bad_ip),
            "TTL is not in the pseudo header"
        );
        let mut bad_udp = bytes.clone();
        *bad_udp.last_mut().expect("payload") ^= 0x80;
        assert!(ipv4_checksum_valid(&bad_udp));
        assert!(!udp_checksum_valid(&bad_udp));
        let mut bad_addr = bytes.clone();
        bad_addr[14 + 19] ^= 1; // daddr: both checksums cover it
        assert!(!ipv4_checksum_valid(&bad_addr));
        assert!(!udp_checksum_valid(&bad_addr));
    }

    #[test]
    fn zero_udp_checksum() {
        let frame = sample(b"x".to_vec());
        let bytes = frame.to_bytes_without_udp_checksum();
        let parsed = ParsedUdp::parse(&bytes).expect("parses");
        assert_eq!(parsed.udp_checksum, 0);
        assert!(udp_checksum_valid(&bytes));
        assert!(ipv4_checksum_valid(&bytes));
        assert_eq!(parsed.to_frame(), frame);
    }

    #[test]
    fn parse_rejects_what_it_should() {
        let bytes = sample(b"abcd".to_vec()).to_bytes();
        assert!(
            ParsedUdp::parse(&bytes[..bytes.len() - 1]).is_none(),
            "truncated"
        );
        assert!(ParsedUdp::parse(&bytes[..20]).is_none());
        assert!(ParsedUdp::parse(&[]).is_none());
        let mut arp = bytes.clone();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert!(ParsedUdp::parse(&arp).is_none());
        let mut tcp = bytes.clone();
        tcp[14 + 9] = IPPROTO_TCP;
        assert!(ParsedUdp::parse(&tcp).is_none());
        let mut frag = bytes.clone();
        frag[14 + 6] |= 0x20; // MF
        assert!(ParsedUdp::parse(&frag).is_none());
        let mut v6 = bytes.clone();
        v6[14] = 0x65;
        assert!(ParsedUdp::parse(&v6).is_none());
        let mut long_udp = bytes.clone();
        long_udp[14 + 20 + 5] += 1;
        assert!(ParsedUdp::parse(&long_udp).is_none());
        // Ethernet padding after the packet is ignored.
        let mut padded = bytes.clone();
        padded.resize(60, 0);
        let parsed = ParsedUdp::parse(&padded).expect("parses");
        assert_eq!(parsed.payload, b"abcd");
        assert!(ipv4_checksum_valid(&padded) && udp_checksum_valid(&padded));
    }

    #[test]
    fn parse_accepts_ip_options() {
        let bytes = sample(b"opt".to_vec()).to_bytes();
        // Insert 4 bytes of options (NOPs), fix IHL, total length, checksum.
        let mut f = bytes[..34].to_vec();
        f.extend_from_slice(&[1, 1, 1, 1]);
        f.extend_from_slice(&bytes[34..]);
        f[14] = 0x46;
        let total = u16::from_be_bytes([f[16], f[17]]) + 4;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f[24..26].copy_from_slice(&[0, 0]);
        let sum = internet_checksum(&f[14..38]);
        f[24..26].copy_from_slice(&sum.to_be_bytes());
        let parsed = ParsedUdp::parse(&f).expect("parses");
        assert_eq!(parsed.payload, b"opt");
        assert!(ipv4_checksum_valid(&f));
        assert!(udp_checksum_valid(&f));
    }

    #[test]
    fn seq_payloads() {
        for (seq, len) in [(0, 0), (1, 12), (u64::MAX, 13), (123_456_789, 1400)] {
            let p = seq_payload(seq, len);
            assert_eq!(p.len(), len.max(SEQ_HEADER_LEN));
            assert_eq!(payload_seq(&p), Some(seq));
        }
        let mut p = seq_payload(5, 40);
        p[30] ^= 1;
        assert_eq!(payload_seq(&p), None, "corrupted filler");
        assert_eq!(payload_seq(b"RLSQ"), None);
        assert_eq!(payload_seq(&[0; 20]), None);
    }

    /// Expected values computed by the C `flow_hash` of `ebpf/src/l4lb.c`,
    /// compiled for x86-64 and fed the wire bytes of these fields.
    #[test]
    fn l4lb_flow_hash_matches_c() {
        type Case = ([u8; 4], [u8; 4], u16, u16, u8, u32);
        let cases: [Case; 4] = [
            (
                [169, 254, 77, 2],
                [169, 254, 77, 1],
                12345,
                5000,
                IPPROTO_UDP,
                0xa044_5b26,
            ),
            (
                [10, 0, 0, 1],
                [10, 0, 0, 2],
                80,
                8080,
                IPPROTO_TCP,
                0x0ade_7897,
            ),
            (
                [255, 255, 255, 255],
                [0, 0, 0, 0],
                65535,
                1,
                IPPROTO_UDP,
                0x2250_e2de,
            ),
            (
                [192, 168, 1, 100],
                [169, 254, 77, 10],
                60000,
                53,
                IPPROTO_UDP,
                0x34d6_492e,
            ),
        ];
        for (s, d, sp, dp, proto, want) in cases {
            if cfg!(target_endian = "little") {
                assert_eq!(
                    l4lb_flow_hash(s, d, sp, dp, proto),
                    want,
                    "{s:?} {d:?} {sp} {dp}"
                );
            }
        }
        let frame = sample(vec![]);
        assert_eq!(
            frame.l4lb_flow_hash(),
            l4lb_flow_hash(
                [169, 254, 77, 2],
                [169, 254, 77, 1],
                40000,
                5000,
                IPPROTO_UDP
            )
        );
    }

    #[test]
    fn mac_formatting() {
        assert_eq!(
            mac_to_string(&[0x02, 0, 0xab, 0, 0, 0xff]),
            "02:00:ab:00:00:ff"
        );
    }
}
