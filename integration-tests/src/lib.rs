//! Test harness for Rootlet's integration tests: throwaway network namespaces
//! joined by a veth pair, hand-built UDP frames, and real traffic between them.
//!
//! The tests run as root. [`netns::VethPair::new`] makes two fresh, uniquely
//! named namespaces, `host` (where a rootlet attaches its XDP program, on
//! `rl0`) and `peer` (the traffic source, `rl1`), addressed in
//! `169.254.77.0/24` with static neighbour entries, so nothing leaves the
//! namespaces and no ARP is involved. Everything is deleted on drop, so tests
//! can run concurrently.
//!
//! ```
//! use std::net::SocketAddrV4;
//! use std::time::{Duration, Instant};
//! use rootlet_integration_tests::{netns::VethPair, traffic::{RawSocket, UdpSink}};
//!
//! let pair = VethPair::new()?;
//! let sink = UdpSink::bind(pair.host(), SocketAddrV4::new(pair.host_ip(), 0))?;
//! let raw = RawSocket::open(pair.peer(), pair.peer_if())?;
//! let frame = pair.udp_to_host(40000, sink.port(), b"hello".to_vec());
//! raw.send(&frame.to_bytes())?;
//! let got = sink.recv_n(1, Instant::now() + Duration::from_secs(2))?;
//! assert_eq!(got, vec![b"hello".to_vec()]);
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! # Layout
//!
//! - [`agentd`]: [`agentd::Agent`], an in-process rootletd for the API
//!   suites (mTLS, roles, a trusted signing key, the fixture's rootlet).
//! - [`api`]: rootlet.v1 requests the API tests share (the fixture's
//!   interface, a load, a stage, a link, a bundle, an error's details).
//! - [`fixture`]: what every data-plane test starts from (a
//!   [`netns::VethPair`], its own bpffs root and store, the backend under
//!   test); see its own docs.
//! - [`fleet`]: [`fleet::RealFleet`], N real `rootletd` agents, each in
//!   its own namespaces with its own veth pair and traffic, for the fleet
//!   rollout tests and benchmark.
//! - [`netns`]: [`netns::Netns`] (a named namespace: `ip netns add`, run a
//!   closure or a command inside, deleted on drop) and [`netns::VethPair`]
//!   (two namespaces joined by `rl0`/`rl1`, plus XDP and GRO helpers).
//! - [`packet`]: Ethernet + IPv4 + UDP frames ([`packet::UdpFrame`],
//!   [`packet::ParsedUdp`]), checksum checks, sequence-numbered payloads and
//!   [`packet::l4lb_flow_hash`], the flow hash of `ebpf/src/l4lb.c`.
//! - [`policy`]: the sample stages' policies in kernel form (blocklist,
//!   services), filled as the agent does (`build_inner` + `swap`).
//! - [`pki`]: [`pki::Pki`], a throwaway CA with server and client
//!   certificates (and an untrusted CA) for tests of the gRPC API.
//! - [`registry`]: [`registry::TestRegistry`], Debian's `docker-registry`
//!   on 127.0.0.1 with TLS from the test PKI, for the OCI distribution tests.
//! - [`rootletd`]: `rootletd` as a process (spawn with a config file,
//!   wait bounded for its exit), for restart and crash tests.
//! - [`traffic`]: [`traffic::RawSocket`] (AF_PACKET on one interface),
//!   [`traffic::UdpSink`] (a bound UDP socket), [`traffic::Blaster`] (paced
//!   sender thread that skips rather than bursts when it falls behind) and
//!   [`traffic::SeqReceiver`] (records which sequence numbers arrived).
//! - [`witness`]: how traffic tests are judged: by what the data plane saw
//!   (the `test_witness` stage's per-sequence counts, [`witness::Judgement`])
//!   and, separately, whether the socket got what the data plane passed, or
//!   the stack counted the drops ([`witness::Delivery`]).
//! - `sys` (private): the only `unsafe` code, thin libc wrappers for the
//!   socket calls `std` and `nix` do not cover.
#![deny(unsafe_code)]

