//! zstd-compressed gRPC messages from agents, decompressed in front of tonic with pooled
//! decompression contexts.
//!
//! tonic 0.14 decompresses each message with a new `zstd::stream::read::Decoder`: a
//! decompression context created, its window buffer allocated, and the output copied out
//! 8 KiB at a time. For agents' batches (a few KiB compressed) that set-up costs half again
//! the decompression itself: counted with callgrind, 322,000 instructions per 1,000-series
//! batch against 210,000 with a reused context (docs/performance.md). [`ZstdFrames`] wraps
//! the `Ingest` service: on a stream whose `grpc-encoding` is `zstd`, it reads the gRPC
//! framing (a flag byte, a 32-bit length, the message) and hands tonic each compressed
//! message decompressed, flagged as uncompressed, so tonic's own decoder does not run.
//!
//! Everything tonic checks stays checked with tonic's words: a message larger than
//! `grpc.max_message_bytes`, compressed or decompressed, ends the stream with the status tonic
//! gives (`OUT_OF_RANGE` for a length over the limit, `RESOURCE_EXHAUSTED` for a message
//! that decompresses past it); bytes that are not zstd give `INTERNAL`; uncompressed
//! messages, unknown flags and a stream that ends inside a message pass through unchanged
//! for tonic to judge. Contexts are kept in a small pool shared by the runtime's threads
//! rather than per stream or per thread: tonic's encoder streams its frames without a
//! content size, so they declare a 2 MiB window and a context holds about 2.4 MiB; ten
//! thousand agents' streams would hold gigabytes, and the threads `block_in_place` rotates
//! through one each. The pool keeps as many contexts as there are CPUs (the most that can be
//! decompressing at once without waiting); one whose window grew past
//! [`KEPT_CONTEXT_BYTES`] (a peer declared a larger one) is dropped after its message.

use std::pin::Pin;
use std::sync::{Mutex, OnceLock};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http_body::Frame;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use zstd_safe::{DCtx, DParameter, InBuffer, OutBuffer, ResetDirective};

/// The gRPC message prefix: a compressed flag and a big-endian 32-bit length.
const PREFIX: usize = 5;

/// A context is dropped after a message once it holds more than this: tonic's encoder
/// declares a 2 MiB window, for a context of about 2.4 MiB.
pub const KEPT_CONTEXT_BYTES: usize = 4 << 20;

/// The largest window a message may declare (zstd's own default limit: 128 MiB).
const WINDOW_LOG_MAX: u32 = 27;

/// Decompression contexts not in use.
static IDLE_CONTEXTS: Mutex<Vec<DCtx<'static>>> = Mutex::new(Vec::new());

/// How many idle contexts are kept: one per CPU.
fn contexts_kept() -> usize {
    static KEPT: OnceLock<usize> = OnceLock::new();
    *KEPT.get_or_init(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
}

/// The `Ingest` service with its zstd-compressed requests decompressed in front of it.
#[derive(Clone)]
pub struct ZstdFrames<S> {
    inner: S,
    /// `grpc.max_message_bytes`: the service's own limit, which it must be given too.
    limit: usize,
}

impl<S> ZstdFrames<S> {
    pub fn new(inner: S, limit: usize) -> Self {
        ZstdFrames { inner, limit }
    }
}

impl<S: NamedService> NamedService for ZstdFrames<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for ZstdFrames<S>
where
    S: Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let zstd = request
            .headers()
            .get("grpc-encoding")
            .is_some_and(|encoding| encoding.as_bytes() == b"zstd");
        let limit = self.limit;
        let request = match zstd {
            true => request.map(|body| Body::new(DecompressedBody::new(body, limit))),
            false => request,
        };
        self.inner.call(request)
    }
}

/// A request body whose zstd-compressed gRPC messages come out decompressed.
struct DecompressedBody {
    inner: Body,
    /// Bytes received and not yet handed on: at most one message's and its prefix.
    received: BytesMut,
    limit: usize,
    /// Set once something tonic must judge went by (an unknown flag, an oversized length):
    /// from then on bytes pass through as received.
    passing_through: bool,
    /// Trailers that came while part of a message was left, handed on after it.
    trailers: Option<http::HeaderMap>,
}

impl DecompressedBody {
    fn new(inner: Body, limit: usize) -> Self {
        DecompressedBody {
            inner,
            received: BytesMut::new(),
            limit,
            passing_through: false,
            trailers: None,
        }
    }

    /// The next message to hand on, if `received` holds a whole one (or, passing through,
    /// whatever it holds).
    fn next_message(&mut self) -> Result<Option<Bytes>, Status> {
        if self.passing_through {
            return Ok((!self.received.is_empty()).then(|| self.received.split().freeze()));
        }
        let Some(prefix) = self.received.first_chunk::<PREFIX>() else {
            return Ok(None);
        };
        let flag = prefix[0];
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if !matches!(flag, 0 | 1) || len > self.limit {
            // An unknown flag, or too large even compressed: tonic's decoder gives the status
            // it gives without this layer, and ends the stream.
            self.passing_through = true;
            return Ok(Some(self.received.split().freeze()));
        }
        if self.received.len() < PREFIX + len {
            self.received.reserve(PREFIX + len - self.received.len());
            return Ok(None);
        }
        let message = self.received.split_to(PREFIX + len);
        match flag {
            0 => Ok(Some(message.freeze())),
            _ => decompress(&message[PREFIX..], self.limit).map(Some),
        }
    }
}

