//! The secure channel between terminals: WebSocket carrying Noise `NNpsk0`.
//!
//! # Why Noise `NNpsk0`
//!
//! Terminals share one secret per shop and nothing else: no certificates, no per-terminal
//! keys. `Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s` fits that exactly:
//!
//! - **Mutual authentication by the shop secret, bound to the session.** The pre-shared
//!   key (derived from the secret by [`derive_psk`]) is mixed into the key schedule before
//!   the first message, and every handshake and transport message is encrypted and
//!   authenticated under keys that depend on it. A peer without the secret can neither
//!   complete the handshake nor read, forge or alter a single message afterwards; the
//!   secret itself never crosses the wire. (A challenge-response alone would authenticate
//!   the handshake only, leaving the session open to takeover.)
//! - **Forward secrecy and fresh keys.** Both sides contribute an ephemeral X25519 key; the
//!   session keys depend on their shared secret, so every session has new keys, and a
//!   recording of old traffic cannot be decrypted later from the PSK alone.
//! - **Replay-proof.** A replayed first handshake message gets an answer under a new
//!   responder ephemeral that the replayer cannot use: it never obtains the session keys.
//!   Transport messages carry an implicit counter nonce, so a replayed, reordered,
//!   dropped or altered message fails to authenticate.
//! - **Audited primitives.** The handshake and ciphers are [`snow`]'s; this module only
//!   moves its messages and splits frames.
//!
//! # Wire format
//!
//! 1. TCP (`TCP_NODELAY`), then a WebSocket upgrade to `ws://<addr>/p2p`. Every message
//!    after the upgrade is a binary WebSocket message holding exactly one Noise message.
//! 2. Handshake, prologue `possync/p2p/v1`, empty payloads:
//!    `-> psk, e` (48 bytes), `<- e, ee` (48 bytes).
//! 3. Key confirmation: the initiator's first transport message has an empty plaintext
//!    (16 bytes, the tag alone). The responder does not consider the handshake done, and
//!    [`accept`] does not return, until it has opened it: only then does it know that the
//!    initiator is live and holds the session keys, not replaying an old first message.
//!    (WireGuard's responder waits for the initiator's first data packet the same way.)
//! 4. Frames: an application frame (UTF-8 JSON) is cut into chunks of at most 4,079 bytes;
//!    each chunk's plaintext is a flag byte (`0` more follows, `1` last) then the bytes,
//!    sealed into a transport message of at most 4,096 bytes. The receiver reassembles.
//!
//! # Limits and failures
//!
//! - A frame is at most [`ChannelConfig::max_frame_bytes`] (16 MiB by default). The sender
//!   refuses a larger one; the receiver refuses it with [`TransportError::FrameTooLarge`]
//!   as soon as the running size passes the limit, never buffering more, and closes.
//! - The whole dial or accept (TCP, WebSocket upgrade, handshake, confirmation) must finish
//!   within [`ChannelConfig::handshake_timeout`] (10 s by default).
//! - A failed handshake gets a WebSocket Close frame (code 1008, reason
//!   `authentication failed`) and the connection is dropped: there is no secure channel
//!   yet to carry an `error` frame. A transport message that fails to open
//!   ([`TransportError::Decrypt`]) closes the channel the same way.
//! - Nothing received from the network panics.
//!
//! # Memory
//!
//! An idle connection holds, besides the socket: tungstenite's read buffer (1 KiB; it
//! grows, for good, to hold a larger message when one arrives, so 4 to 8 KiB once 4 KiB
//! messages have been received), its write buffer (never freed either: the largest
//! message sent, rounded up by `Vec`'s doubling, so 4 to 8 KiB once a frame of 4 KiB or
//! more has been sent), the session keys (a few hundred bytes) and some small bookkeeping.
//! Reassembly buffers exist only while a frame is in flight and are handed to the caller
//! with the frame; encryption buffers live on the stack of the call that uses them. That
//! is why transport messages are 4 KiB rather than Noise's 64 KiB: tungstenite keeps the
//! capacity of the largest message it has carried. A massif profile of a node with 200
//! idle peers (each sent a neighbour list of about 4 KB) found 7.8 KB of write buffer and
//! the read buffer's initial capacity per connection; see `docs/BENCHMARKS.md`.

mod codec;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod plain_http;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hkdf::Hkdf;
use sha2::Sha256;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Bytes, Message};