pub mod agentd;
pub mod api;
pub mod fixture;
pub mod fleet;
pub mod netns;
pub mod packet;
pub mod pki;
pub mod policy;
pub mod registry;
pub mod rootletd;
pub mod traffic;
pub mod witness;

/// Thin wrappers around the libc calls that `std` and `nix` (with the
/// workspace's features) do not offer. All of the crate's `unsafe` is here.
#[allow(unsafe_code)]
mod sys {
    use std::ffi::c_void;
    use std::io;
    use std::mem::size_of;
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
    use std::time::Duration;

    /// `linux/if_packet.h`; spelled out because libc does not export them on
    /// every target.
    const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
    pub(crate) const PACKET_OUTGOING: u8 = 4;
    /// `asm-generic/socket.h` (x86-64, arm64).
    const SO_RCVBUFFORCE: libc::c_int = 33;
    /// `linux/sockios.h`, `linux/ethtool.h`.
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GGRO: u32 = 0x2b;
    const ETHTOOL_SGRO: u32 = 0x2c;

    fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }

    fn cvt_len(ret: libc::ssize_t) -> io::Result<usize> {
        usize::try_from(ret).map_err(|_| io::Error::last_os_error())
    }

    fn socket(domain: libc::c_int, ty: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
        // SAFETY: socket(2) takes no pointers; the result is checked.
        let raw = cvt(unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) })?;
        // SAFETY: `raw` is a descriptor socket(2) just returned; nothing else
        // owns it, so the OwnedFd may close it.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }

    fn setsockopt<T>(
        fd: BorrowedFd<'_>,
        level: libc::c_int,
        name: libc::c_int,
        value: &T,
    ) -> io::Result<()> {
        let len = libc::socklen_t::try_from(size_of::<T>()).map_err(io::Error::other)?;
        // SAFETY: `value` points to `len` readable bytes for the whole call;
        // the kernel copies them and keeps no reference.
        cvt(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                name,
                (value as *const T).cast::<c_void>(),
                len,
            )
        })?;
        Ok(())
    }

    /// An AF_PACKET/SOCK_RAW socket receiving every protocol on `ifindex`, in
    /// the network namespace of the calling thread. Outgoing frames are
    /// filtered out by the kernel where it supports that (Linux 4.20+).
    pub(crate) fn packet_socket(ifindex: u32) -> io::Result<OwnedFd> {
        let ifindex = libc::c_int::try_from(ifindex).map_err(io::Error::other)?;
        // Protocol 0: receive nothing until bind() names the interface, so
        // no frame from another interface can slip into the queue.
        let fd = socket(libc::AF_PACKET, libc::SOCK_RAW, 0)?;
        // Best effort: on kernels without the option, recv skips them anyway.
        let _ = setsockopt(
            fd.as_fd(),
            libc::SOL_PACKET,
            PACKET_IGNORE_OUTGOING,
            &1 as &libc::c_int,
        );
        let eth_p_all = (libc::ETH_P_ALL as u16).to_be();
        let addr = libc::sockaddr_ll {
            sll_family: libc::AF_PACKET as libc::c_ushort,
            sll_protocol: eth_p_all,
            sll_ifindex: ifindex,
            sll_hatype: 0,
            sll_pkttype: 0,
            sll_halen: 0,
            sll_addr: [0; 8],
        };
        let len =
            libc::socklen_t::try_from(size_of::<libc::sockaddr_ll>()).map_err(io::Error::other)?;
        // SAFETY: `addr` is a valid sockaddr_ll of `len` bytes for the call.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast::<libc::sockaddr>(),
                len,
            )
        })?;
        Ok(fd)
    }

    /// send(2) of one whole frame; returns the number of bytes sent.
    pub(crate) fn send(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for `buf.len()` bytes for the call.
        cvt_len(unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast::<c_void>(), buf.len(), 0) })
    }

    /// One frame, if one is queued: (its full length, which may exceed
    /// `buf.len()` if truncated, and its `sll_pkttype`). Never blocks.
    pub(crate) fn recv_frame(
        fd: BorrowedFd<'_>,
        buf: &mut [u8],
    ) -> io::Result<Option<(usize, u8)>> {
        let mut addr = libc::sockaddr_ll {
            sll_family: 0,
            sll_protocol: 0,
            sll_ifindex: 0,
            sll_hatype: 0,
            sll_pkttype: 0,
            sll_halen: 0,
            sll_addr: [0; 8],
        };
        let mut len =
            libc::socklen_t::try_from(size_of::<libc::sockaddr_ll>()).map_err(io::Error::other)?;
        // SAFETY: `buf` is writable for `buf.len()` bytes and `addr` for
        // `len` bytes during the call; the kernel writes no further.
        let ret = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast::<c_void>(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                (&mut addr as *mut libc::sockaddr_ll).cast::<libc::sockaddr>(),
                &mut len,
            )
        };
        match cvt_len(ret) {
            Ok(n) => Ok(Some((n, addr.sll_pkttype))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Waits until `fd` is readable or `timeout` passes; true if readable.
    pub(crate) fn poll_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // Round up so a sub-millisecond remainder still waits.
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `pfd` is one valid pollfd for the duration of the call.
        match cvt(unsafe { libc::poll(&mut pfd, 1, ms) }) {
            Ok(n) => Ok(n > 0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// SO_SNDTIMEO, so a blocking send cannot hang a test.
    pub(crate) fn set_send_timeout(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).map_err(io::Error::other)?,
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
        };
        setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, &tv)
    }

    /// Receive buffer of `bytes`: SO_RCVBUFFORCE (root may exceed
    /// `net.core.rmem_max`), falling back to SO_RCVBUF.
    pub(crate) fn set_recv_buffer(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
        let bytes = libc::c_int::try_from(bytes).map_err(io::Error::other)?;
        setsockopt(fd, libc::SOL_SOCKET, SO_RCVBUFFORCE, &bytes)
            .or_else(|_| setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &bytes))
    }

    /// `struct ethtool_value`.
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }

    /// `struct ifreq` with the `ifr_data` member of its union.
    #[repr(C)]
    struct IfreqData {
        name: [u8; libc::IFNAMSIZ],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }

    /// Reads, and if `set` is given first writes, an interface's GRO flag
    /// through the legacy ethtool ioctl, in the calling thread's namespace.
    pub(crate) fn ethtool_gro(ifname: &str, set: Option<bool>) -> io::Result<bool> {
        let mut name = [0u8; libc::IFNAMSIZ];
        if ifname.is_empty() || ifname.len() >= name.len() || ifname.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad interface name {ifname:?}"),
            ));
        }
        name[..ifname.len()].copy_from_slice(ifname.as_bytes());
        let sock = socket(libc::AF_INET, libc::SOCK_DGRAM, 0)?;
        let call = |cmd: u32, data: u32| -> io::Result<u32> {
            let mut value = EthtoolValue { cmd, data };
            let mut ifr = IfreqData {
                name,
                data: &mut value,
                _pad: [0; 16],
            };
            // SAFETY: `ifr` is a valid ifreq whose data pointer refers to
            // `value`; both live across the call, which only reads/writes
            // them.
            cvt(unsafe {
                libc::ioctl(
                    sock.as_raw_fd(),
                    SIOCETHTOOL as _,
                    &mut ifr as *mut IfreqData,
                )
            })?;
            Ok(value.data)
        };
        if let Some(on) = set {
            call(ETHTOOL_SGRO, u32::from(on))?;
        }
        Ok(call(ETHTOOL_GGRO, 0)? != 0)
    }
}
