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
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(AtomicU64::new(0));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let upstream = upstream.to_string();
        let (d, g) = (down.clone(), generation.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let serve = async {
                    loop {
                        let Ok((mut client, _)) = listener.accept().await else {
                            continue;
                        };
                        if d.load(Ordering::SeqCst) {
                            drop(client); // refused while down
                            continue;
                        }
                        let born = g.load(Ordering::SeqCst);
                        let (up, gen) = (upstream.clone(), g.clone());
                        tokio::spawn(async move {
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
                        });
                    }
                };
                tokio::select! {
                    _ = stop_rx => {}
                    () = serve => {}
                }
            });
        });
        TcpProxy {
            port,
            down,
            generation,
            stop: Some(stop_tx),
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