use self::codec::{HANDSHAKE_MESSAGE_LEN, MAX_TRANSPORT_MESSAGE, Opener, Sealer};

/// HKDF salt for [`derive_psk`]; changing it changes every shop's key.
pub const PSK_SALT: &[u8] = b"possync/psk/v1";

/// HKDF info for [`derive_psk`].
pub const PSK_INFO: &[u8] = b"noise-psk";

/// The WebSocket path peers dial.
pub const WEBSOCKET_PATH: &str = "/p2p";

/// Default for [`ChannelConfig::max_frame_bytes`]: 16 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// Default for [`ChannelConfig::handshake_timeout`]: 10 s.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Initial capacity of tungstenite's read buffer, also the most it reads in one call.
///
/// It grows (for good) to hold a larger message when one arrives, so this is what an idle
/// connection keeps when its peer has only sent small frames (pings, live changes): 1 KiB
/// holds a live change in one read. The price: a bulk transfer of 4 KiB messages takes
/// about four reads per message instead of one.
const READ_BUFFER_BYTES: usize = 1024;

/// Cap on tungstenite's write buffer. We flush every frame, so it only ever holds one
/// transport message and a control frame or two; this is a safety limit, not an
/// allocation.
const MAX_WRITE_BUFFER_BYTES: usize = 16 * MAX_TRANSPORT_MESSAGE;

/// How long closing may wait for the peer, so a stuck peer cannot stall a close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// The longest Close reason WebSocket allows (a control frame payload is 125 bytes, two of
/// which hold the code).
const MAX_CLOSE_REASON_BYTES: usize = 123;

/// The Close reason sent when a handshake fails, whatever the cause: a peer without the
/// secret learns nothing more.
const AUTHENTICATION_FAILED: &str = "authentication failed";

type WsStream = WebSocketStream<TcpStream>;
type WsSink = SplitSink<WsStream, Message>;
type WsSource = SplitStream<WsStream>;

/// Derives the Noise pre-shared key from the shop's shared secret.
///
/// HKDF-SHA256 with salt [`PSK_SALT`] and info [`PSK_INFO`]. HKDF is not a password hash:
/// someone who records one handshake can test guesses of the secret offline at hash speed,
/// so the shop secret must be a long random string, not a word.
pub fn derive_psk(shop_secret: &str) -> [u8; 32] {
    let mut psk = [0u8; 32];
    Hkdf::<Sha256>::new(Some(PSK_SALT), shop_secret.as_bytes())
        .expand(PSK_INFO, &mut psk)
        // Invariant: HKDF-SHA256 can expand to 255 * 32 bytes; 32 always fits.
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    psk
}

/// Settings of the secure channel, the same on both sides.
#[derive(Clone)]
pub struct ChannelConfig {
    /// The Noise pre-shared key, from [`derive_psk`]; both peers must hold the same one.
    pub psk: [u8; 32],
    /// Largest application frame sent or accepted, in bytes.
    pub max_frame_bytes: usize,
    /// Time allowed for a whole dial or accept, from TCP to key confirmation.
    pub handshake_timeout: Duration,
}

impl ChannelConfig {
    /// The default configuration for a shop secret.
    pub fn from_secret(shop_secret: &str) -> Self {
        Self {
            psk: derive_psk(shop_secret),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }

    /// tungstenite's settings: small buffers, and no WebSocket message larger than one
    /// transport message (or than a frame of `max_frame_bytes` could need, if smaller).
    fn websocket(&self) -> WebSocketConfig {
        let message_limit = self
            .max_frame_bytes
            .saturating_add(codec::CHUNK_OVERHEAD)
            .clamp(HANDSHAKE_MESSAGE_LEN, MAX_TRANSPORT_MESSAGE);
        WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_BYTES)
            .write_buffer_size(0)
            .max_write_buffer_size(MAX_WRITE_BUFFER_BYTES)
            .max_message_size(Some(message_limit))
            .max_frame_size(Some(message_limit))
    }
}

impl fmt::Debug for ChannelConfig {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("ChannelConfig")
            .field("psk", &"<redacted>")
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish()
    }
}