impl http_body::Body for DecompressedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        loop {
            if let Some(message) = this.next_message()? {
                return Poll::Ready(Some(Ok(Frame::data(message))));
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(mut data) => {
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            this.received.extend_from_slice(chunk);
                            let n = chunk.len();
                            data.advance(n);
                        }
                    }
                    // Trailers end the stream: after whatever part of a message is left, as
                    // tonic would have had it (it ends a request stream at its trailers).
                    Err(trailers) => {
                        if !this.received.is_empty() {
                            this.passing_through = true;
                            this.trailers = trailers.into_trailers().ok();
                            let rest = this.received.split().freeze();
                            return Poll::Ready(Some(Ok(Frame::data(rest))));
                        }
                        return Poll::Ready(Some(Ok(trailers)));
                    }
                },
                Some(Err(status)) => return Poll::Ready(Some(Err(status))),
                None => {
                    // Ended inside a message: tonic reports it ("Unexpected EOF").
                    return Poll::Ready(match this.received.is_empty() {
                        true => None,
                        false => Some(Ok(Frame::data(this.received.split().freeze()))),
                    });
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.received.is_empty() && self.trailers.is_none() && self.inner.is_end_stream()
    }
}

/// One compressed message's bytes (one or more zstd frames), decompressed after an
/// uncompressed message prefix, in at most `limit` bytes.
fn decompress(compressed: &[u8], limit: usize) -> Result<Bytes, Status> {
    // No frame at all is an incomplete one to tonic's decoder.
    if compressed.is_empty() {
        return Err(incomplete());
    }
    let pooled = IDLE_CONTEXTS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .pop();
    let mut context = match pooled {
        Some(context) => context,
        None => {
            let mut context = DCtx::try_create().ok_or_else(|| {
                Status::internal("Error decompressing: no memory for a zstd context")
            })?;
            context
                .set_parameter(DParameter::WindowLogMax(WINDOW_LOG_MAX))
                .map_err(zstd_error)?;
            context
        }
    };
    let result = decompress_with(&mut context, compressed, limit);
    // A context that failed midway is not reused; one that grew large is let go.
    if result.is_ok() && context.sizeof() <= KEPT_CONTEXT_BYTES {
        let mut idle = IDLE_CONTEXTS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if idle.len() < contexts_kept() {
            idle.push(context);
        }
    }
    result
}

/// tonic's words for each way decompressing fails (tonic 0.14's decoder).
fn too_large(limit: usize) -> Status {
    Status::resource_exhausted(format!(
        "Error decompressing: size limit, of {limit} bytes, exceeded while decompressing message"
    ))
}

fn zstd_error(code: usize) -> Status {
    Status::internal(format!(
        "Error decompressing: {}, while sending request",
        zstd_safe::get_error_name(code)
    ))
}

fn incomplete() -> Status {
    Status::internal("Error decompressing: incomplete frame, while sending request")
}

