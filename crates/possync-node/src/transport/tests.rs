//! Real-socket tests of the secure channel, on 127.0.0.1 only.
//!
//! Attacks are played with raw tokio-tungstenite clients and servers; where an attack needs
//! a genuine session first, the test drives the handshake with this module's own
//! [`initiate`] and then writes transport messages by hand.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message};

use super::codec::{HANDSHAKE_MESSAGE_LEN, MAX_CHUNK_DATA, Sealer, TAG_LEN};
use super::*;

const SECRET: &str = "7f3c9a1e-shop-42-a8b2c4d6e8f0a1b3";

/// Every test finishes well within this, or it is hung.
const TEST_DEADLINE: Duration = Duration::from_secs(30);

fn config() -> ChannelConfig {
    ChannelConfig { handshake_timeout: Duration::from_secs(5), ..ChannelConfig::from_secret(SECRET) }
}

async fn within<T>(future: impl Future<Output = T>) -> T {
    timeout(TEST_DEADLINE, future).await.expect("test hung")
}

async fn listen() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// Accepts one connection on `listener` with `config`, in the background.
fn accept_one(
    listener: TcpListener,
    config: ChannelConfig,
) -> tokio::task::JoinHandle<Result<SecureChannel, TransportError>> {
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await?;
        accept(stream, &config).await
    })
}

/// A connected pair: (dialler, acceptor).
async fn pair(client: &ChannelConfig, server: &ChannelConfig) -> (SecureChannel, SecureChannel) {
    let (listener, addr) = listen().await;
    let accepted = accept_one(listener, server.clone());
    let dialled = connect(addr, client).await.unwrap();
    let accepted = accepted.await.unwrap().unwrap();
    (dialled, accepted)
}

/// A plain WebSocket client on `/p2p`, no Noise.
async fn raw_client(addr: SocketAddr) -> WsStream {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/p2p"), stream).await.unwrap();
    ws
}

/// A genuine handshake from a raw WebSocket, leaving the test to write transport messages.
async fn raw_initiator(addr: SocketAddr) -> (WsStream, Sealer) {
    let mut ws = raw_client(addr).await;
    let (sealer, _opener) = initiate(&mut ws, &config()).await.unwrap();
    (ws, sealer)
}

fn binary(message: Vec<u8>) -> Message {
    Message::Binary(Bytes::from(message))
}