/// Why the secure channel failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The TCP connection failed: refused, reset, or a read or write error.
    #[error("connection I/O failed")]
    Io(#[from] std::io::Error),
    /// The WebSocket layer failed: not a WebSocket upgrade, wrong path, protocol violation.
    #[error("WebSocket failure")]
    WebSocket(#[source] Box<tungstenite::Error>),
    /// The Noise handshake failed: different shop secret, not a handshake message, or the
    /// peer closed the connection before it completed.
    #[error("secure channel handshake failed: {reason}")]
    HandshakeFailed {
        /// What went wrong, in a few words.
        reason: &'static str,
        /// The Noise error, when Noise refused a message.
        #[source]
        source: Option<snow::Error>,
    },
    /// A transport message failed to authenticate or decode: tampered, replayed, reordered,
    /// dropped, or not a valid chunk. The channel is closed.
    #[error("transport message rejected (tampered, replayed, reordered or malformed)")]
    Decrypt,
    /// A frame is larger than the `max_frame_bytes` limit. The channel is closed when this
    /// comes from receiving; a refused send leaves it usable.
    #[error("frame larger than the limit of {limit} bytes")]
    FrameTooLarge {
        /// The limit that was passed.
        limit: usize,
    },
    /// A received frame is not UTF-8. The frame is dropped; the channel stays usable.
    #[error("frame is not valid UTF-8")]
    NotUtf8(#[source] std::str::Utf8Error),
    /// The dial or accept did not finish within `handshake_timeout`.
    #[error("secure channel handshake timed out")]
    Timeout,
    /// The channel is closed: by us, by the peer in the middle of a frame, or by an
    /// earlier error.
    #[error("secure channel closed")]
    Closed,
}

impl TransportError {
    /// Sorts tungstenite's errors into ours. `max_frame_bytes` names the limit in
    /// [`TransportError::FrameTooLarge`] when a WebSocket message is too long.
    fn from_websocket(error: tungstenite::Error, max_frame_bytes: usize) -> Self {
        use tungstenite::error::ProtocolError;
        match error {
            tungstenite::Error::Io(error) => Self::Io(error),
            tungstenite::Error::ConnectionClosed
            | tungstenite::Error::AlreadyClosed
            | tungstenite::Error::Protocol(
                ProtocolError::ResetWithoutClosingHandshake | ProtocolError::SendAfterClosing,
            ) => Self::Closed,
            tungstenite::Error::Capacity(_) => Self::FrameTooLarge { limit: max_frame_bytes },
            error => Self::WebSocket(Box::new(error)),
        }
    }

    /// A short fixed label for a connection refused before it authenticated, for the
    /// rejected-connections panel and metric: who is knocking, in an owner's words.
    pub fn rejection_label(&self) -> &'static str {
        match self {
            Self::HandshakeFailed { reason, .. }
                if reason.contains("did not authenticate") || reason.contains("authentication failed") =>
            {
                "wrong shop secret"
            }
            Self::HandshakeFailed { reason, .. } if reason.contains("closed") => {
                "closed during the handshake"
            }
            Self::HandshakeFailed { .. }
            | Self::WebSocket(_)
            | Self::NotUtf8(_)
            | Self::FrameTooLarge { .. }
            | Self::Decrypt => "not a possync peer",
            Self::Timeout => "handshake timeout",
            Self::Io(_) | Self::Closed => "closed during the handshake",
        }
    }

    fn handshake(reason: &'static str) -> Self {
        Self::HandshakeFailed { reason, source: None }
    }

    fn noise(reason: &'static str, error: snow::Error) -> Self {
        Self::HandshakeFailed { reason, source: Some(error) }
    }
}

/// Dials a peer and sets up the secure channel, as Noise initiator.
///
/// TCP (with `TCP_NODELAY`), WebSocket upgrade to `ws://addr/p2p`, handshake, key
/// confirmation; all within `config.handshake_timeout`.
pub async fn connect(addr: SocketAddr, config: &ChannelConfig) -> Result<SecureChannel, TransportError> {
    let deadline = Instant::now() + config.handshake_timeout;
    let limit = config.max_frame_bytes;
    let stream =
        timeout_at(deadline, TcpStream::connect(addr)).await.map_err(|_| TransportError::Timeout)??;
    stream.set_nodelay(true)?;
    let url = format!("ws://{addr}{WEBSOCKET_PATH}");
    let (mut ws, _response) = timeout_at(
        deadline,
        tokio_tungstenite::client_async_with_config(url, stream, Some(config.websocket())),
    )
    .await
    .map_err(|_| TransportError::Timeout)?
    .map_err(|error| TransportError::from_websocket(error, limit))?;
    match timeout_at(deadline, initiate(&mut ws, config)).await {
        Ok(Ok((sealer, opener))) => Ok(SecureChannel::new(ws, sealer, opener, addr, limit)),
        Ok(Err(error)) => {
            reject(ws, addr, &error).await;
            Err(error)
        }
        Err(_) => {
            reject(ws, addr, &TransportError::Timeout).await;
            Err(TransportError::Timeout)
        }
    }
}

/// Accepts a peer on a TCP connection and sets up the secure channel, as Noise responder.
///
/// WebSocket upgrade (path `/p2p` only), handshake, key confirmation; all within
/// `config.handshake_timeout`. On a failed handshake the peer gets a Close frame with the
/// reason `authentication failed` and the connection is dropped.
pub async fn accept(mut stream: TcpStream, config: &ChannelConfig) -> Result<SecureChannel, TransportError> {
    let deadline = Instant::now() + config.handshake_timeout;
    let limit = config.max_frame_bytes;
    let peer_addr = stream.peer_addr()?;
    stream.set_nodelay(true)?;
    // A plain HTTP request (not an upgrade) gets the documented 404, not a silent close.
    if timeout_at(deadline, plain_http::answer_plain_http(&mut stream))
        .await
        .map_err(|_| TransportError::Timeout)??
    {
        return Err(TransportError::handshake("plain HTTP request (answered 404)"));
    }
    let mut ws = timeout_at(
        deadline,
        tokio_tungstenite::accept_hdr_async_with_config(stream, check_path, Some(config.websocket())),
    )
    .await
    .map_err(|_| TransportError::Timeout)?
    .map_err(|error| TransportError::from_websocket(error, limit))?;
    match timeout_at(deadline, respond(&mut ws, config)).await {
        Ok(Ok((sealer, opener))) => Ok(SecureChannel::new(ws, sealer, opener, peer_addr, limit)),
        Ok(Err(error)) => {
            reject(ws, peer_addr, &error).await;
            Err(error)
        }
        Err(_) => {
            reject(ws, peer_addr, &TransportError::Timeout).await;
            Err(TransportError::Timeout)
        }
    }
}

/// Refuses WebSocket upgrades on any path but [`WEBSOCKET_PATH`].
#[expect(clippy::result_large_err, reason = "the signature is tungstenite's callback's")]
fn check_path(request: &Request, response: Response) -> Result<Response, ErrorResponse> {
    if request.uri().path() == WEBSOCKET_PATH {
        return Ok(response);
    }
    let mut refusal = ErrorResponse::new(Some("not found".to_owned()));
    *refusal.status_mut() = StatusCode::NOT_FOUND;
    Err(refusal)
}

/// The initiator's side of the handshake: `-> psk, e`, `<- e, ee`, then the confirmation.
async fn initiate(ws: &mut WsStream, config: &ChannelConfig) -> Result<(Sealer, Opener), TransportError> {
    let limit = config.max_frame_bytes;
    let mut handshake =
        codec::initiator(&config.psk).map_err(|error| TransportError::noise("setup", error))?;
    let mut buffer = [0u8; 2 * HANDSHAKE_MESSAGE_LEN];
    let length = handshake
        .write_message(&[], &mut buffer)
        .map_err(|error| TransportError::noise("could not write the first message", error))?;
    send_handshake_message(ws, &buffer[..length], limit).await?;

    let response = read_handshake_message(ws, limit).await?;
    let payload_length = handshake
        .read_message(&response, &mut buffer)
        .map_err(|error| TransportError::noise("the responder's message did not authenticate", error))?;
    if payload_length != 0 {
        return Err(TransportError::handshake("unexpected handshake payload"));
    }
    let (mut sealer, opener) =
        codec::split(handshake).map_err(|error| TransportError::noise("could not finish", error))?;
    let confirmation = sealer.seal_confirmation()?;
    send_handshake_message(ws, &confirmation, limit).await?;
    Ok((sealer, opener))
}

/// The responder's side of the handshake: `-> psk, e`, `<- e, ee`, then the confirmation.
async fn respond(ws: &mut WsStream, config: &ChannelConfig) -> Result<(Sealer, Opener), TransportError> {
    let limit = config.max_frame_bytes;
    let mut handshake =
        codec::responder(&config.psk).map_err(|error| TransportError::noise("setup", error))?;
    let mut buffer = [0u8; 2 * HANDSHAKE_MESSAGE_LEN];
    let first = read_handshake_message(ws, limit).await?;
    let payload_length = handshake
        .read_message(&first, &mut buffer)
        .map_err(|error| TransportError::noise("the initiator's message did not authenticate", error))?;
    if payload_length != 0 {
        return Err(TransportError::handshake("unexpected handshake payload"));
    }
    let length = handshake
        .write_message(&[], &mut buffer)
        .map_err(|error| TransportError::noise("could not write the response", error))?;
    send_handshake_message(ws, &buffer[..length], limit).await?;

    let (sealer, mut opener) =
        codec::split(handshake).map_err(|error| TransportError::noise("could not finish", error))?;
    let confirmation = read_handshake_message(ws, limit).await?;
    opener
        .open_confirmation(&confirmation)
        .map_err(|_| TransportError::handshake("the initiator's key confirmation did not authenticate"))?;
    Ok((sealer, opener))
}

async fn send_handshake_message(
    ws: &mut WsStream,
    message: &[u8],
    limit: usize,
) -> Result<(), TransportError> {
    ws.send(Message::Binary(Bytes::copy_from_slice(message)))
        .await
        .map_err(|error| during_handshake(TransportError::from_websocket(error, limit)))
}

/// The next binary message, skipping pings and pongs.
async fn read_handshake_message(ws: &mut WsStream, limit: usize) -> Result<Bytes, TransportError> {
    loop {
        let Some(message) = ws.next().await else {
            return Err(TransportError::handshake("the peer closed the connection"));
        };
        match message.map_err(|error| during_handshake(TransportError::from_websocket(error, limit)))? {
            Message::Binary(bytes) => return Ok(bytes),
            Message::Ping(_) | Message::Pong(_) => {}
            Message::Close(frame) => {
                tracing::debug!(?frame, "peer closed the connection during the secure channel handshake");
                if frame.is_some_and(|frame| {
                    frame.code == CloseCode::Policy && frame.reason == AUTHENTICATION_FAILED
                }) {
                    // What a node answers to a handshake that did not authenticate.
                    return Err(TransportError::handshake("the peer refused it: authentication failed"));
                }
                return Err(TransportError::handshake("the peer closed the connection"));
            }
            Message::Text(_) | Message::Frame(_) => {
                return Err(TransportError::handshake("not a handshake message"));
            }
        }
    }
}

/// During the handshake, a closed connection or an oversized message is a failed
/// handshake: the peer did not prove it holds the secret.
fn during_handshake(error: TransportError) -> TransportError {
    match error {
        TransportError::Closed => TransportError::handshake("the peer closed the connection"),
        TransportError::FrameTooLarge { .. } => TransportError::handshake("not a handshake message"),
        error => error,
    }
}

/// Tells a peer whose handshake failed that it failed, and drops the connection.
async fn reject(mut ws: WsStream, peer_addr: SocketAddr, error: &TransportError) {
    tracing::debug!(%peer_addr, error = %error, "secure channel handshake failed");
    let (code, reason) = match error {
        TransportError::Timeout => (CloseCode::Policy, "handshake timed out"),
        TransportError::HandshakeFailed { .. } => (CloseCode::Policy, AUTHENTICATION_FAILED),
        // The connection itself is broken: nothing to tell.
        _ => return,
    };
    let close = Message::Close(Some(CloseFrame { code, reason: reason.into() }));
    let _ = timeout(CLOSE_TIMEOUT, ws.send(close)).await;
}

/// An encrypted, mutually authenticated channel to one peer, carrying UTF-8 frames.
///
/// Use it from one task, or [`into_split`](Self::into_split) it for a reader task and a
/// writer task.
pub struct SecureChannel {
    /// The sending half.
    sender: SecureSender,
    /// The receiving half.
    receiver: SecureReceiver,
}

impl SecureChannel {
    fn new(
        ws: WsStream,
        sealer: Sealer,
        opener: Opener,
        peer_addr: SocketAddr,
        max_frame_bytes: usize,
    ) -> Self {
        let (sink, source) = ws.split();
        let sink = Arc::new(Mutex::new(sink));
        Self {
            sender: SecureSender {
                sink: Arc::clone(&sink),
                sealer,
                peer_addr,
                max_frame_bytes,
                closed: false,
            },
            receiver: SecureReceiver {
                source,
                sink,
                opener,
                peer_addr,
                max_frame_bytes,
                state: ReceiveState::Open,
            },
        }
    }

    /// Sends one frame. See [`SecureSender::send`].
    pub async fn send(&mut self, frame: &str) -> Result<(), TransportError> {
        self.sender.send(frame).await
    }

    /// Receives the next frame. See [`SecureReceiver::recv`].
    pub async fn recv(&mut self) -> Result<Option<String>, TransportError> {
        self.receiver.recv().await
    }

    /// Closes the channel: sends a WebSocket Close frame with `reason` (cut to 123 bytes)
    /// and waits up to a second for the peer to answer it, dropping frames still in
    /// flight. Best effort; never fails.
    ///
    /// The reason is not encrypted or authenticated: send anything that matters as a
    /// frame first.
    pub async fn close(mut self, reason: &str) {
        self.sender.close(reason).await;
        let _ =
            timeout(CLOSE_TIMEOUT, async { while let Some(Ok(_)) = self.receiver.source.next().await {} })
                .await;
    }

    /// Splits the channel into halves for a writer task and a reader task.
    pub fn into_split(self) -> (SecureSender, SecureReceiver) {
        (self.sender, self.receiver)
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.sender.peer_addr
    }
}

impl fmt::Debug for SecureChannel {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.debug_struct("SecureChannel").field("peer_addr", &self.peer_addr()).finish_non_exhaustive()
    }
}

