//! The coordinator over TLS (`tls://HOST:PORT`), and the link type the tcp backend reads and
//! writes: a plain TCP socket or a TLS session over one.
//!
//! The client trusts the CA certificates in [`Options::ca`](crate::Options::ca) (or the file
//! named by `TURNSTILE_CA`), else the system's roots, and checks the server's certificate
//! against the host of the URL (a name or an IP address). A certificate that is not trusted,
//! or a server that does not speak TLS, fails the connection with [`Error::Tls`]: a retry
//! cannot change either, so it is never retried.
//!
//! rustls on the `ring` provider, TLS 1.3 only (as the server).

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::Error;

/// What a client needs to open TLS links: the roots it trusts.
#[derive(Clone)]
pub(crate) struct Connector {
    config: Arc<rustls::ClientConfig>,
}

impl Connector {
    /// Trusts the PEM certificates in `ca`, or the system's roots when `None`.
    pub(crate) fn new(addr: &str, ca: Option<&Path>) -> Result<Connector, Error> {
        let tls_err = |why: String| Error::Tls {
            addr: addr.to_owned(),
            why,
        };
        let mut roots = rustls::RootCertStore::empty();
        match ca {
            Some(path) => {
                let bad = |e: &dyn std::fmt::Display| {
                    tls_err(format!("cannot use the CA file {}: {e}", path.display()))
                };
                for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))? {
                    roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
                }
                if roots.is_empty() {
                    return Err(bad(&"no PEM certificate in it"));
                }
            }
            None => {
                // Unreadable files among the system's are skipped, as every TLS client does.
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                if roots.is_empty() {
                    return Err(tls_err(format!(
                        "no system CA certificates found; give the coordinator's CA with --ca \
                         FILE or {}",
                        crate::CA_ENV
                    )));
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Connector {
            config: Arc::new(config),
        })
    }
}

/// Connects to `addr` (`HOST:PORT`), in TLS when `tls` is given, all by `deadline`. A
/// failure to talk at all is [`Error::Connect`] (worth retrying); a TLS refusal is
/// [`Error::Tls`].
pub(crate) async fn open(
    addr: &str,
    tls: Option<&Connector>,
    deadline: Instant,
) -> Result<(LinkRead, LinkWrite), Error> {
    let connect_err = |source| Error::Connect {
        addr: addr.to_owned(),
        source,
    };
    let timed_out = || connect_err(io::ErrorKind::TimedOut.into());
    let stream = tokio::time::timeout_at(deadline, TcpStream::connect(addr))
        .await
        .map_err(|_| timed_out())?
        .map_err(connect_err)?;
    over(stream, addr, tls, deadline).await
}

/// Makes a link of a connected socket: runs the TLS handshake when `tls` is given.
async fn over(
    stream: TcpStream,
    addr: &str,
    tls: Option<&Connector>,
    deadline: Instant,
) -> Result<(LinkRead, LinkWrite), Error> {
    let timed_out = || Error::Connect {
        addr: addr.to_owned(),
        source: io::ErrorKind::TimedOut.into(),
    };
    let _ = stream.set_nodelay(true);
    let Some(tls) = tls else {
        let (rd, wr) = stream.into_split();
        return Ok((LinkRead::Plain(rd), LinkWrite::Plain(wr)));
    };
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_owned()).map_err(|_| Error::Tls {
        addr: addr.to_owned(),
        why: format!("{host:?} is not a host name or an IP address"),
    })?;
    let connector = TlsConnector::from(tls.config.clone());
    let stream = tokio::time::timeout_at(deadline, connector.connect(name, stream))
        .await
        .map_err(|_| timed_out())?
        .map_err(|e| handshake_error(addr, e))?;
    let (rd, wr) = tokio::io::split(stream);
    Ok((
        LinkRead::Tls(rd),
        LinkWrite::Tls(TlsWrite {
            inner: wr,
            accepted: None,
        }),
    ))
}