fn decompress_with(
    context: &mut DCtx<'static>,
    compressed: &[u8],
    limit: usize,
) -> Result<Bytes, Status> {
    context
        .reset(ResetDirective::SessionOnly)
        .map_err(zstd_error)?;
    // Room for one byte past the limit, to tell a message that ends at the limit from one
    // that goes past it. Agents' batches compress about twelvefold; the buffer starts there
    // and doubles as needed.
    let most = limit.saturating_add(1 + PREFIX);
    let first = compressed.len().saturating_mul(16).max(16 << 10);
    let mut out: Vec<u8> = Vec::with_capacity(PREFIX + first.min(most - PREFIX));
    out.extend_from_slice(&[0; PREFIX]);
    let mut input = InBuffer::around(compressed);
    loop {
        if out.len() == out.capacity() {
            out.reserve_exact((out.len() - PREFIX).max(16 << 10).min(most - out.len()));
        }
        let before = (input.pos(), out.len());
        let hint = {
            let at = out.len();
            let mut output = OutBuffer::around_pos(&mut out, at);
            context.decompress_stream(&mut output, &mut input)
        }
        .map_err(zstd_error)?;
        if out.len() - PREFIX > limit {
            return Err(too_large(limit));
        }
        if hint == 0 && input.pos() == compressed.len() {
            break;
        }
        if (input.pos(), out.len()) == before && out.len() < out.capacity() {
            // The input ran out inside a frame.
            return Err(incomplete());
        }
    }
    let len = u32::try_from(out.len() - PREFIX).map_err(|_| too_large(limit))?;
    out[1..PREFIX].copy_from_slice(&len.to_be_bytes());
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A gRPC message prefix and body.
    fn message(flag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![flag];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    /// One zstd frame of `body`.
    fn zstd(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(zstd_safe::compress_bound(body.len()));
        zstd_safe::compress(&mut out, body, 3).expect("compressed");
        out
    }

    fn compressed(body: &[u8]) -> Vec<u8> {
        message(1, &zstd(body))
    }

    /// Feeds `stream` to a decompressing body in chunks of `chunk` bytes, then trailers, and
    /// collects what comes out: data bytes, or the first error.
    async fn through(stream: &[u8], chunk: usize, limit: usize) -> Result<Vec<u8>, Status> {
        let frames: Vec<Result<Frame<Bytes>, Status>> = stream
            .chunks(chunk.max(1))
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .chain([Ok(Frame::trailers(http::HeaderMap::new()))])
            .collect();
        let inner = Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames)));
        let mut body = DecompressedBody::new(inner, limit);
        let mut out = Vec::new();
        let mut trailers = false;
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            assert!(!trailers, "data after the trailers");
            match frame.into_data() {
                Ok(data) => out.extend_from_slice(&data),
                Err(_) => trailers = true,
            }
        }
        assert!(trailers, "the trailers came through, last");
        Ok(out)
    }

    /// Compressed messages come out decompressed and flagged as uncompressed, uncompressed
    /// ones as they were, in order, however the stream is split into chunks.
    #[tokio::test]
    async fn messages_come_out_decompressed_whatever_the_chunks() {
        let batch: Vec<u8> = (0..40_000u32)
            .map(|i| (i % 251) as u8 ^ (i / 97) as u8)
            .collect();
        let mut stream = compressed(&batch);
        stream.extend(message(0, b"plain"));
        stream.extend(compressed(b""));
        stream.extend(compressed(&batch[..100]));
        let mut expected = message(0, &batch);
        expected.extend(message(0, b"plain"));
        expected.extend(message(0, b""));
        expected.extend(message(0, &batch[..100]));
        assert!(
            through(&message(1, b""), 3, 1 << 20).await.is_err(),
            "no frame at all"
        );
        for chunk in [1, 2, 4, 5, 6, 7, 64, 1000, 4096, stream.len()] {
            let out = through(&stream, chunk, 1 << 20)
                .await
                .expect("decompressed");
            assert!(out == expected, "chunks of {chunk} bytes");
        }
        // Two zstd frames in one message are one message, as zstd's decoder reads them.
        let mut two = zstd(b"first ");
        two.extend(zstd(b"second"));
        let out = through(&message(1, &two), 3, 1 << 20)
            .await
            .expect("two frames");
        assert_eq!(out, message(0, b"first second"));
    }

    /// A message that decompresses past the limit (a decompression bomb) ends the stream
    /// with tonic's status; one exactly at the limit passes.
    #[tokio::test]
    async fn a_message_past_the_limit_when_decompressed_is_refused() {
        let zeros = vec![0u8; 10 << 20];
        let bomb = compressed(&zeros);
        assert!(bomb.len() < 4096, "{} bytes", bomb.len());
        let status = through(&bomb, 4096, 1 << 20).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("size limit, of 1048576 bytes"),
            "{status:?}"
        );

        let exact = compressed(&zeros[..1 << 20]);
        let out = through(&exact, 4096, 1 << 20).await.expect("at the limit");
        assert_eq!(out.len(), PREFIX + (1 << 20));
        let over = compressed(&zeros[..(1 << 20) + 1]);
        assert!(
            through(&over, 4096, 1 << 20).await.is_err(),
            "one byte over"
        );
    }

    /// Bytes that are not zstd, or a frame cut short, give `INTERNAL`; and the context is
    /// fit for the next message.
    #[tokio::test]
    async fn corrupt_or_truncated_messages_are_refused() {
        let status = through(&message(1, b"not zstd at all"), 7, 1 << 20)
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(
            status.message().starts_with("Error decompressing"),
            "{status:?}"
        );

        let whole = zstd(&[7u8; 5000]);
        let cut = message(1, &whole[..whole.len() - 3]);
        let status = through(&cut, 7, 1 << 20).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");

        let out = through(&compressed(b"after"), 7, 1 << 20)
            .await
            .expect("fine");
        assert_eq!(out, message(0, b"after"));
    }

    /// What tonic judges passes through untouched: an unknown flag, a length over the
    /// limit, and a stream that ends inside a message (its trailers after it).
    #[tokio::test]
    async fn what_tonic_judges_passes_through() {
        let unknown = message(2, b"whatever");
        assert_eq!(through(&unknown, 3, 1 << 20).await.unwrap(), unknown);
        let mut oversized = compressed(b"small");
        oversized[1..5].copy_from_slice(&(2u32 << 20).to_be_bytes());
        assert_eq!(through(&oversized, 3, 1 << 20).await.unwrap(), oversized);
        let mut cut = compressed(b"then the stream ends");
        cut.truncate(cut.len() - 2);
        assert_eq!(through(&cut, 4, 1 << 20).await.unwrap(), cut);
    }
}