/// The sending half of a [`SecureChannel`].
pub struct SecureSender {
    /// The WebSocket's write half, shared with the receiver so that it can send a Close
    /// frame when it fails.
    sink: Arc<Mutex<WsSink>>,
    /// Encrypts our direction of the session.
    sealer: Sealer,
    /// The peer's address, for logs.
    peer_addr: SocketAddr,
    /// Largest frame we send.
    max_frame_bytes: usize,
    /// Set once a send failed part-way or we closed: the peer's nonce counter or frame
    /// reassembly may be out of step, so no further frame may be sent.
    closed: bool,
}

impl SecureSender {
    /// Sends one frame, in as many transport messages as it needs, and flushes.
    ///
    /// Fails with [`TransportError::FrameTooLarge`] (sending nothing) if the frame is over
    /// `max_frame_bytes`. Not cancel-safe: a send cancelled part-way leaves half a frame
    /// on the wire, and this half refuses further sends with [`TransportError::Closed`].
    pub async fn send(&mut self, frame: &str) -> Result<(), TransportError> {
        if self.closed {
            return Err(TransportError::Closed);
        }
        if frame.len() > self.max_frame_bytes {
            return Err(TransportError::FrameTooLarge { limit: self.max_frame_bytes });
        }
        let mut sink = self.sink.lock().await;
        // Marked closed until the whole frame is out, in case this future is dropped.
        self.closed = true;
        let limit = self.max_frame_bytes;
        for (data, last) in codec::chunks(frame.as_bytes()) {
            let message = self.sealer.seal_chunk(data, last)?;
            sink.feed(Message::Binary(message.into()))
                .await
                .map_err(|error| TransportError::from_websocket(error, limit))?;
        }
        sink.flush().await.map_err(|error| TransportError::from_websocket(error, limit))?;
        self.closed = false;
        Ok(())
    }