/// A failed TLS handshake: rustls's refusals are final, the rest is the network.
fn handshake_error(addr: &str, e: io::Error) -> Error {
    let Some(tls) = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
        return Error::Connect {
            addr: addr.to_owned(),
            source: e,
        };
    };
    let why = match tls {
        rustls::Error::InvalidCertificate(c) => format!(
            "the server's certificate is not trusted ({c:?}); give its CA with --ca FILE or {}",
            crate::CA_ENV
        ),
        rustls::Error::InvalidMessage(_) => {
            "the server does not speak TLS (is it a tcp:// port?)".to_owned()
        }
        other => other.to_string(),
    };
    Error::Tls {
        addr: addr.to_owned(),
        why,
    }
}

/// Whether the first bytes a plain client received are a TLS record (an alert or a
/// handshake) rather than a frame: no frame can start with these bytes, as a reply frame is
/// at most 64 MiB (its length's first byte is below 0x04).
pub(crate) fn looks_like_tls(received: &[u8]) -> bool {
    matches!(received, [0x15 | 0x16, 0x03, ..])
}

/// The reading half of a link.
pub(crate) enum LinkRead {
    /// Plain TCP.
    Plain(OwnedReadHalf),
    /// TLS.
    Tls(ReadHalf<TlsStream<TcpStream>>),
}

/// The writing half of a link.
pub(crate) enum LinkWrite {
    /// Plain TCP.
    Plain(OwnedWriteHalf),
    /// TLS.
    Tls(TlsWrite),
}

/// The writing half of a TLS link, whose writes complete only once their bytes are on the
/// socket.
///
/// A TLS write may accept plaintext yet leave part of its encrypted record buffered when the
/// socket is full; with nothing written after it, that part would sit there until the next
/// write (a keep-alive, a TTL/3 later). So a write here flushes before it reports the bytes
/// taken: it says `Pending` while its own record is still buffered, remembering how many bytes
/// it took, and reports them when called again. That is right for `write_all`, which calls
/// again with the same bytes; a caller that drops a write half-way must drop the link (the
/// driver does: a write that times out ends the link).
pub(crate) struct TlsWrite {
    inner: WriteHalf<TlsStream<TcpStream>>,
    /// Bytes of the caller's buffer already handed to rustls, not yet reported.
    accepted: Option<usize>,
}

impl LinkRead {
    /// Whether this is plain TCP: a TLS read may need a write, so only the driver reads it.
    pub(crate) fn is_plain(&self) -> bool {
        matches!(self, LinkRead::Plain(_))
    }
}

impl LinkWrite {
    /// Plain TCP, on which a write never has to wait for a TLS record to finish.
    pub(crate) fn is_plain(&self) -> bool {
        matches!(self, LinkWrite::Plain(_))
    }