/// The next Close frame a raw socket receives, skipping anything before it.
async fn close_frame(ws: &mut WsStream) -> Option<CloseFrame> {
    while let Some(message) = ws.next().await {
        match message {
            Ok(Message::Close(frame)) => return frame,
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

#[tokio::test]
async fn frames_round_trip_both_ways() {
    within(async {
        let (mut client, mut server) = pair(&config(), &config()).await;
        assert!(server.peer_addr().ip().is_loopback());
        assert_ne!(server.peer_addr(), client.peer_addr());

        client.send(r#"{"type":"hello","sourcePos":"pos-1"}"#).await.unwrap();
        assert_eq!(server.recv().await.unwrap().as_deref(), Some(r#"{"type":"hello","sourcePos":"pos-1"}"#));
        server.send(r#"{"type":"hello-ack","sourcePos":"pos-2"}"#).await.unwrap();
        assert_eq!(
            client.recv().await.unwrap().as_deref(),
            Some(r#"{"type":"hello-ack","sourcePos":"pos-2"}"#)
        );
        client.send("").await.unwrap();
        assert_eq!(server.recv().await.unwrap().as_deref(), Some(""));
        server.send("caf\u{e9} \u{1f9fe}").await.unwrap();
        assert_eq!(client.recv().await.unwrap().as_deref(), Some("caf\u{e9} \u{1f9fe}"));

        client.close("bye").await;
        assert_eq!(server.recv().await.unwrap(), None);
        assert_eq!(server.recv().await.unwrap(), None);
    })
    .await;
}

#[tokio::test]
async fn many_frames_arrive_in_order_over_split_halves() {
    within(async {
        const COUNT: usize = 2_000;
        let (client, server) = pair(&config(), &config()).await;
        let (mut client_tx, mut client_rx) = client.into_split();
        let (mut server_tx, mut server_rx) = server.into_split();
        assert_eq!(server_tx.peer_addr(), server_rx.peer_addr());

        // Both directions at once, each from its own task.
        let client_sends = tokio::spawn(async move {
            for seq in 0..COUNT {
                client_tx.send(&format!(r#"{{"from":"client","seq":{seq}}}"#)).await.unwrap();
            }
            client_tx
        });
        let server_sends = tokio::spawn(async move {
            for seq in 0..COUNT {
                server_tx.send(&format!(r#"{{"from":"server","seq":{seq}}}"#)).await.unwrap();
            }
            server_tx
        });
        let server_receives = tokio::spawn(async move {
            for seq in 0..COUNT {
                assert_eq!(
                    server_rx.recv().await.unwrap().unwrap(),
                    format!(r#"{{"from":"client","seq":{seq}}}"#)
                );
            }
            server_rx
        });
        for seq in 0..COUNT {
            assert_eq!(
                client_rx.recv().await.unwrap().unwrap(),
                format!(r#"{{"from":"server","seq":{seq}}}"#)
            );
        }
        let mut client_tx = client_sends.await.unwrap();
        let _server_tx = server_sends.await.unwrap();
        let mut server_rx = server_receives.await.unwrap();

        // Closing from the sender half ends the peer's receiver, whose answer ends ours.
        client_tx.close("done").await;
        assert_eq!(server_rx.recv().await.unwrap(), None);
        assert_eq!(client_rx.recv().await.unwrap(), None);
        assert!(matches!(client_tx.send("late").await, Err(TransportError::Closed)));
    })
    .await;
}

#[tokio::test]
async fn a_one_mebibyte_frame_is_split_and_reassembled() {
    within(async {
        let (mut client, mut server) = pair(&config(), &config()).await;
        let frame: String = (0..1024 * 1024).map(|index| char::from(b'a' + (index % 26) as u8)).collect();
        assert!(frame.len() > 256 * MAX_CHUNK_DATA);

        let (sent, received) = tokio::join!(client.send(&frame), server.recv());
        sent.unwrap();
        assert_eq!(received.unwrap().unwrap(), frame);

        // And the other way, followed by a small frame to show the boundaries hold.
        let (sent, received) = tokio::join!(
            async {
                server.send(&frame).await?;
                server.send("after").await
            },
            async { (client.recv().await, client.recv().await) }
        );
        sent.unwrap();
        assert_eq!(received.0.unwrap().unwrap(), frame);
        assert_eq!(received.1.unwrap().as_deref(), Some("after"));
    })
    .await;
}

#[tokio::test]
async fn a_frame_over_the_limit_is_refused_and_the_channel_closed() {
    within(async {
        let limit = 64 * 1024;
        let server_config = ChannelConfig { max_frame_bytes: limit, ..config() };
        let (mut client, mut server) = pair(&config(), &server_config).await;

        // At the limit is fine.
        let at_limit = "x".repeat(limit);
        let (sent, received) = tokio::join!(client.send(&at_limit), server.recv());
        sent.unwrap();
        assert_eq!(received.unwrap().unwrap().len(), limit);

        // One byte more: refused by the receiver, which closes the channel.
        let over_limit = "y".repeat(limit + 1);
        let (sent, received) = tokio::join!(client.send(&over_limit), server.recv());
        sent.unwrap();
        assert!(matches!(received, Err(TransportError::FrameTooLarge { limit: l }) if l == limit));
        assert!(matches!(server.recv().await, Err(TransportError::Closed)));
        assert_eq!(client.recv().await.unwrap(), None);
        assert!(matches!(client.send("more").await, Err(TransportError::Closed)));
    })
    .await;
}

#[tokio::test]
async fn the_sender_refuses_a_frame_over_its_own_limit_without_sending_it() {
    within(async {
        let client_config = ChannelConfig { max_frame_bytes: 10, ..config() };
        let (mut client, mut server) = pair(&client_config, &config()).await;
        assert!(matches!(client.send("0123456789a").await, Err(TransportError::FrameTooLarge { limit: 10 })));
        client.send("0123456789").await.unwrap();
        assert_eq!(server.recv().await.unwrap().as_deref(), Some("0123456789"));
    })
    .await;
}

#[tokio::test]
async fn a_wrong_secret_fails_both_sides_and_delivers_nothing() {
    within(async {
        let (listener, addr) = listen().await;
        let accepted = accept_one(listener, config());
        let intruder = ChannelConfig::from_secret("a-guess-at-the-shop-secret");
        let dialled = connect(addr, &intruder).await;
        assert!(matches!(dialled, Err(TransportError::HandshakeFailed { .. })), "{dialled:?}");
        let accepted = accepted.await.unwrap();
        assert!(matches!(accepted, Err(TransportError::HandshakeFailed { .. })), "{accepted:?}");

        // The same from the other side: a terminal dialling a server with another secret.
        let (listener, addr) = listen().await;
        let accepted = accept_one(listener, intruder.clone());
        let dialled = connect(addr, &config()).await;
        assert!(matches!(dialled, Err(TransportError::HandshakeFailed { .. })), "{dialled:?}");
        assert!(matches!(accepted.await.unwrap(), Err(TransportError::HandshakeFailed { .. })));
    })
    .await;
}

#[tokio::test]
async fn the_responder_tells_a_failed_initiator_why_in_a_close_frame() {
    within(async {
        let (listener, addr) = listen().await;
        let accepted = accept_one(listener, config());
        let mut ws = raw_client(addr).await;
        let mut handshake = codec::initiator(&derive_psk("wrong")).unwrap();
        let mut message = [0u8; 64];
        let length = handshake.write_message(&[], &mut message).unwrap();
        ws.send(binary(message[..length].to_vec())).await.unwrap();
        let frame = close_frame(&mut ws).await.expect("a Close frame");
        assert_eq!(frame.code, CloseCode::Policy);
        assert_eq!(frame.reason.as_str(), "authentication failed");
        assert!(matches!(accepted.await.unwrap(), Err(TransportError::HandshakeFailed { .. })));
    })
    .await;
}

/// Relays WebSocket messages between one client and `upstream`, recording every binary
/// message the client sends: what an attacker on the shop LAN can capture.
async fn recording_relay(listener: TcpListener, upstream: SocketAddr) -> Vec<Vec<u8>> {
    let (stream, _) = listener.accept().await.unwrap();
    let mut client_side = tokio_tungstenite::accept_async(stream).await.unwrap();
    let mut server_side = raw_client(upstream).await;
    let mut recorded = Vec::new();
    loop {
        tokio::select! {
            message = client_side.next() => {
                let Some(Ok(message)) = message else { break };
                if let Message::Binary(bytes) = &message {
                    recorded.push(bytes.to_vec());
                }
                let is_close = message.is_close();
                if server_side.send(message).await.is_err() || is_close {
                    break;
                }
            }
            message = server_side.next() => {
                let Some(Ok(message)) = message else { break };
                let is_close = message.is_close();
                if client_side.send(message).await.is_err() || is_close {
                    break;
                }
            }
        }
    }
    recorded
}

#[tokio::test]
async fn a_replayed_session_never_delivers_a_frame() {
    within(async {
        // The server delivers every frame of every session it accepts to `frames`.
        let (listener, server_addr) = listen().await;
        let (frames_tx, mut frames) = mpsc::unbounded_channel();
        let (outcomes_tx, mut outcomes) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let frames_tx = frames_tx.clone();
                let outcomes_tx = outcomes_tx.clone();
                tokio::spawn(async move {
                    match accept(stream, &config()).await {
                        Ok(mut channel) => {
                            let _ = outcomes_tx.send(Ok(()));
                            while let Ok(Some(frame)) = channel.recv().await {
                                let _ = frames_tx.send(frame);
                            }
                        }
                        Err(error) => {
                            let _ = outcomes_tx.send(Err(error));
                        }
                    }
                });
            }
        });

        // A genuine session, through a relay that records what the terminal sends.
        let (relay_listener, relay_addr) = listen().await;
        let relay = tokio::spawn(recording_relay(relay_listener, server_addr));
        let mut terminal = connect(relay_addr, &config()).await.unwrap();
        terminal.send(r#"{"type":"ticket","action":"create","data":{"total":"12.50"}}"#).await.unwrap();
        assert_eq!(
            frames.recv().await.unwrap(),
            r#"{"type":"ticket","action":"create","data":{"total":"12.50"}}"#
        );
        assert!(outcomes.recv().await.unwrap().is_ok());
        terminal.close("done").await;
        let recorded = relay.await.unwrap();
        assert_eq!(recorded[0].len(), HANDSHAKE_MESSAGE_LEN, "first handshake message");
        assert_eq!(recorded[1].len(), TAG_LEN, "key confirmation");
        assert_eq!(recorded.len(), 3, "one chunk of the ticket");

        // The attacker replays the first handshake message on a new connection: the server
        // answers with a fresh ephemeral key...
        let mut attacker = raw_client(server_addr).await;
        attacker.send(binary(recorded[0].clone())).await.unwrap();
        let Some(Ok(Message::Binary(response))) = attacker.next().await else {
            panic!("no handshake response")
        };
        assert_eq!(response.len(), HANDSHAKE_MESSAGE_LEN);
        // ...so the recorded confirmation and frame do not open under the new keys.
        for message in &recorded[1..] {
            let _ = attacker.send(binary(message.clone())).await;
        }
        let outcome = outcomes.recv().await.unwrap();
        assert!(matches!(outcome, Err(TransportError::HandshakeFailed { .. })), "{outcome:?}");
        let frame = close_frame(&mut attacker).await.expect("a Close frame");
        assert_eq!(frame.reason.as_str(), "authentication failed");

        // Replaying only the first message and then waiting gets nowhere either.
        let mut attacker = raw_client(server_addr).await;
        attacker.send(binary(recorded[0].clone())).await.unwrap();
        attacker.send(binary(recorded[2].clone())).await.unwrap();
        assert!(matches!(outcomes.recv().await.unwrap(), Err(TransportError::HandshakeFailed { .. })));

        // Nothing but the genuine frame was ever delivered.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(frames.try_recv().is_err());
    })
    .await;
}

#[tokio::test]
async fn a_tampered_transport_message_fails_to_decrypt_and_closes() {
    within(async {
        let (listener, addr) = listen().await;
        let accepted = accept_one(listener, config());
        let (mut ws, mut sealer) = raw_initiator(addr).await;
        let mut server = accepted.await.unwrap().unwrap();

        ws.send(binary(sealer.seal_chunk(br#"{"seq":1}"#, true).unwrap())).await.unwrap();
        assert_eq!(server.recv().await.unwrap().as_deref(), Some(r#"{"seq":1}"#));

        let mut tampered = sealer.seal_chunk(br#"{"qty":1}"#, true).unwrap();
        tampered[6] ^= 0x01;
        ws.send(binary(tampered)).await.unwrap();
        assert!(matches!(server.recv().await, Err(TransportError::Decrypt)));
        assert!(matches!(server.recv().await, Err(TransportError::Closed)));
        let frame = close_frame(&mut ws).await.expect("a Close frame");
        assert_eq!(frame.code, CloseCode::Policy);
    })
    .await;
}

#[tokio::test]
async fn a_replayed_or_reordered_transport_message_fails_to_decrypt() {
    within(async {
        // Replayed.
        let (listener, addr) = listen().await;
        let accepted = accept_one(listener, config());
        let (mut ws, mut sealer) = raw_initiator(addr).await;
        let mut server = accepted.await.unwrap().unwrap();
        let message = sealer.seal_chunk(br#"{"pay":"10.00"}"#, true).unwrap();
        ws.send(binary(message.clone())).await.unwrap();
        ws.send(binary(message)).await.unwrap();
        assert_eq!(server.recv().await.unwrap().as_deref(), Some(r#"{"pay":"10.00"}"#));
        assert!(matches!(server.recv().await, Err(TransportError::Decrypt)));

        // Reordered.
        let (listener, addr) = listen().await;
        let accepted = accept_one(listener, config());
        let (mut ws, mut sealer) = raw_initiator(addr).await;
        let mut server = accepted.await.unwrap().unwrap();
        let first = sealer.seal_chunk(b"1", true).unwrap();
        let second = sealer.seal_chunk(b"2", true).unwrap();
        ws.send(binary(second)).await.unwrap();
        ws.send(binary(first)).await.unwrap();
        assert!(matches!(server.recv().await, Err(TransportError::Decrypt)));
    })
    .await;
}

#[tokio::test]
async fn a_frame_that_is_not_utf8_is_refused_and_the_channel_goes_on() {
    within(async {
        let (listener, addr) = listen().await;
        let accepted = accept_one(listener, config());
        let (mut ws, mut sealer) = raw_initiator(addr).await;
        let mut server = accepted.await.unwrap().unwrap();
        ws.send(binary(sealer.seal_chunk(&[b'{', 0xff, b'}'], true).unwrap())).await.unwrap();
        ws.send(binary(sealer.seal_chunk(b"{}", true).unwrap())).await.unwrap();
        assert!(matches!(server.recv().await, Err(TransportError::NotUtf8(_))));
        assert_eq!(server.recv().await.unwrap().as_deref(), Some("{}"));
    })
    .await;
}

#[tokio::test]
async fn a_close_in_the_middle_of_a_frame_is_not_a_clean_end() {
    within(async {
        let (listener, addr) = listen().await;
        let accepted = accept_one(listener, config());
        let (mut ws, mut sealer) = raw_initiator(addr).await;
        let mut server = accepted.await.unwrap().unwrap();
        ws.send(binary(sealer.seal_chunk(b"[1,2,", false).unwrap())).await.unwrap();
        ws.close(None).await.unwrap();
        assert!(matches!(server.recv().await, Err(TransportError::Closed)));
    })
    .await;
}

#[tokio::test]
async fn garbage_after_the_websocket_upgrade_fails_the_handshake() {
    within(async {
        let garbage: Vec<Message> = vec![
            binary(vec![0; HANDSHAKE_MESSAGE_LEN]),
            binary((0..HANDSHAKE_MESSAGE_LEN as u8).collect()),
            binary(b"hello".to_vec()),
            binary(Vec::new()),
            binary(vec![0xab; 4096]),
            binary(vec![0xcd; 100_000]),
            Message::text(r#"{"id":"1","type":"hello","sourcePos":"pos-9"}"#),
        ];
        for message in garbage {
            let (listener, addr) = listen().await;
            let accepted = accept_one(listener, config());
            let mut ws = raw_client(addr).await;
            let _ = ws.send(message.clone()).await;
            let outcome = accepted.await.unwrap();
            assert!(
                matches!(outcome, Err(TransportError::HandshakeFailed { .. })),
                "{message:?}: {outcome:?}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn the_initiator_survives_a_responder_that_sends_garbage() {
    within(async {
        for response in [binary(vec![0; HANDSHAKE_MESSAGE_LEN]), binary(vec![1; 7]), Message::text("hi")] {
            let (listener, addr) = listen().await;
            let server = tokio::spawn(async move {
                let (stream, _) = listener.accept().await.unwrap();
                let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
                let _first = ws.next().await;
                let _ = ws.send(response).await;
                let _ = ws.next().await;
            });
            let dialled = connect(addr, &config()).await;
            assert!(matches!(dialled, Err(TransportError::HandshakeFailed { .. })), "{dialled:?}");
            server.abort();
        }
    })
    .await;
}

#[tokio::test]
async fn http_and_garbage_bytes_on_the_port_are_errors_not_panics() {
    within(async {
        let inputs: [&[u8]; 5] = [
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            b"GET /p2p HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            b"GET /admin HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
            &[0xff; 9000],
        ];
        for input in inputs {
            let (listener, addr) = listen().await;
            let accepted = accept_one(listener, config());
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let _ = stream.write_all(input).await;
            let _ = stream.shutdown().await;
            let outcome = accepted.await.unwrap();
            assert!(outcome.is_err(), "{:?}", String::from_utf8_lossy(input));
            let mut reply = Vec::new();
            let _ = stream.read_to_end(&mut reply).await;
        }

        // The wrong path is refused with 404 before any Noise.
        let (listener, addr) = listen().await;
        let accepted = accept_one(listener, config());
        let stream = TcpStream::connect(addr).await.unwrap();
        assert!(tokio_tungstenite::client_async(format!("ws://{addr}/admin"), stream).await.is_err());
        assert!(matches!(accepted.await.unwrap(), Err(TransportError::WebSocket(_))));

        // A dialler meeting an HTTP server that is not ours.
        let (listener, addr) = listen().await;
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request).await;
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
        });
        assert!(matches!(connect(addr, &config()).await, Err(TransportError::WebSocket(_))));
    })
    .await;
}

#[tokio::test]
async fn a_silent_peer_times_out_on_both_sides() {
    within(async {
        let quick = ChannelConfig { handshake_timeout: Duration::from_millis(300), ..config() };

        // Accepting a connection that never speaks.
        let (listener, addr) = listen().await;
        let accepted = accept_one(listener, quick.clone());
        let _silent = TcpStream::connect(addr).await.unwrap();
        assert!(matches!(accepted.await.unwrap(), Err(TransportError::Timeout)));

        // Accepting a WebSocket that never starts the handshake.
        let (listener, addr) = listen().await;
        let accepted = accept_one(listener, quick.clone());
        let mut ws = raw_client(addr).await;
        assert!(matches!(accepted.await.unwrap(), Err(TransportError::Timeout)));
        assert_eq!(close_frame(&mut ws).await.expect("a Close frame").code, CloseCode::Policy);

        // Dialling a port that accepts TCP and never answers.
        let (listener, addr) = listen().await;
        let _held = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(stream);
        });
        assert!(matches!(connect(addr, &quick).await, Err(TransportError::Timeout)));
    })
    .await;
}

#[tokio::test]
async fn dialling_a_closed_port_is_an_io_error() {
    within(async {
        let (listener, addr) = listen().await;
        drop(listener);
        assert!(matches!(connect(addr, &config()).await, Err(TransportError::Io(_))));
    })
    .await;
}

#[test]
fn psk_derivation_is_fixed_and_depends_on_the_secret() {
    assert_eq!(derive_psk(SECRET), derive_psk(SECRET));
    assert_ne!(derive_psk(SECRET), derive_psk("another shop"));
    // Pinned so that a change to the derivation cannot ship unnoticed: it would split
    // every shop's terminals into two groups that cannot talk.
    let hex: String =
        derive_psk("correct horse battery staple").iter().map(|byte| format!("{byte:02x}")).collect();
    assert_eq!(hex, PINNED_PSK_HEX);
    assert!(!format!("{:?}", config()).contains(&format!("{:?}", derive_psk(SECRET))));
}

/// `derive_psk("correct horse battery staple")`, computed with Python's `hmac` (RFC 5869 by hand).
const PINNED_PSK_HEX: &str = "c5a75045b2ce38684412506ad8200ffdbb6c720fabe9d25184bcb0cc709796d8";

#[test]
fn close_reasons_are_cut_at_a_character_boundary() {
    assert_eq!(truncate("bye"), "bye");
    let long = "\u{e9}".repeat(100);
    let cut = truncate(&long);
    assert!(cut.len() <= MAX_CLOSE_REASON_BYTES);
    assert_eq!(cut.len(), 122);
}

/// Issue 13, item 8: plain HTTP on the peer port (a browser, curl) gets the `404 Not Found`
/// that PROTOCOL.md documents instead of a silent close, also when its head arrives in
/// pieces; a real peer on the same listener still connects.
#[tokio::test]
async fn plain_http_on_the_peer_port_answers_404() {
    within(async {
        let (listener, addr) = listen().await;
        let server = tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for _ in 0..4 {
                let (stream, _) = listener.accept().await.unwrap();
                outcomes.push(accept(stream, &config()).await.map(|_| ()));
            }
            outcomes
        });
        for pieces in [
            vec!["GET / HTTP/1.1\r\nHost: till\r\n\r\n"],
            vec!["GET /p2p HTTP/1.1\r\n", "Host: till\r\nAccept: */*\r\n\r\n"],
            vec!["POST /api/categories HTTP/1.1\r\nHost: till\r\nContent-Length: 0\r\n\r\n"],
        ] {
            let mut client = TcpStream::connect(addr).await.unwrap();
            for piece in &pieces {
                client.write_all(piece.as_bytes()).await.unwrap();
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            let mut answer = String::new();
            client.read_to_string(&mut answer).await.unwrap();
            assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n"), "{pieces:?}: {answer:?}");
            assert!(answer.ends_with("(WebSocket upgrade at /p2p)\n"), "{answer:?}");
        }
        let peer = connect(addr, &config()).await;
        assert!(peer.is_ok(), "a real peer still connects: {peer:?}");
        let outcomes = server.await.unwrap();
        assert!(outcomes[..3].iter().all(Result::is_err), "{outcomes:?}");
        assert!(outcomes[3].is_ok(), "{outcomes:?}");
    })
    .await;
}
