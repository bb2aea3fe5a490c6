//! Lets stock gRPC clients use the Unix socket without a setting.
//!
//! gRPC's C core (grpcio, since 1.57) sends the socket path, percent-encoded
//! (`tmp%2Frootlet%2Frootletd.sock`), as `:authority` for a `unix:` target.
//! h2 (under tonic) rejects an invalid authority while it decodes the
//! HEADERS frame and resets the stream (PROTOCOL_ERROR), before a request
//! exists for tonic or a tower layer to see, and has no setting to relax
//! it. So the fix sits below h2, on the bytes of a Unix connection: in each
//! HEADERS frame the client sends, a literal (not Huffman-coded)
//! `:authority` value that is not a valid authority has every byte outside
//! RFC 3986's unreserved set replaced by `-`, in place. The length of the
//! value, of the header block and of the frame stay the same, so nothing
//! else changes, and the HPACK dynamic table h2 builds holds the rewritten
//! value for later references to it. The authority means nothing on a Unix
//! socket; rootletd never reads it.
//!
//! What is not rewritten (passed on as it is, so h2 still refuses it): a
//! Huffman-coded value, a value split across a CONTINUATION frame, and an
//! `:authority` whose name is a dynamic-table reference. A connection that
//! does not start with the HTTP/2 preface is passed on untouched.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::codegen::http::uri::Authority;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADERS: u8 = 0x1;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// HEADERS frames longer than this are passed on without a look (h2's
/// default SETTINGS_MAX_FRAME_SIZE is 16 KiB; a client may not send more).
const MAX_HELD: usize = 1 << 20;

/// The client-to-server half of a connection, scanned frame by frame.
#[derive(Debug, Default)]
struct Scan {
    /// Bytes of the preface seen so far; `None` once it was checked.
    preface: Option<usize>,
    /// The connection is not HTTP/2 with prior knowledge: pass everything.
    opaque: bool,
    /// A frame header being read.
    header: Vec<u8>,
    /// Bytes of a frame's payload to pass on unread.
    pass: usize,
    /// A HEADERS frame's payload being collected: (flags, length, bytes).
    held: Option<(u8, usize, Vec<u8>)>,
}

impl Scan {
    fn new() -> Self {
        Scan {
            preface: Some(0),
            ..Scan::default()
        }
    }

    /// Feeds bytes read from the client; appends what may go on to `out`.
    fn feed(&mut self, mut data: &[u8], out: &mut Vec<u8>) {
        while !data.is_empty() {
            if self.opaque {
                out.extend_from_slice(data);
                return;
            }
            if let Some(seen) = self.preface {
                let n = data.len().min(PREFACE.len() - seen);
                if data[..n] != PREFACE[seen..seen + n] {
                    self.opaque = true;
                    continue;
                }
                out.extend_from_slice(&data[..n]);
                data = &data[n..];
                self.preface = (seen + n < PREFACE.len()).then_some(seen + n);
                continue;
            }
            if self.pass > 0 {
                let n = data.len().min(self.pass);
                out.extend_from_slice(&data[..n]);
                self.pass -= n;
                data = &data[n..];
                continue;
            }
            if let Some((_, len, buf)) = &mut self.held {
                let n = data.len().min(*len - buf.len());
                buf.extend_from_slice(&data[..n]);
                data = &data[n..];
                if buf.len() == *len
                    && let Some((flags, _, mut buf)) = self.held.take()
                {
                    rewrite_headers(flags, &mut buf);
                    out.extend_from_slice(&buf);
                }
                continue;
            }
            let n = data.len().min(9 - self.header.len());
            self.header.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.header.len() == 9 {
                let h = std::mem::take(&mut self.header);
                let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                out.extend_from_slice(&h);
                if h[3] == FRAME_HEADERS && len > 0 && len <= MAX_HELD {
                    self.held = Some((h[4], len, Vec::with_capacity(len)));
                } else {
                    self.pass = len;
                }
            }
        }
    }
}

/// Reads an HPACK integer with an `n`-bit prefix at `pos`.
fn hpack_int(b: &[u8], pos: usize, n: u32) -> Option<(usize, usize)> {
    let mask = (1u16 << n) as u8 - 1;
    let first = *b.get(pos)? & mask;
    if first < mask {
        return Some((first as usize, pos + 1));
    }
    let mut value = mask as usize;
    let mut shift = 0;
    let mut p = pos + 1;
    loop {
        let byte = *b.get(p)?;
        p += 1;
        value = value.checked_add(((byte & 0x7f) as usize).checked_shl(shift)?)?;
        if byte & 0x80 == 0 {
            return Some((value, p));
        }
        shift += 7;
        if shift > 28 {
            return None;
        }
    }
}

/// An HPACK string at `pos`: (Huffman-coded, start, end).
fn hpack_str(b: &[u8], pos: usize) -> Option<(bool, usize, usize)> {
    let huffman = *b.get(pos)? & 0x80 != 0;
    let (len, start) = hpack_int(b, pos, 7)?;
    let end = start.checked_add(len)?;
    (end <= b.len()).then_some((huffman, start, end))
}

/// Rewrites, in place, an invalid literal `:authority` in a HEADERS frame's
/// payload. Stops at anything it cannot parse, leaving the rest as it is.
fn rewrite_headers(flags: u8, payload: &mut [u8]) {
    let mut start = 0;
    let mut end = payload.len();
    if flags & FLAG_PADDED != 0 {
        let Some(&pad) = payload.first() else { return };
        start = 1;
        let Some(e) = end.checked_sub(pad as usize) else {
            return;
        };
        end = e;
    }
    if flags & FLAG_PRIORITY != 0 {
        start += 5;
    }
    if start > end {
        return;
    }
    rewrite_block(&mut payload[start..end]);
}

