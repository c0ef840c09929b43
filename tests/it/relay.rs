//! A test-only TCP relay between the service and a backend, so one test can
//! cut its own connections and refuse new ones (the backend "goes down")
//! without touching the shared server other tests use.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::broadcast,
    task::JoinHandle,
};

pub struct Relay {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    cut: broadcast::Sender<()>,
    task: JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let (cut, _) = broadcast::channel(4);
        let task = tokio::spawn({
            let up = up.clone();
            let cut = cut.clone();
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !up.load(Ordering::Acquire) {
                        // Refused: the connection closes at once.
                        continue;
                    }
                    let mut stop = cut.subscribe();
                    tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(target).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = stop.recv() => {}
                        }
                    });
                }
            }
        });
        Self {
            addr,
            up,
            cut,
            task,
        }
    }

    /// Down: every open connection is cut and new ones are refused.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Release);
        if !up {
            let _ = self.cut.send(());
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