    /// A non-blocking write, for the driver's fast path. Only plain TCP has one: a TLS write
    /// must stay with `write_all` until its record is on the socket (see [`TlsWrite`]), so it
    /// says `WouldBlock` and the caller takes the bounded `write_all` path.
    pub(crate) fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            LinkWrite::Plain(wr) => wr.try_write(buf),
            LinkWrite::Tls(_) => Err(std::io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl AsyncRead for LinkRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LinkRead::Plain(rd) => Pin::new(rd).poll_read(cx, buf),
            LinkRead::Tls(rd) => Pin::new(rd).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for LinkWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            LinkWrite::Plain(wr) => Pin::new(wr).poll_write(cx, buf),
            LinkWrite::Tls(tls) => {
                if tls.accepted.is_none() {
                    // Whatever an earlier write left buffered goes first.
                    ready!(Pin::new(&mut tls.inner).poll_flush(cx))?;
                    let n = ready!(Pin::new(&mut tls.inner).poll_write(cx, buf))?;
                    tls.accepted = Some(n);
                }
                ready!(Pin::new(&mut tls.inner).poll_flush(cx))?;
                Poll::Ready(Ok(tls.accepted.take().unwrap_or(0)))
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LinkWrite::Plain(wr) => Pin::new(wr).poll_flush(cx),
            LinkWrite::Tls(tls) => Pin::new(&mut tls.inner).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LinkWrite::Plain(wr) => Pin::new(wr).poll_shutdown(cx),
            LinkWrite::Tls(tls) => Pin::new(&mut tls.inner).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn tls_records_are_told_from_frames() {
        // An alert and a server hello.
        assert!(looks_like_tls(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x32]));
        assert!(looks_like_tls(&[0x16, 0x03, 0x03, 0x00, 0x7a]));
        // A frame of 16 bytes; too few bytes to tell.
        assert!(!looks_like_tls(&[0x00, 0x00, 0x00, 0x10, 0x81]));
        assert!(!looks_like_tls(&[0x15]));
    }

    /// A TLS server on loopback with the test certificate that reads slowly (the client's
    /// writes find the socket full) and reports how many plaintext bytes it got in all.
    async fn slow_reader() -> (String, tokio::task::JoinHandle<usize>) {
        use rustls::pki_types::PrivateKeyDer;
        use tokio::io::AsyncReadExt;
        let certs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../turnstile/tests/certs");
        let chain = CertificateDer::pem_file_iter(certs.join("server.pem"))
            .expect("read the certificate")
            .collect::<Result<Vec<_>, _>>()
            .expect("a certificate");
        let key = PrivateKeyDer::from_pem_file(certs.join("server.key")).expect("the key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("a server configuration");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        // A small receive buffer (inherited by the accepted socket), so that the client's
        // writes fill the socket instead of the kernel's loopback buffers taking it all.
        let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
        socket.set_recv_buffer_size(16 * 1024).expect("SO_RCVBUF");
        socket
            .bind("127.0.0.1:0".parse().expect("an address"))
            .expect("bind");
        let listener = socket.listen(8).expect("listen");
        let addr = listener.local_addr().expect("addr").to_string();
        let server = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.expect("accept");
            let mut tls = acceptor.accept(sock).await.expect("TLS handshake");
            let mut got = 0;
            let mut buf = vec![0u8; 4096];
            // Until the client has been silent for a while: what it wrote has arrived.
            while let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_secs(2), tls.read(&mut buf)).await
            {
                if n == 0 {
                    break;
                }
                got += n;
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            got
        });
        (addr, server)
    }

    /// A completed write is on the socket: with nothing written after it, the peer still gets
    /// every byte (a TLS write that left its last record in rustls's buffer would strand it).
    #[tokio::test]
    async fn a_completed_write_reaches_the_peer_with_nothing_after_it() {
        use tokio::io::AsyncWriteExt;
        let (addr, server) = slow_reader().await;
        let ca = Path::new(env!("CARGO_MANIFEST_DIR")).join("../turnstile/tests/certs/ca.pem");
        let connector = Connector::new(&addr, Some(&ca)).expect("the CA loads");
        let deadline = Instant::now() + Duration::from_secs(10);
        // A small send buffer: the socket fills during the write, and the kernel says it is
        // writable again only once a third of it is free, so a write's last record is sure to
        // meet a full socket.
        let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
        socket.set_send_buffer_size(16 * 1024).expect("SO_SNDBUF");
        let stream = socket
            .connect(addr.parse().expect("an address"))
            .await
            .expect("connect");
        let (_rd, mut wr) = over(stream, &addr, Some(&connector), deadline)
            .await
            .expect("a TLS link");
        let data = vec![7u8; 2 << 20];
        wr.write_all(&data).await.expect("write");
        let sent = data.len();
        // The link stays open, and nothing more is written.
        let got = server.await.expect("the server task");
        assert_eq!(got, sent);
        drop(wr);
    }

    #[test]
    fn a_missing_ca_file_is_a_tls_error() {
        let e = Connector::new("h:1", Some(Path::new("/nonexistent/ca.pem")))
            .err()
            .expect("no such file");
        assert!(matches!(e, Error::Tls { .. }), "{e:?}");
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
    }
}
