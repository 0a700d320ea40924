//! A TCP proxy that a test can cut, freeze and restore: a real network outage between a
//! process and a service, without stopping a service other tests share.
//!
//! Two kinds of outage: [`TcpProxy::cut`] closes every connection (the peers see a reset or
//! an end of stream at once, as when a service or a load balancer drops them), and
//! [`TcpProxy::freeze`] black-holes them: nothing is forwarded any more, nothing is closed
//! and no error reaches either side, as when a network path drops every packet; only a
//! peer's own timeouts (heartbeats, request deadlines) can tell. [`TcpProxy::restore`] ends
//! either: after a freeze, what was held back is delivered, as TCP's retransmissions would.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;

#[derive(Default)]
struct State {
    cut: bool,
    connections: Vec<AbortHandle>,
}

pub struct TcpProxy {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// `true` while frozen; every pump waits on it before each read and each write.
    frozen: watch::Sender<bool>,
    accept: AbortHandle,
}

impl TcpProxy {
    /// Listens on 127.0.0.1 (port 0) and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let state = Arc::new(Mutex::new(State::default()));
        let (frozen, thawed) = watch::channel(false);
        let shared = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if shared.lock().expect("proxy state").cut {
                    drop(client); // Refused while cut: the peer sees the connection close.
                    continue;
                }
                let thawed = thawed.clone();
                let task = tokio::spawn(async move {
                    // A connection made while frozen waits, as a lost SYN is sent again.
                    if wait_thawed(&thawed).await.is_err() {
                        return;
                    }
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        forward(client, server, thawed).await;
                    }
                });
                let mut s = shared.lock().expect("proxy state");
                s.connections.retain(|c| !c.is_finished());
                s.connections.push(task.abort_handle());
            }
        })
        .abort_handle();
        Self {
            addr,
            state,
            frozen,
            accept,
        }
    }

    /// Drops every open connection and refuses new ones until [`TcpProxy::restore`].
    pub fn cut(&self) {
        let mut s = self.state.lock().expect("proxy state");
        s.cut = true;
        for c in s.connections.drain(..) {
            c.abort();
        }
    }

    /// Stops forwarding in both directions on every connection, open or new, without
    /// closing any, until [`TcpProxy::restore`].
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Ends a cut or a freeze.
    pub fn restore(&self) {
        self.state.lock().expect("proxy state").cut = false;
        self.frozen.send_replace(false);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// Waits until the proxy is not frozen; an error when the proxy is gone.
async fn wait_thawed(frozen: &watch::Receiver<bool>) -> Result<(), watch::error::RecvError> {
    let mut frozen = frozen.clone();
    frozen.wait_for(|f| !*f).await.map(|_| ())
}

/// Copies both ways until either side ends, holding everything while frozen.
async fn forward(client: TcpStream, server: TcpStream, frozen: watch::Receiver<bool>) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        () = pump(client_read, server_write, frozen.clone()) => {}
        () = pump(server_read, client_write, frozen) => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if wait_thawed(&frozen).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Bytes read just before a freeze are held until the thaw too.
        if wait_thawed(&frozen).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// An echo server on loopback.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
        let addr = listener.local_addr().expect("an address");
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = socket.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn read_some(stream: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(limit, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => Some(buf[..n].to_vec()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_frozen_connection_stays_open_and_silent_and_delivers_after_the_restore() {
        let proxy = TcpProxy::start(echo().await).await;
        let mut stream = TcpStream::connect(proxy.addr).await.expect("connecting");
        stream.write_all(b"one").await.expect("writing");
        assert_eq!(
            read_some(&mut stream, Duration::from_secs(5)).await,
            Some(b"one".to_vec())
        );

        proxy.freeze();
        stream
            .write_all(b"two")
            .await
            .expect("a frozen path takes writes");
        assert_eq!(
            read_some(&mut stream, Duration::from_millis(300)).await,
            None,
            "nothing comes back, and the connection is not closed"
        );

        proxy.restore();
        assert_eq!(
            read_some(&mut stream, Duration::from_secs(5)).await,
            Some(b"two".to_vec()),
            "what was held back is delivered"
        );
    }

    #[tokio::test]
    async fn a_connection_made_while_frozen_goes_through_after_the_restore() {
        let proxy = TcpProxy::start(echo().await).await;
        proxy.freeze();
        let mut stream = TcpStream::connect(proxy.addr).await.expect("connecting");
        stream.write_all(b"hello").await.expect("writing");
        assert_eq!(
            read_some(&mut stream, Duration::from_millis(300)).await,
            None
        );
        proxy.restore();
        assert_eq!(
            read_some(&mut stream, Duration::from_secs(5)).await,
            Some(b"hello".to_vec())
        );
    }
}