    /// Sends a WebSocket Close frame with `reason` (cut to 123 bytes); the receiving half
    /// then sees the peer's answer and ends. Best effort; never fails.
    pub async fn close(&mut self, reason: &str) {
        self.closed = true;
        let close =
            Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: truncate(reason).into() }));
        let _ = timeout(CLOSE_TIMEOUT, async { self.sink.lock().await.send(close).await }).await;
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }
}

impl fmt::Debug for SecureSender {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.debug_struct("SecureSender").field("peer_addr", &self.peer_addr).finish_non_exhaustive()
    }
}

/// The receiving half of a [`SecureChannel`].
pub struct SecureReceiver {
    /// The WebSocket's read half.
    source: WsSource,
    /// The write half, to send a Close frame when a received message is refused, and to
    /// flush the answer to the peer's Close.
    sink: Arc<Mutex<WsSink>>,
    /// Decrypts the peer's direction and reassembles frames.
    opener: Opener,
    /// The peer's address, for logs.
    peer_addr: SocketAddr,
    /// Largest frame we accept.
    max_frame_bytes: usize,
    /// Whether more frames can come.
    state: ReceiveState,
}

/// Where a [`SecureReceiver`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReceiveState {
    /// Frames may come.
    Open,
    /// The peer closed cleanly; `recv` returns `None` from now on.
    Ended,
    /// An error ended the channel; `recv` fails with `Closed` from now on.
    Failed,
}

