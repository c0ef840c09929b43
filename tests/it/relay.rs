//! A test-only TCP relay between the service and a backend, so one test can
//! cut its own connections and refuse new ones (the backend "goes down")
//! without touching the shared server other tests use.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::broadcast,
    task::JoinHandle,
};

pub struct Relay {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    /// Milliseconds every chunk waits before it is passed on, each way.
    delay_ms: Arc<AtomicU64>,
    /// The backend's answers are dropped (its requests still reach it).
    deaf: Arc<AtomicBool>,
    cut: broadcast::Sender<()>,
    task: JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let deaf = Arc::new(AtomicBool::new(false));
        let (cut, _) = broadcast::channel(4);
        let task = tokio::spawn({
            let up = up.clone();
            let cut = cut.clone();
            let delay_ms = delay_ms.clone();
            let deaf = deaf.clone();
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !up.load(Ordering::Acquire) {
                        // Refused: the connection closes at once.
                        continue;
                    }
                    let mut stop = cut.subscribe();
                    let delay_ms = delay_ms.clone();
                    let deaf = deaf.clone();
                    tokio::spawn(async move {
                        let Ok(outbound) = TcpStream::connect(target).await else {
                            return;
                        };
                        let (in_read, in_write) = inbound.split();
                        let (out_read, out_write) = outbound.into_split();
                        tokio::select! {
                            _ = pass(in_read, out_write, &delay_ms, None) => {}
                            _ = pass(out_read, in_write, &delay_ms, Some(&deaf)) => {}
                            _ = stop.recv() => {}
                        }
                    });
                }
            }
        });
        Self {
            addr,
            up,
            delay_ms,
            deaf,
            cut,
            task,
        }
    }

    /// From now on the backend's answers are dropped, while what is sent to
    /// it still arrives: it does the work (commits, say), and the service
    /// never hears. Cut the connections ([`Self::set_up`]) to end it.
    pub fn set_deaf(&self, deaf: bool) {
        self.deaf.store(deaf, Ordering::Release);
    }

    /// Every chunk waits this long before it is passed on, each way (a slow
    /// network), from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::Release);
    }

    /// Down: every open connection is cut and new ones are refused.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Release);
        if !up {
            let _ = self.cut.send(());
        }
    }
}

/// Copies one direction, holding each chunk back by the current delay, and
/// dropping it while `drop` is set.
async fn pass(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    delay_ms: &AtomicU64,
    drop: Option<&AtomicBool>,
) {
    let mut buf = vec![0; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let delay = delay_ms.load(Ordering::Acquire);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if drop.is_some_and(|drop| drop.load(Ordering::Acquire)) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