fn rewrite_block(b: &mut [u8]) {
    let mut pos = 0;
    while pos < b.len() {
        let first = b[pos];
        let prefix = if first & 0x80 != 0 {
            // Indexed field: nothing literal.
            let Some((_, p)) = hpack_int(b, pos, 7) else {
                return;
            };
            pos = p;
            continue;
        } else if first & 0xc0 == 0x40 {
            6
        } else if first & 0xe0 == 0x20 {
            // Dynamic table size update.
            let Some((_, p)) = hpack_int(b, pos, 5) else {
                return;
            };
            pos = p;
            continue;
        } else {
            4
        };
        let Some((index, p)) = hpack_int(b, pos, prefix) else {
            return;
        };
        pos = p;
        let is_authority = if index == 0 {
            let Some((huffman, s, e)) = hpack_str(b, pos) else {
                return;
            };
            pos = e;
            !huffman && &b[s..e] == b":authority"
        } else {
            // Static table entry 1 is :authority.
            index == 1
        };
        let Some((huffman, s, e)) = hpack_str(b, pos) else {
            return;
        };
        pos = e;
        if is_authority && !huffman {
            fix_authority(&mut b[s..e]);
        }
    }
}

/// Makes `value` a valid authority if it is not one, keeping its length.
fn fix_authority(value: &mut [u8]) {
    if value.is_empty() || Authority::try_from(&*value).is_ok() {
        return;
    }
    for byte in value.iter_mut() {
        if !(byte.is_ascii_alphanumeric() || b"-._~".contains(byte)) {
            *byte = b'-';
        }
    }
    tracing::debug!(authority = %String::from_utf8_lossy(value), "rewrote an invalid :authority on the Unix socket");
}

/// A Unix connection whose client-to-server bytes pass through [`Scan`].
pub struct FixAuthority<S> {
    inner: S,
    scan: Scan,
    out: Vec<u8>,
    out_pos: usize,
}

impl<S> FixAuthority<S> {
    pub fn new(inner: S) -> Self {
        FixAuthority {
            inner,
            scan: Scan::new(),
            out: vec![],
            out_pos: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FixAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut tmp = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut tmp);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let got = rb.filled();
                    if got.is_empty() {
                        // End of stream: whatever is still held goes on as it is.
                        if let Some((_, _, held)) = this.scan.held.take() {
                            this.out.extend_from_slice(&held);
                            continue;
                        }
                        return Poll::Ready(Ok(()));
                    }
                    this.scan.feed(got, &mut this.out);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FixAuthority<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for FixAuthority<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// grpcio 1.85's first HEADERS block for a `unix:` target, as captured.
    const GRPCIO_BLOCK: &str = "40053a70617468232f726f6f746c65742e76312e526f6f746c65742f4765744361706162696c6974696573400a3a617574686f726974791a746d70253246636f6d7061742d72642532466361702e736f636b8386";

    fn frame(typ: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[typ, flags, 0, 0, 0, 1]);
        f.extend_from_slice(payload);
        f
    }

    fn run(input: &[u8], chunk: usize) -> Vec<u8> {
        let mut scan = Scan::new();
        let mut out = vec![];
        for c in input.chunks(chunk) {
            scan.feed(c, &mut out);
        }
        out
    }

    #[test]
    fn grpcio_authority_is_made_valid_in_place() {
        let block = hex::decode(GRPCIO_BLOCK).unwrap();
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, &[]));
        input.extend(frame(FRAME_HEADERS, 0x4, &block));
        input.extend(frame(0x0, 0x1, b"data"));
        for chunk in [1, 7, 4096] {
            let out = run(&input, chunk);
            assert_eq!(out.len(), input.len(), "same length (chunks of {chunk})");
            let text = String::from_utf8_lossy(&out);
            assert!(
                text.contains("tmp-2Fcompat-rd-2Fcap.sock") && !text.contains('%'),
                "{text}"
            );
            assert!(Authority::try_from("tmp-2Fcompat-rd-2Fcap.sock").is_ok());
            assert!(text.ends_with("data"), "later frames pass: {text}");
        }
    }

    #[test]
    fn valid_authorities_and_other_traffic_pass_untouched() {
        // Static-table name (index 1), a valid value: unchanged.
        let mut block = vec![0x41, 9];
        block.extend_from_slice(b"localhost");
        let mut input = PREFACE.to_vec();
        input.extend(frame(FRAME_HEADERS, 0x4 | FLAG_PADDED, &{
            let mut p = vec![2];
            p.extend_from_slice(&block);
            p.extend_from_slice(&[0, 0]);
            p
        }));
        assert_eq!(run(&input, 3), input);
        // An invalid authority in a padded frame under a static-table name.
        let mut bad = vec![0x01, 5];
        bad.extend_from_slice(b"a/b%c");
        let mut input = PREFACE.to_vec();
        input.extend(frame(FRAME_HEADERS, 0x4, &bad));
        let out = run(&input, 5);
        assert!(
            out.ends_with(b"a-b-c"),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
        // Not HTTP/2: untouched.
        let http1 = b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n".to_vec();
        assert_eq!(run(&http1, 2), http1);
        // Truncated or malformed blocks are left as they are.
        let mut input = PREFACE.to_vec();
        input.extend(frame(FRAME_HEADERS, 0x4, &[0x40, 0x7f]));
        assert_eq!(run(&input, 4), input);
    }
}