impl SecureReceiver {
    /// Receives the next frame: `Ok(None)` when the peer closed cleanly.
    ///
    /// Cancel-safe: a half-reassembled frame is kept in `self`, so this can sit in a
    /// `tokio::select!`. After an error other than [`TransportError::NotUtf8`] the
    /// channel is closed (the peer gets a Close frame) and later calls fail with
    /// [`TransportError::Closed`].
    ///
    /// An idle connection task holds this future all the time, so the rare paths that
    /// talk back to the peer (a refused message, the answer to a Close) are boxed: inline,
    /// they would make it four times as large.
    pub async fn recv(&mut self) -> Result<Option<String>, TransportError> {
        match self.state {
            ReceiveState::Open => {}
            ReceiveState::Ended => return Ok(None),
            ReceiveState::Failed => return Err(TransportError::Closed),
        }
        loop {
            let Some(message) = self.source.next().await else {
                return self.end();
            };
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    let error = TransportError::from_websocket(error, self.max_frame_bytes);
                    return Err(Box::pin(self.fail(error)).await);
                }
            };
            let bytes = match message {
                Message::Binary(bytes) => bytes,
                Message::Ping(_) | Message::Pong(_) => continue,
                Message::Close(frame) => {
                    tracing::debug!(peer_addr = %self.peer_addr, ?frame, "peer closed the secure channel");
                    // tungstenite queued the answer to the Close; send it now.
                    let flush = timeout(CLOSE_TIMEOUT, async { self.sink.lock().await.flush().await });
                    let _ = Box::pin(flush).await;
                    return self.end();
                }
                Message::Text(_) | Message::Frame(_) => {
                    return Err(Box::pin(self.fail(TransportError::Decrypt)).await);
                }
            };
            let frame = match self.opener.open(&bytes, self.max_frame_bytes) {
                Ok(Some(frame)) => frame,
                Ok(None) => continue,
                Err(error) => return Err(Box::pin(self.fail(error)).await),
            };
            return match String::from_utf8(frame) {
                Ok(frame) => Ok(Some(frame)),
                Err(error) => Err(TransportError::NotUtf8(error.utf8_error())),
            };
        }
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// The stream ended: cleanly between frames, or cut in the middle of one.
    fn end(&mut self) -> Result<Option<String>, TransportError> {
        if self.opener.is_mid_frame() {
            self.state = ReceiveState::Failed;
            return Err(TransportError::Closed);
        }
        self.state = ReceiveState::Ended;
        Ok(None)
    }

    /// Ends the channel after `error`, telling the peer why if the connection still works.
    async fn fail(&mut self, error: TransportError) -> TransportError {
        self.state = ReceiveState::Failed;
        tracing::debug!(peer_addr = %self.peer_addr, error = %error, "secure channel failed");
        let (code, reason) = match &error {
            TransportError::FrameTooLarge { .. } => (CloseCode::Size, "frame too large"),
            TransportError::Decrypt => (CloseCode::Policy, "transport message rejected"),
            TransportError::WebSocket(_) => (CloseCode::Protocol, "protocol error"),
            _ => return error,
        };
        let close = Message::Close(Some(CloseFrame { code, reason: reason.into() }));
        let _ = timeout(CLOSE_TIMEOUT, async { self.sink.lock().await.send(close).await }).await;
        error
    }
}

impl fmt::Debug for SecureReceiver {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("SecureReceiver")
            .field("peer_addr", &self.peer_addr)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// Cuts a Close reason to what fits in a Close frame, at a character boundary.
fn truncate(reason: &str) -> String {
    let mut end = reason.len().min(MAX_CLOSE_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}
