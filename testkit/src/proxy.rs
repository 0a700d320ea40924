//! A TCP proxy that a test can cut and restore: a real network outage between a process and
//! a service, without stopping a service other tests share.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

#[derive(Default)]
struct State {
    cut: bool,
    connections: Vec<AbortHandle>,
}

pub struct TcpProxy {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
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
        let shared = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if shared.lock().expect("proxy state").cut {
                    drop(client); // Refused while cut: the peer sees the connection close.
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
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

    pub fn restore(&self) {
        self.state.lock().expect("proxy state").cut = false;
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}
