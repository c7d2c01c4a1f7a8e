//! A TCP proxy that a test can cut and restore: a network outage between
//! unilog and a server, with the server itself staying up.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// A proxy on 127.0.0.1 to `upstream`, stopped on drop.
pub struct TcpProxy {
    pub port: u16,
    down: Arc<AtomicBool>,
    /// Bumped by `cut`: connections of an older generation close.
    generation: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TcpProxy {
    /// Listens on a free port now; forwards to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> TcpProxy {
        let down = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(AtomicU64::new(0));
        let upstream = upstream.to_string();
        let (d, g) = (down.clone(), generation.clone());
        let (port, stop) = super::serve_connections(move |mut client| {
            let (down, gen, up) = (d.clone(), g.clone(), upstream.clone());
            async move {
                if down.load(Ordering::SeqCst) {
                    return; // refused while down
                }
                let born = gen.load(Ordering::SeqCst);
                let Ok(mut server) = tokio::net::TcpStream::connect(&up).await else {
                    return;
                };
                let cut = async {
                    while gen.load(Ordering::SeqCst) == born {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    () = cut => {}
                }
            }
        });
        TcpProxy {
            port,
            down,
            generation,
            stop: Some(stop),
        }
    }

    /// Closes every open connection and refuses new ones.
    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
